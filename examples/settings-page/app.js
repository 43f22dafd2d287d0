// The settings page of a host app, as a plain ES module: lists the user's Klaviyo
// connections, connects new ones (OAuth through Klaviyo, or a private API key), reconnects
// the ones Klaviyo stopped accepting, tests them ("Test connection"), and disconnects them. It talks to klaviyo-connect's
// HTTP API with the signed-in user's JWT, which it asks the host app for (a same-origin,
// cookie-based session endpoint) and keeps in memory only; everything shown comes from that
// API.

// The host app serves the page's settings beside it: {"apiUrl", "klaviyoAuthorizeOrigin",
// "sessionUrl", "signInUrl", "signOutUrl"?, "devSignIn"?}. Nothing is taken from the address.
const CONFIG_URL = "/settings-config.json";

const CONNECTED = "Klaviyo account connected.";
const COMPLETION_REFUSED =
  "This Klaviyo connection could not be finished: it was started by another user, has expired or was " +
  "already used. Nothing was connected by it, and any access Klaviyo granted for it has been withdrawn. " +
  "If you meant to connect, click Connect Klaviyo again.";
// A retry refused after a first attempt that failed without an answer: that attempt may have
// connected the account (the handle is one-time), so the list is the truth.
const COMPLETION_MAYBE_DONE =
  "The connection may have been finished by your earlier attempt: check the list below. If the " +
  "Klaviyo account is not there, click Connect Klaviyo again.";

const NOT_FINISHED_SIGNED_OUT =
  "You are not signed in, so the Klaviyo connection was not finished: nothing was connected, and the " +
  "access Klaviyo granted has been withdrawn. Sign in, then click Connect Klaviyo again.";

// What the callback's `?error=…` on the way back to this page means.
const FAILURES = new Map([
  ["klaviyo_connection_failed", ["error", "Klaviyo could not be connected. Nothing was changed; please try again."]],
  [
    "klaviyo_access_denied",
    ["warning", "Connection cancelled: access was not granted in Klaviyo. Nothing was connected."],
  ],
]);

// Renewing the JWT this long before it expires keeps clock skew and slow requests from
// sending an expired one.
const RENEW_EARLY_MS = 60_000;

const STATUS = {
  active: ["Active", "badge-active"],
  needs_reauth: ["Needs re-authorisation", "badge-reauth"],
};

const METHOD = { oauth: "Klaviyo login (OAuth)", api_key: "Private API key" };

// Why a connection needs re-authorisation (the list's statusReason), and what to do.
const REAUTH = {
  refresh_refused:
    "Klaviyo no longer accepts this connection (access was removed in Klaviyo or expired). Reconnect to resume syncing.",
  api_key_refused:
    "Klaviyo no longer accepts this private API key (it was deleted or changed in Klaviyo). Connect again with a new key.",
};

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- configuration and session ------------------------------------------------------------

let config;
// { token, sub, renewAt }. Only in this variable: no storage a script could read later, and
// the JWT is gone with the tab.
let session;
// Whom the page says is signed in; every request must be made as them.
let user;

async function loadConfig() {
  const response = await fetch(CONFIG_URL, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const settings = await response.json();
  return {
    ...settings,
    apiUrl: settings.apiUrl.replace(/\/+$/, ""),
    klaviyoAuthorizeOrigin: new URL(settings.klaviyoAuthorizeOrigin).origin,
  };
}

// A fresh short-lived JWT for whoever the host app's cookie says is signed in, or null. The
// cookie stays with the host app; the API sees only the JWT.
async function fetchSession() {
  const unavailable = (detail) =>
    new ApiError(0, "session", `Your sign-in could not be checked (${detail}). Please reload the page.`);
  let response;
  try {
    response = await fetch(config.sessionUrl, { headers: { Accept: "application/json" }, cache: "no-store" });
  } catch {
    throw unavailable("no answer");
  }
  if (response.status === 401) return null;
  if (!response.ok) throw unavailable(`HTTP ${response.status}`);
  const { token, sub, expiresIn } = await response.json().catch(() => ({}));
  if (typeof token !== "string" || typeof sub !== "string") throw unavailable("unreadable answer");
  return { token, sub, renewAt: Date.now() + (Number(expiresIn) || 0) * 1000 - RENEW_EARLY_MS };
}

async function startSession() {
  session = await fetchSession();
  if (!session) {
    showSignedOut();
    return false;
  }
  user = session.sub;
  $("session-user").textContent = user;
  $("session").hidden = false;
  $("klaviyo").hidden = false;
  if (config.signOutUrl) {
    $("sign-out-form").action = config.signOutUrl;
    $("sign-out-form").hidden = false;
  }
  return true;
}

function showSignedOut() {
  $("klaviyo").hidden = true;
  $("session").hidden = true;
  $("signed-out").hidden = false;
  if (config.devSignIn) {
    $("dev-sign-in").action = config.signInUrl;
    $("dev-sign-in").hidden = false;
  } else {
    $("sign-in-link").querySelector("a").href = config.signInUrl;
    $("sign-in-link").hidden = false;
  }
}

async function bearer() {
  if (!session || Date.now() >= session.renewAt) {
    session = await fetchSession();
    if (!session) {
      showSignedOut();
      throw new ApiError(401, "signed_out", "You have been signed out. Sign in again to continue.");
    }
    if (session.sub !== user) {
      // Signed in as someone else in another tab: acting for them under this name would mislead.
      session = null;
      throw new ApiError(401, "user_changed", "You are now signed in as another user. Reload this page to continue.");
    }
  }
  return session.token;
}

// ---- the API -------------------------------------------------------------------------------

async function api(method, path, body, retry = true) {
  const headers = { Authorization: `Bearer ${await bearer()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(config.apiUrl + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", "The service could not be reached or is busy. Please try again in a moment.");
  }
  if (response.status === 401 && retry) {
    // Refused for its age or a rotated key, perhaps: one fresh JWT from the host app decides.
    session = null;
    return api(method, path, body, false);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // Not JSON: handled below by status.
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "unexpected", describe(response, error));
  }
  return data;
}

// A sentence for the person in front of the page. The API's messages are written for people
// too; a few statuses get advice on what to do next.
function describe(response, error) {
  switch (response.status) {
    case 401:
      return "Your session is no longer valid. Sign in again.";
    case 429: {
      const seconds = Number(response.headers.get("retry-after"));
      const wait = seconds > 0 ? ` Try again in ${seconds} second${seconds === 1 ? "" : "s"}.` : " Try again shortly.";
      return "Too many attempts." + wait;
    }
    case 502:
    case 503:
      return error.message || "Klaviyo or the service is having trouble. Please try again in a moment.";
    default:
      return error.message || `Something went wrong (HTTP ${response.status}). Please try again.`;
  }
}

// ---- messages --------------------------------------------------------------------------------

function notify(kind, text, { focus = false } = {}) {
  const notice = $("notice");
  notice.className = `notice notice-${kind}`;
  notice.textContent = text;
  notice.hidden = false;
  if (focus) notice.focus();
}

function showFieldError(id, text, input) {
  const element = $(id);
  element.textContent = text;
  element.hidden = !text;
  if (input) {
    input.setAttribute("aria-invalid", text ? "true" : "false");
    if (text) input.focus();
  }
}

// ---- coming back from Klaviyo ----------------------------------------------------------------

// `?connected=klaviyo&completion=<handle>`: Klaviyo granted access, and the connection waits
// for this user's session to claim it. `?connected=klaviyo` alone: already connected (a
// service run with completion off). `?error=…`: nothing was connected. The address is tidied
// before any request, so the one-time handle neither stays in the history nor travels in a
// copied link, and a reload does not repeat the outcome.
function takeOutcome() {
  const query = new URLSearchParams(location.search);
  if (location.search || location.hash) {
    history.replaceState(null, "", location.pathname);
  }
  if (query.get("connected") === "klaviyo") {
    return query.has("completion") ? { completion: query.get("completion") } : { notice: ["success", CONNECTED] };
  }
  return { notice: FAILURES.get(query.get("error")) };
}

// Only the user who started a connect can claim it: when someone else's link brought this
// browser to Klaviyo, the API refuses the claim (404) and withdraws what Klaviyo granted.
async function finishConnecting(handle, retried = false) {
  const retry = $("completion-retry");
  retry.hidden = true;
  notify("info", "Finishing the connection…");
  let outcome;
  try {
    const { account } = await api("POST", "/api/oauth/connect/klaviyo/complete", { completion: handle });
    outcome = ["success", `${CONNECTED} ${account.klaviyoAccountName} is connected for ${user}.`];
  } catch (error) {
    const refused = retried ? ["info", COMPLETION_MAYBE_DONE] : ["error", COMPLETION_REFUSED];
    outcome = error.status === 404 ? refused : ["error", error.message];
    if (error.status === 401) {
      // No session to finish it with any more: withdraw it rather than leave it claimable.
      await declineConnecting(handle);
    } else if (error.status !== 404) {
      // After trouble (busy, unreachable) the service keeps the handle valid for a few minutes.
      retry.onclick = () => finishConnecting(handle, true);
      retry.hidden = false;
    }
  }
  await loadAccounts();
  notify(...outcome, { focus: true });
}

// A page that holds a handle it cannot complete (nobody is signed in) withdraws it, so the
// access Klaviyo granted does not stay claimable for the rest of its ten minutes: the person
// who clicked Allow may be an attack's victim with no account here at all. Best effort; what
// it does not reach, the service revokes when the handle expires.
async function declineConnecting(handle) {
  try {
    await fetch(`${config.apiUrl}/api/oauth/connect/klaviyo/decline`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ completion: handle }),
    });
  } catch {
    // Unreachable: the handle expires unused.
  }
}

// ---- accounts ----------------------------------------------------------------------------------

async function loadAccounts() {
  const container = $("accounts");
  container.setAttribute("aria-busy", "true");
  try {
    const { accounts } = await api("GET", "/api/oauth/accounts");
    renderAccounts(accounts);
  } catch (error) {
    container.replaceChildren(paragraph("muted", "Your connected accounts could not be loaded."));
    notify("error", error.message);
  } finally {
    container.setAttribute("aria-busy", "false");
  }
}

function paragraph(className, text) {
  const p = document.createElement("p");
  p.className = className;
  p.textContent = text;
  return p;
}

function renderAccounts(accounts) {
  const container = $("accounts");
  if (accounts.length === 0) {
    container.replaceChildren(paragraph("muted empty", "No Klaviyo account is connected yet."));
    return;
  }
  const list = document.createElement("ul");
  list.className = "accounts";
  for (const account of accounts) {
    list.append(renderAccount(account));
  }
  container.replaceChildren(list);
}

function renderAccount(account) {
  const item = $("account-template").content.firstElementChild.cloneNode(true);
  item.dataset.id = account.id;
  item.querySelector(".account-name").textContent = account.accountName;
  item.querySelector(".account-org").textContent =
    `${account.klaviyoAccountName} · account ${account.klaviyoAccountId}`;
  const [label, badgeClass] = STATUS[account.status] || [account.status, ""];
  const badge = item.querySelector(".badge");
  badge.textContent = label;
  badge.classList.add(badgeClass);
  item.querySelector(".account-method").textContent = METHOD[account.authType] || account.authType;
  item.querySelector(".account-connected").replaceChildren(time(account.connectedAt));
  if (account.lastRefreshedAt) {
    item.querySelector(".account-refreshed").replaceChildren(time(account.lastRefreshedAt));
  } else {
    item.querySelector(".account-refreshed-row").remove();
  }
  if (account.lastVerifiedAt) {
    item.querySelector(".account-verified").replaceChildren(time(account.lastVerifiedAt));
  } else {
    item.querySelector(".account-verified-row").remove();
  }

  const reconnect = item.querySelector(".reconnect");
  const verify = item.querySelector(".verify");
  const disconnect = item.querySelector(".disconnect");
  const name = account.accountName;
  disconnect.setAttribute("aria-label", `Disconnect ${name}`);
  disconnect.addEventListener("click", () => confirmDisconnect(account, disconnect));
  verify.setAttribute("aria-label", `Test connection ${name}`);
  verify.addEventListener("click", () => testConnection(account, verify));
  if (account.status === "needs_reauth") {
    item.classList.add("account-needs-reauth");
    const reauth = item.querySelector(".account-reauth");
    reauth.textContent = REAUTH[account.statusReason] || REAUTH.refresh_refused;
    reauth.hidden = false;
    // Klaviyo is not asked again until the user reconnects: nothing to test.
    verify.hidden = true;
    if (account.authType === "oauth") {
      reconnect.hidden = false;
      reconnect.setAttribute("aria-label", `Reconnect ${name}`);
      reconnect.addEventListener("click", () => startConnect(name, reconnect));
    }
  }
  return item;
}

function time(rfc3339) {
  const element = document.createElement("time");
  const date = new Date(rfc3339);
  element.dateTime = rfc3339;
  element.textContent = Number.isNaN(date.getTime()) ? rfc3339 : dateFormat.format(date);
  return element;
}

// ---- connecting ----------------------------------------------------------------------------------

// The same rules the API applies (1–100 characters after trimming, no control characters),
// checked here first so the person gets an answer without a round trip.
function accountNameProblem(name) {
  if ([...name].length > 100) return "The account name can be at most 100 characters.";
  if (/[\u0000-\u001f\u007f-\u009f]/.test(name)) return "The account name cannot contain control characters.";
  return "";
}

async function busy(button, text, work) {
  const original = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.textContent = text;
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = original;
  }
}

// The API builds the authorize URL, but the page follows it only to the Klaviyo it was
// configured with, over https (plain http only on this machine, for the local sandbox): a
// compromised or misconfigured API cannot send people to a lookalike sign-in page.
function isKlaviyoAuthorizeUrl(url) {
  try {
    const target = new URL(url);
    const local = ["127.0.0.1", "localhost", "[::1]"].includes(target.hostname);
    const secure = target.protocol === "https:" || (target.protocol === "http:" && local);
    return secure && target.origin === config.klaviyoAuthorizeOrigin;
  } catch {
    return false;
  }
}

// Asks the service for Klaviyo's authorize URL and goes there; Klaviyo sends the browser back
// to this page with the outcome.
async function startConnect(accountName, button, errorId) {
  const name = accountName.trim();
  const problem = accountNameProblem(name);
  if (problem) {
    fail(problem);
    return;
  }
  const query = name ? `?accountName=${encodeURIComponent(name)}` : "";
  try {
    const { authUrl } = await busy(button, "Opening Klaviyo…", () =>
      api("GET", `/api/oauth/connect/klaviyo${query}`),
    );
    if (!isKlaviyoAuthorizeUrl(authUrl)) {
      fail(
        `Klaviyo was not opened: the service sent an address outside ${config.klaviyoAuthorizeOrigin}, ` +
          "which this page does not follow. Nothing was connected.",
      );
      return;
    }
    button.disabled = true;
    location.assign(authUrl);
  } catch (error) {
    fail(error.message);
  }

  function fail(text) {
    if (errorId) {
      showFieldError(errorId, text, $("connect-name"));
    } else {
      notify("error", text, { focus: true });
    }
  }
}

async function connectWithApiKey(form) {
  const key = $("api-key");
  const name = $("api-key-name").value.trim();
  // A new attempt by either method replaces what an earlier one reported.
  showFieldError("connect-error", "", $("connect-name"));
  showFieldError("api-key-error", "");
  if (!key.value.trim()) {
    showFieldError("api-key-error", "Paste your private API key.", key);
    return;
  }
  const problem = accountNameProblem(name);
  if (problem) {
    showFieldError("api-key-error", problem, $("api-key-name"));
    return;
  }
  const body = { apiKey: key.value.trim() };
  if (name) body.accountName = name;
  try {
    const { account } = await busy($("api-key-button"), "Checking the key with Klaviyo…", () =>
      api("POST", "/api/oauth/connect/klaviyo/api-key", body),
    );
    form.reset();
    $("api-key-details").open = false;
    await loadAccounts();
    notify("success", `${account.accountName} connected with a private API key.`, { focus: true });
  } catch (error) {
    // The message is announced (role="alert"); a refused key puts the cursor back in it.
    showFieldError("api-key-error", error.message, error.code === "invalid_api_key" ? key : null);
  }
}

// ---- testing ---------------------------------------------------------------------------------------

// "Test connection": the service asks Klaviyo with the stored credential and answers the
// connection as it is now; the list is redrawn from that answer's truth.
async function testConnection(account, trigger) {
  const name = account.accountName;
  let outcome;
  try {
    const { account: tested } = await busy(trigger, "Testing…", () =>
      api("POST", `/api/oauth/accounts/${encodeURIComponent(account.id)}/verify`),
    );
    outcome = tested.status === "active"
      ? ["success", `${name} works: Klaviyo accepted the connection.`]
      : ["warning", `${name} needs re-authorisation: ${REAUTH[tested.statusReason] || REAUTH.refresh_refused}`];
  } catch (error) {
    outcome = error.status === 404
      ? ["warning", `${name} was already disconnected.`]
      : ["error", `${name} could not be tested: ${error.message}`];
  }
  await loadAccounts();
  notify(...outcome, { focus: true });
}

// ---- disconnecting -------------------------------------------------------------------------------

function confirmDisconnect(account, trigger) {
  const dialog = $("confirm-disconnect");
  $("confirm-name").textContent = account.accountName;
  dialog.returnValue = "";
  dialog.addEventListener(
    "close",
    async () => {
      if (dialog.returnValue !== "confirm") {
        trigger.focus();
        return;
      }
      let outcome;
      try {
        await busy(trigger, "Disconnecting…", () =>
          api("DELETE", `/api/oauth/accounts/${encodeURIComponent(account.id)}`),
        );
        outcome = ["success", `${account.accountName} disconnected.`];
      } catch (error) {
        // Already gone (another tab, another device): the list below is the truth.
        outcome = error.status === 404
          ? ["warning", `${account.accountName} was already disconnected.`]
          : ["error", error.message];
      }
      await loadAccounts();
      notify(...outcome);
      $("accounts-heading").focus();
    },
    { once: true },
  );
  dialog.showModal();
}

// ---- wiring --------------------------------------------------------------------------------------

async function start() {
  const outcome = takeOutcome();
  try {
    config = await loadConfig();
  } catch {
    notify("error", "This page is not set up: its settings could not be loaded.");
    return;
  }
  try {
    if (!(await startSession())) {
      if (outcome.completion != null) await declineConnecting(outcome.completion);
      const notice = outcome.completion == null ? outcome.notice : ["warning", NOT_FINISHED_SIGNED_OUT];
      if (notice) notify(...notice, { focus: true });
      return;
    }
  } catch (error) {
    if (outcome.completion != null) await declineConnecting(outcome.completion);
    notify("error", error.message);
    return;
  }

  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    showFieldError("connect-error", "");
    startConnect($("connect-name").value, $("connect-button"), "connect-error");
  });

  $("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connectWithApiKey(event.currentTarget);
  });

  if (outcome.completion != null) {
    await finishConnecting(outcome.completion);
    return;
  }
  if (outcome.notice) notify(...outcome.notice, { focus: true });
  await loadAccounts();
}

start();
