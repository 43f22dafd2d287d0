// The settings page as a person uses it, in Debian's Chromium driven by playwright-core,
// against the running local stack: the page and its dev host app (FRONTEND_URL, served by
// scripts/serve_page.py), the functions under `cargo lambda watch` (LOCAL_API_URL) and the
// Klaviyo sandbox (KLAVIYO_SANDBOX_URL). Run by scripts/browser-test.sh (part of `make test`),
// which sets all of that up.
//
// The journey: signed out, then signed in through the dev sign-in; an empty list; Connect
// Klaviyo and Deny at the consent screen; connect and Allow, which the page completes with
// the user's own session; Test connection passes; the app is removed in Klaviyo, Test
// connection finds out, the page offers Reconnect and a host app's subscription receives
// Needs Reauth; reconnect (and Reauthorized); an authorize URL outside Klaviyo is refused; a refused and then an
// accepted private API key; Disconnect, cancelled and then confirmed; an attacker's authorize
// link followed by a victim (nothing connected for anyone, the grant revoked at Klaviyo);
// sign out. Screenshots of each step go to SCREENSHOT_DIR (default target/browser-e2e).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

function setting(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run scripts/browser-test.sh`);
  return value.replace(/\/+$/, "");
}

const FRONTEND = setting("FRONTEND_URL");
const API = setting("LOCAL_API_URL");
const SANDBOX = setting("KLAVIYO_SANDBOX_URL");
const SHOTS = path.resolve(root, process.env.SCREENSHOT_DIR || "target/browser-e2e");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

const COMPLETE = `${API}/api/oauth/connect/klaviyo/complete`;
const HANDLE = /^[A-Za-z0-9_-]{43}$/;

const unique = (prefix) => `${prefix}${randomUUID().replaceAll("-", "").slice(0, 12)}`;
const user = unique("browser-user-");
const oauthAccount = unique("K");
const keyAccount = unique("K");

let browser;
let page;
const problems = [];

// ---- helpers ----------------------------------------------------------------------------------

async function call(method, url, body, token) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(response.ok, `${method} ${url}: ${response.status} ${await response.clone().text()}`);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

// A JWT the functions accept, signed with the local stack's key (what a host app's backend
// would hold); for callers outside the browser.
const jwtFor = (userId) =>
  execFileSync(path.join(root, "scripts/dev-token.sh"), [userId, "600"], { encoding: "utf8" }).trim();

const sandbox = {
  account: (id, ttl) =>
    call("PUT", `${SANDBOX}/sandbox/accounts/${id}`, {
      organization_name: `Org of ${id}`,
      access_token_ttl_secs: ttl,
    }),
  removeApp: (id) => call("POST", `${SANDBOX}/sandbox/accounts/${id}/revoke-all`),
  apiKey: (key, id) =>
    call("POST", `${SANDBOX}/sandbox/api-keys`, { key, account: id, organization_name: `Org of ${id}` }),
  refreshTokens: async (id) =>
    (await call("GET", `${SANDBOX}/sandbox/tokens?account=${id}`)).refresh_tokens,
  revokeRequests: (id) => call("GET", `${SANDBOX}/sandbox/requests?account=${id}&endpoint=revoke`),
};

// A host app's subscription to the user's events (a rule on the local bus and a queue, by
// scripts/watch_events.py): resolves once it listens; `events` then resolves with each
// expected event in the order they came, or rejects when they do not come in time.
async function subscribe(userId, expected) {
  const watcher = spawn(
    path.join(root, ".venv/bin/python"),
    [
      path.join(root, "scripts/watch_events.py"),
      "--user", userId,
      "--timeout", "60",
      ...expected.flatMap((type) => ["--expect", type]),
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  let out = "";
  let err = "";
  watcher.stdout.on("data", (chunk) => (out += chunk));
  const events = new Promise((resolve, reject) => {
    watcher.on("exit", (code) =>
      code === 0
        ? resolve(out.trim().split("\n").map((line) => JSON.parse(line)))
        : reject(new Error(`events not received (exit ${code}): ${err}`)),
    );
  });
  await new Promise((resolve, reject) => {
    watcher.stderr.on("data", (chunk) => {
      err += chunk;
      if (err.includes("subscribed")) resolve();
    });
    watcher.on("exit", () => reject(new Error(`the event watcher stopped: ${err}`)));
  });
  return { events };
}

// The scheduled refresh, as EventBridge would start it.
function runRefresh() {
  const event = JSON.parse(readFileSync(path.join(root, "events/scheduled.json"), "utf8"));
  return call("POST", `${API}/2015-03-31/functions/refresh/invocations`, event);
}

async function shot(name, on = page) {
  await on.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 }, locale: "en-GB" });
  const p = await context.newPage();
  p.setDefaultTimeout(30_000);
  return p;
}

// Page errors and console errors count as problems, except the failed loads the journey
// provokes on purpose: Chromium reports every 4xx answer as a console error.
const EXPECTED_FAILURES = [
  [401, `${FRONTEND}/session`], // signed out
  [400, `${API}/api/oauth/connect/klaviyo/api-key`], // the refused API key
  [404, COMPLETE], // the victim's refused completion
];

function watchForProblems(p) {
  p.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  p.on("console", (message) => {
    if (message.type() !== "error") return;
    const failed = /Failed to load resource: the server responded with a status of (\d+)/.exec(message.text());
    const where = message.location().url;
    const expected =
      failed && EXPECTED_FAILURES.some(([status, url]) => Number(failed[1]) === status && where.startsWith(url));
    if (!expected) problems.push(`console error on ${p.url()}: ${message.text()} (${where})`);
  });
}

const notice = (p = page) => p.locator("#notice");
const accountItems = () => page.locator("#accounts li.account");
const item = (name) => accountItems().filter({ has: page.locator(".account-name", { hasText: name }) });

async function listed(p = page) {
  await p.locator('#accounts[aria-busy="false"]').waitFor();
  return p.locator("#accounts li.account .account-name").allTextContents();
}

// The dev host app's sign-in (scripts/serve_page.py), as the link `make dev` prints.
async function signIn(p, userId) {
  await p.goto(`${FRONTEND}/dev/sign-in?user=${encodeURIComponent(userId)}`);
  await p.locator("#session-user").filter({ hasText: userId }).waitFor();
}

// On the sandbox's consent screen: pick the account, then Allow or Deny (by keyboard).
// Answers the address the callback sent the browser back to, before the page tidies it.
async function consent(account, decision, p = page) {
  await p.waitForURL((url) => url.href.startsWith(`${SANDBOX}/oauth/authorize`));
  await p.getByLabel("Klaviyo account").fill(account);
  await p.getByLabel("Organization name").fill(`Org of ${account}`);
  const button = p.getByRole("button", { name: decision });
  await button.focus();
  const [landing] = await Promise.all([
    p.waitForRequest((request) => request.isNavigationRequest() && request.url().startsWith(`${FRONTEND}/settings`)),
    p.keyboard.press("Enter"),
  ]);
  return new URL(landing.url());
}

// Holds the page's completion request until the page's state at that moment is recorded.
async function watchCompletion() {
  const seen = {};
  await page.route(COMPLETE, async (route) => {
    seen.address = page.url();
    seen.notice = await notice().textContent();
    seen.body = route.request().postDataJSON();
    seen.authorization = await route.request().headerValue("authorization");
    await route.continue();
  });
  return seen;
}

// ---- set-up ----------------------------------------------------------------------------------

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  page = await newPage();
  watchForProblems(page);
  // Tokens for the OAuth account live a minute, so its connection is due for refresh at once.
  await sandbox.account(oauthAccount, 60);
});

after(async () => {
  await browser?.close();
});

// ---- the journey -----------------------------------------------------------------------------

test("signed out, the page says so and offers the dev sign-in; nothing is taken from the address", async () => {
  await page.goto(`${FRONTEND}/settings#api=${encodeURIComponent(API)}&token=not-a-session`);
  await page.getByRole("heading", { name: "You are not signed in" }).waitFor();
  assert.equal(new URL(page.url()).hash, "", "the fragment is taken out of the address");
  assert.equal(await page.locator("#klaviyo").isHidden(), true, "no accounts without a session");
  await page.getByText("Local development only").waitFor();
  await shot("00-signed-out");

  // Another site cannot sign this browser in as someone else (login CSRF).
  const forged = await page.request.get(`${FRONTEND}/dev/sign-in?user=mallory`, {
    headers: { "sec-fetch-site": "cross-site" },
    maxRedirects: 0,
  });
  assert.equal(forged.status(), 403);
  assert.deepEqual(await page.context().cookies(FRONTEND), []);
});

test("a new user signs in and sees an empty list and a labelled, keyboard-usable page", async () => {
  await page.getByLabel("User id").fill(user);
  await page.getByRole("button", { name: "Sign in (dev only)" }).click();
  await page.locator("#session-user").filter({ hasText: user }).waitFor();
  assert.equal(page.url(), `${FRONTEND}/settings`);
  assert.deepEqual(await listed(), []);
  await page.getByText("No Klaviyo account is connected yet.").waitFor();

  // The session is an HttpOnly cookie of the host app; the JWT lives only in the page's memory.
  const cookies = await page.context().cookies(FRONTEND);
  assert.equal(cookies.length, 1);
  assert.equal(cookies[0].httpOnly, true);
  assert.equal(cookies[0].sameSite, "Lax");
  assert.deepEqual(
    await page.evaluate(() => [document.cookie, sessionStorage.length, localStorage.length]),
    ["", 0, 0],
  );

  // Every control has an accessible name, and the first Tab reaches the skip link.
  const unnamed = await page.$$eval("input:not([type=hidden]), button, summary", (elements) =>
    elements
      .filter((e) => !(e.labels?.length || e.getAttribute("aria-label") || e.textContent.trim()))
      .map((e) => e.outerHTML),
  );
  assert.deepEqual(unnamed, []);
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.textContent), "Skip to content");
  await shot("01-no-accounts");
});

test("Connect Klaviyo, then Deny at Klaviyo: nothing is connected and the page says so", async () => {
  await page.locator("#connect-name").fill("Main store");
  await page.getByRole("button", { name: "Connect Klaviyo" }).click();
  await page.waitForURL((url) => url.href.startsWith(`${SANDBOX}/oauth/authorize`));
  await page.getByText("Allow access to your Klaviyo account?").waitFor();
  await shot("02-consent");
  const landing = await consent(oauthAccount, "Deny");
  assert.equal(landing.search, "?error=klaviyo_access_denied");

  await notice().filter({ hasText: "Connection cancelled" }).waitFor();
  assert.equal(await notice().evaluate((e) => e === document.activeElement), true, "the message has focus");
  assert.equal(new URL(page.url()).search, "", "the outcome is shown once");
  assert.deepEqual(await listed(), []);
  await shot("03-denied");
});

test("Connect by keyboard and Allow: the page completes with the user's session, then lists the account", async () => {
  const seen = await watchCompletion();
  await page.locator("#connect-name").fill("Main store");
  await page.locator("#connect-name").press("Enter");
  const landing = await consent(oauthAccount, "Allow");
  const handle = landing.searchParams.get("completion");
  assert.match(handle ?? "", HANDLE, `the callback hands back a completion handle: ${landing.search}`);
  assert.equal(landing.searchParams.get("connected"), "klaviyo");

  await notice().filter({ hasText: "Klaviyo account connected." }).waitFor();
  await page.unroute(COMPLETE);
  assert.deepEqual(seen.body, { completion: handle });
  assert.match(seen.authorization ?? "", /^Bearer [\w-]+\.[\w-]+\.[\w-]+$/);
  assert.equal(new URL(seen.address).search, "", "the handle left the address before the page called the API");
  assert.equal(seen.notice, "Finishing the connection…", "not 'connected' before the completion answered");
  assert.ok(!page.url().includes("completion="), page.url());
  assert.equal(await notice().evaluate((e) => e === document.activeElement), true, "the message has focus");

  assert.deepEqual(await listed(), ["Main store"]);
  const main = item("Main store");
  assert.equal(await main.locator(".badge").textContent(), "Active");
  assert.equal(await main.locator(".account-method").textContent(), "Klaviyo login (OAuth)");
  assert.match(await main.locator(".account-org").textContent(), new RegExp(`Org of ${oauthAccount}`));
  await shot("04-connected");
});

test("Test connection: Klaviyo accepts it, then the app is removed in Klaviyo, the host app hears of it, and Reconnect brings it back", async () => {
  const main = item("Main store");
  const test = page.getByRole("button", { name: "Test connection Main store" });
  await test.click();
  await notice().filter({ hasText: "Main store works: Klaviyo accepted the connection." }).waitFor();
  assert.equal(await main.locator(".badge").textContent(), "Active");
  assert.equal(await main.locator(".account-verified time").count(), 1, "Last checked is shown");
  await shot("05-tested");

  // A host app's subscription to this user's events, then the user removes the app in Klaviyo.
  const { events } = await subscribe(user, ["Connection Needs Reauth", "Connection Reauthorized"]);
  await sandbox.removeApp(oauthAccount);
  await sandbox.account(oauthAccount, 3600);
  await test.click();
  await notice().filter({ hasText: "Main store needs re-authorisation: Klaviyo no longer accepts this connection" }).waitFor();
  assert.equal(await main.locator(".badge").textContent(), "Needs re-authorisation");
  assert.match(await main.locator(".account-reauth").textContent(), /access was removed in Klaviyo/);
  assert.equal(await test.count(), 0, "nothing to test until it is reconnected");
  const reconnect = page.getByRole("button", { name: "Reconnect Main store" });
  await reconnect.waitFor();
  await shot("06-needs-reauth");

  await reconnect.click();
  const landing = await consent(oauthAccount, "Allow");
  assert.match(landing.searchParams.get("completion") ?? "", HANDLE);
  await notice().filter({ hasText: "Klaviyo account connected." }).waitFor();
  assert.ok(!page.url().includes("completion="), page.url());
  assert.deepEqual(await listed(), ["Main store"], "the same connection, not a second one");
  assert.equal(await item("Main store").locator(".badge").textContent(), "Active");
  assert.equal(await page.getByRole("button", { name: "Reconnect Main store" }).count(), 0);

  // What the host app received: the break with its reason, then the reconnect.
  const [broken, back] = await events;
  const id = await main.getAttribute("data-id");
  assert.equal(broken["detail-type"], "Connection Needs Reauth");
  assert.equal(broken.detail.connectionId, id);
  assert.equal(broken.detail.reason, "refresh_refused");
  assert.equal(back["detail-type"], "Connection Reauthorized");
  assert.equal(back.detail.connectionId, id);
  assert.equal(back.detail.status, "active");
});

test("an authorize URL outside the configured Klaviyo is refused, never opened", async () => {
  // As if the API (compromised, misconfigured) answered with a lookalike sign-in page.
  const lookalike = "https://www.klaviyo.com.sign-in.example";
  const foreign = `${lookalike}/oauth/authorize?client_id=x`;
  const connectRoute = (url) => url.href.startsWith(`${API}/api/oauth/connect/klaviyo?`);
  await page.route(connectRoute, (route) => route.fulfill({ json: { authUrl: foreign } }));
  const navigations = [];
  const onNavigation = (frame) => frame === page.mainFrame() && navigations.push(frame.url());
  const outside = [];
  const onRequest = (request) => request.url().startsWith(lookalike) && outside.push(request.url());
  page.on("framenavigated", onNavigation);
  page.on("request", onRequest);
  try {
    await page.locator("#connect-name").fill("Lookalike");
    await page.getByRole("button", { name: "Connect Klaviyo" }).click();
    await page.locator("#connect-error").filter({ hasText: "Klaviyo was not opened" }).waitFor();
  } finally {
    page.off("framenavigated", onNavigation);
    page.off("request", onRequest);
    await page.unroute(connectRoute);
  }
  assert.deepEqual(navigations, [], "the page stayed where it was");
  assert.deepEqual(outside, [], "nothing was requested from the foreign origin");
  assert.equal(page.url(), `${FRONTEND}/settings`);
  assert.equal(await page.getByRole("button", { name: "Connect Klaviyo" }).isEnabled(), true);
  assert.deepEqual(await listed(), ["Main store"]);
  await shot("07-foreign-authorize-url");
  await page.locator("#connect-name").fill("");
});

test("a private API key: a refused key is explained, an accepted one is listed", async () => {
  const key = `pk_browser_${randomUUID().replaceAll("-", "")}`;
  await sandbox.apiKey(key, keyAccount);

  await page.getByText("Use a private API key instead").click();
  await page.getByLabel("Private API key").fill(`pk_unknown_${randomUUID().replaceAll("-", "")}`);
  await page.locator("#api-key-name").fill("EU store");
  await page.getByRole("button", { name: "Connect with API key" }).click();
  await page.locator("#api-key-error").filter({ hasText: "Klaviyo rejected this API key." }).waitFor();
  assert.equal(await page.getByLabel("Private API key").getAttribute("aria-invalid"), "true");
  assert.equal(
    await page.getByLabel("Private API key").evaluate((e) => e === document.activeElement),
    true,
    "the cursor is back in the key field",
  );

  await page.getByLabel("Private API key").fill(key);
  await page.getByRole("button", { name: "Connect with API key" }).click();
  await notice().filter({ hasText: "EU store connected with a private API key." }).waitFor();
  assert.deepEqual(await listed(), ["EU store", "Main store"], "newest first");
  assert.equal(await item("EU store").locator(".account-method").textContent(), "Private API key");
  assert.equal(await page.getByLabel("Private API key").inputValue(), "", "the key is not kept in the page");
  await shot("08-api-key");
});

test("Disconnect asks first; cancelling keeps the account, confirming removes and revokes it", async () => {
  const disconnectEu = page.getByRole("button", { name: "Disconnect EU store" });
  await disconnectEu.click();
  const dialog = page.getByRole("dialog");
  await dialog.getByText("Disconnect EU store?").waitFor();
  await shot("09-confirm-disconnect");
  await page.keyboard.press("Escape");
  await dialog.waitFor({ state: "hidden" });
  assert.equal(await disconnectEu.evaluate((e) => e === document.activeElement), true, "focus returns");
  assert.deepEqual(await listed(), ["EU store", "Main store"]);

  await disconnectEu.click();
  await dialog.getByRole("button", { name: "Disconnect", exact: true }).click();
  await notice().filter({ hasText: "EU store disconnected." }).waitFor();
  assert.deepEqual(await listed(), ["Main store"]);

  await page.getByRole("button", { name: "Disconnect Main store" }).click();
  await dialog.getByRole("button", { name: "Disconnect", exact: true }).click();
  await notice().filter({ hasText: "Main store disconnected." }).waitFor();
  assert.deepEqual(await listed(), []);
  await page.getByText("No Klaviyo account is connected yet.").waitFor();
  const active = (await sandbox.refreshTokens(oauthAccount)).filter((t) => t.status === "active");
  assert.deepEqual(active, [], "the OAuth connection's refresh token was revoked at Klaviyo");
  await shot("10-disconnected");
});

test("an attacker's authorize link: the victim's Allow connects nothing, and the grant is revoked", async () => {
  const attacker = unique("attacker-");
  const victim = unique("victim-");
  const victimAccount = unique("K");
  await sandbox.account(victimAccount, 3600);

  // The attacker starts a connect with their own session and sends the victim the link.
  const attackerJwt = jwtFor(attacker);
  const { authUrl } = await call("GET", `${API}/api/oauth/connect/klaviyo?accountName=Shared`, undefined, attackerJwt);

  // The victim, signed in to the app in their own browser, follows it and clicks Allow.
  const victimPage = await newPage();
  watchForProblems(victimPage);
  try {
    await signIn(victimPage, victim);
    assert.deepEqual(await listed(victimPage), []);
    await victimPage.goto(authUrl);
    const landing = await consent(victimAccount, "Allow", victimPage);
    assert.match(landing.searchParams.get("completion") ?? "", HANDLE);

    await notice(victimPage).filter({ hasText: "This Klaviyo connection could not be finished" }).waitFor();
    assert.match(await notice(victimPage).textContent(), /Nothing was connected/);
    assert.equal(await notice(victimPage).evaluate((e) => e === document.activeElement), true);
    assert.ok(!victimPage.url().includes("completion="), victimPage.url());
    assert.deepEqual(await listed(victimPage), [], "nothing connected for the victim");
    await shot("11-attack-refused", victimPage);
  } finally {
    await victimPage.context().close();
  }

  const { accounts } = await call("GET", `${API}/api/oauth/accounts`, undefined, attackerJwt);
  assert.deepEqual(accounts, [], "nothing connected for the attacker");

  // The API revoked the grant inline, before answering the page's completion with 404.
  const refresh = await sandbox.refreshTokens(victimAccount);
  assert.equal(refresh.length, 1, JSON.stringify(refresh));
  assert.equal(refresh[0].status, "revoked");
  const revokes = await sandbox.revokeRequests(victimAccount);
  assert.ok(
    revokes.some((r) => r.form.token === refresh[0].token),
    `a revoke request for the issued refresh token: ${JSON.stringify(revokes.map((r) => r.form.token_type_hint))}`,
  );
});

test("the same link followed by someone with no session here: the page withdraws the grant at once", async () => {
  const attacker = unique("attacker-");
  const victimAccount = unique("K");
  await sandbox.account(victimAccount, 3600);
  const { authUrl } = await call("GET", `${API}/api/oauth/connect/klaviyo`, undefined, jwtFor(attacker));

  const victimPage = await newPage();
  watchForProblems(victimPage);
  try {
    await victimPage.goto(authUrl);
    const landing = await consent(victimAccount, "Allow", victimPage);
    assert.match(landing.searchParams.get("completion") ?? "", HANDLE);
    await victimPage.getByRole("heading", { name: "You are not signed in" }).waitFor();
    await notice(victimPage).filter({ hasText: "the access Klaviyo granted has been withdrawn" }).waitFor();
    assert.ok(!victimPage.url().includes("completion="), victimPage.url());
    await shot("12-signed-out-declined", victimPage);
  } finally {
    await victimPage.context().close();
  }

  // Withdrawn before the page said so, not ten minutes later.
  const refresh = await sandbox.refreshTokens(victimAccount);
  assert.equal(refresh.length, 1, JSON.stringify(refresh));
  assert.equal(refresh[0].status, "revoked");
  const { accounts } = await call("GET", `${API}/api/oauth/accounts`, undefined, jwtFor(attacker));
  assert.deepEqual(accounts, [], "nothing connected for the attacker");
});

test("Sign out ends the session; the page says so", async () => {
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("heading", { name: "You are not signed in" }).waitFor();
  assert.equal(await page.locator("#session").isHidden(), true);
  assert.deepEqual(await page.context().cookies(FRONTEND), []);
  const asked = await page.request.get(`${FRONTEND}/session`, { headers: { "sec-fetch-site": "same-origin" } });
  assert.equal(asked.status(), 401);
  const unmarked = await page.request.get(`${FRONTEND}/session`);
  assert.equal(unmarked.status(), 403, "a request no browser marked as this site's is refused");
  await shot("13-signed-out-again");
});

test("nothing went wrong in the page along the way", () => {
  assert.deepEqual(problems, []);
});
