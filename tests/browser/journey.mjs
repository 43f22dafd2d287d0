// The settings page as a person uses it, in Debian's Chromium driven by playwright-core,
// against the running local stack: the page (FRONTEND_URL), the functions under
// `cargo lambda watch` (LOCAL_API_URL) and the Klaviyo sandbox (KLAVIYO_SANDBOX_URL).
// Run by scripts/browser-test.sh (part of `make test`), which sets all of that up.
//
// The journey: an empty list; Connect Klaviyo and Deny at the consent screen; connect and
// Allow; Klaviyo stops accepting the connection and the page offers Reconnect; reconnect;
// a refused and then an accepted private API key; Disconnect, cancelled and then confirmed.
// Screenshots of each step go to SCREENSHOT_DIR (default target/browser-e2e).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
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

const unique = (prefix) => `${prefix}${randomUUID().replaceAll("-", "").slice(0, 12)}`;
const user = unique("browser-user-");
const oauthAccount = unique("K");
const keyAccount = unique("K");

let browser;
let page;
const problems = [];

// ---- helpers ----------------------------------------------------------------------------------

async function call(method, url, body) {
  const response = await fetch(url, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(response.ok, `${method} ${url}: ${response.status} ${await response.clone().text()}`);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

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
};

// The scheduled refresh, as EventBridge would start it.
function runRefresh() {
  const event = JSON.parse(readFileSync(path.join(root, "events/scheduled.json"), "utf8"));
  return call("POST", `${API}/2015-03-31/functions/refresh/invocations`, event);
}

async function shot(name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

const notice = () => page.locator("#notice");
const accountItems = () => page.locator("#accounts li.account");
const item = (name) => accountItems().filter({ has: page.locator(".account-name", { hasText: name }) });

async function listed() {
  await page.locator('#accounts[aria-busy="false"]').waitFor();
  return accountItems().locator(".account-name").allTextContents();
}

// On the sandbox's consent screen: pick the account, then Allow or Deny (by keyboard).
async function consent(account, decision) {
  await page.waitForURL((url) => url.href.startsWith(`${SANDBOX}/oauth/authorize`));
  await page.getByLabel("Klaviyo account").fill(account);
  await page.getByLabel("Organization name").fill(`Org of ${account}`);
  const button = page.getByRole("button", { name: decision });
  await button.focus();
  await Promise.all([
    page.waitForURL((url) => url.href.startsWith(`${FRONTEND}/settings`)),
    page.keyboard.press("Enter"),
  ]);
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
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 }, locale: "en-GB" });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    // Chromium reports every 4xx answer as a console error; the refused API key is one the
    // journey provokes on purpose. Anything else (a CSP violation, a script error) counts.
    const expected = /Failed to load resource: the server responded with a status of 400/;
    if (message.type() === "error" && !expected.test(message.text())) {
      problems.push(`console error on ${page.url()}: ${message.text()}`);
    }
  });
  // Tokens for the OAuth account live a minute, so its connection is due for refresh at once.
  await sandbox.account(oauthAccount, 60);
});

after(async () => {
  await browser?.close();
});

// ---- the journey -----------------------------------------------------------------------------

test("a new user sees an empty list and a labelled, keyboard-usable page", async () => {
  const token = execFileSync(path.join(root, "scripts/dev-token.sh"), [user, "3600"], { encoding: "utf8" }).trim();
  await page.goto(`${FRONTEND}/settings#api=${encodeURIComponent(API)}&token=${token}`);
  assert.deepEqual(await listed(), []);
  await page.getByText("No Klaviyo account is connected yet.").waitFor();
  assert.equal(new URL(page.url()).hash, "", "the token is taken out of the address");

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
  await consent(oauthAccount, "Deny");

  await notice().filter({ hasText: "Connection cancelled" }).waitFor();
  assert.equal(await notice().evaluate((e) => e === document.activeElement), true, "the message has focus");
  assert.equal(new URL(page.url()).search, "", "the outcome is shown once");
  assert.deepEqual(await listed(), []);
  await shot("03-denied");
});

test("Connect Klaviyo by keyboard and Allow: the account is listed as active", async () => {
  await page.locator("#connect-name").fill("Main store");
  await page.locator("#connect-name").press("Enter");
  await consent(oauthAccount, "Allow");

  await notice().filter({ hasText: "Klaviyo account connected." }).waitFor();
  assert.deepEqual(await listed(), ["Main store"]);
  const main = item("Main store");
  assert.equal(await main.locator(".badge").textContent(), "Active");
  assert.equal(await main.locator(".account-method").textContent(), "Klaviyo login (OAuth)");
  assert.match(await main.locator(".account-org").textContent(), new RegExp(`Org of ${oauthAccount}`));
  await shot("04-connected");
});

test("when Klaviyo stops accepting the connection, Reconnect brings it back", async () => {
  // The user removes the app in Klaviyo; the next scheduled refresh meets invalid_grant.
  await sandbox.removeApp(oauthAccount);
  await sandbox.account(oauthAccount, 3600);
  const summary = await runRefresh();
  assert.ok(summary.needs_reauth >= 1, JSON.stringify(summary));

  await page.reload();
  assert.deepEqual(await listed(), ["Main store"]);
  const main = item("Main store");
  assert.equal(await main.locator(".badge").textContent(), "Needs re-authorisation");
  const reconnect = page.getByRole("button", { name: "Reconnect Main store" });
  await reconnect.waitFor();
  await shot("05-needs-reauth");

  await reconnect.click();
  await consent(oauthAccount, "Allow");
  await notice().filter({ hasText: "Klaviyo account connected." }).waitFor();
  assert.deepEqual(await listed(), ["Main store"], "the same connection, not a second one");
  assert.equal(await item("Main store").locator(".badge").textContent(), "Active");
  assert.equal(await page.getByRole("button", { name: "Reconnect Main store" }).count(), 0);
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
  await shot("06-api-key");
});

test("Disconnect asks first; cancelling keeps the account, confirming removes and revokes it", async () => {
  const disconnectEu = page.getByRole("button", { name: "Disconnect EU store" });
  await disconnectEu.click();
  const dialog = page.getByRole("dialog");
  await dialog.getByText("Disconnect EU store?").waitFor();
  await shot("07-confirm-disconnect");
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
  await shot("08-disconnected");
});

test("nothing went wrong in the page along the way", () => {
  assert.deepEqual(problems, []);
});
