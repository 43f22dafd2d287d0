// The settings page of a host app, as a plain ES module: lists the user's Klaviyo
// connections, connects new ones (OAuth through Klaviyo, or a private API key), reconnects
// the ones Klaviyo stopped accepting, and disconnects them. It talks to klaviyo-connect's
// HTTP API with the user's JWT; everything shown comes from that API.

const CONFIG_KEYS = { api: "klaviyo-connect.api", token: "klaviyo-connect.token" };

// What the callback's redirect back to this page means (`/settings?…`).
const OUTCOMES = {
  "connected=klaviyo": ["success", "Klaviyo account connected."],
  "error=klaviyo_connection_failed": [
    "error",
    "Klaviyo could not be connected. Nothing was changed; please try again.",
  ],
  "error=klaviyo_access_denied": [
    "warning",
    "Connection cancelled: access was not granted in Klaviyo. Nothing was connected.",
  ],
};

const STATUS = {
  active: ["Active", "badge-active"],
  needs_reauth: ["Needs re-authorisation", "badge-reauth"],
};

const METHOD = { oauth: "Klaviyo login (OAuth)", api_key: "Private API key" };

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- configuration: the API's URL and the user's JWT ------------------------------------

// Taken from the address's fragment (never sent to a server) on first load, then kept for
// this tab only. A real host app passes its own API URL and session token instead.
function loadConfig() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("api") && fragment.get("token")) {
    saveConfig(fragment.get("api"), fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return {
    api: sessionStorage.getItem(CONFIG_KEYS.api),
    token: sessionStorage.getItem(CONFIG_KEYS.token),
  };
}

function saveConfig(api, token) {
  sessionStorage.setItem(CONFIG_KEYS.api, api.trim().replace(/\/+$/, ""));
  sessionStorage.setItem(CONFIG_KEYS.token, token.trim());
}

let config = loadConfig();

// ---- the API -------------------------------------------------------------------------------

async function api(method, path, body) {
  if (!config.api || !config.token) {
    throw new ApiError(0, "not_configured", "Set the API URL and a JWT under “Connection to the service”.");
  }
  const headers = { Authorization: `Bearer ${config.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(config.api + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "network", "The service could not be reached or is busy. Please try again in a moment.");
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
      return "Your session is no longer valid. Sign in again (here: set a fresh JWT below).";
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

// The redirect back from a connect attempt: say what happened once, then tidy the address so
// a reload does not say it again.
function showOutcome() {
  const query = location.search.slice(1);
  const outcome = OUTCOMES[query];
  if (outcome) {
    notify(outcome[0], outcome[1], { focus: true });
  }
  if (query) {
    history.replaceState(null, "", location.pathname);
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

  const reconnect = item.querySelector(".reconnect");
  const disconnect = item.querySelector(".disconnect");
  const name = account.accountName;
  disconnect.setAttribute("aria-label", `Disconnect ${name}`);
  disconnect.addEventListener("click", () => confirmDisconnect(account, disconnect));
  if (account.status === "needs_reauth") {
    item.classList.add("account-needs-reauth");
    item.querySelector(".account-reauth").hidden = false;
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

function start() {
  showOutcome();

  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    showFieldError("connect-error", "");
    startConnect($("connect-name").value, $("connect-button"), "connect-error");
  });

  $("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connectWithApiKey(event.currentTarget);
  });

  const setup = $("setup-form");
  $("setup-api").value = config.api || "";
  $("setup-token").value = config.token || "";
  if (!config.api || !config.token) $("setup").open = true;
  setup.addEventListener("submit", (event) => {
    event.preventDefault();
    saveConfig($("setup-api").value, $("setup-token").value);
    config = loadConfig();
    $("setup").open = false;
    notify("success", "Saved.");
    loadAccounts();
  });

  loadAccounts();
}

start();
