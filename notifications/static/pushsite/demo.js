// The demo page (/demo/, local profile only): wires pushsite-client.js to the page.
//
// Timings can be shortened from the query string, in milliseconds, for tests and
// for watching the reconnect logic: ?reconnect=2000,5000,10000&heartbeat=5000
// &heartbeatTimeout=2000&loginRetry=3000&configTtl=60000&connectTimeout=5000

import { MsgType, PushClient } from "./pushsite-client.js";

const $ = (id) => document.getElementById(id);
const KIND_NAMES = { [MsgType.COMMENT]: "comment", [MsgType.SYSTEM_NOTICE]: "system", [MsgType.USER_NOTICE]: "notice" };

function optionsFromQuery(search) {
  const params = new URLSearchParams(search);
  const options = {};
  const number = (text) => {
    const value = Number(text);
    return Number.isFinite(value) && value >= 0 ? value : undefined;
  };
  if (params.has("reconnect")) {
    const delays = params.get("reconnect").split(",").map(number);
    if (delays.every((d) => d !== undefined)) options.reconnectDelaysMs = delays;
  }
  const names = {
    heartbeat: "heartbeatMs",
    heartbeatTimeout: "heartbeatTimeoutMs",
    loginRetry: "loginRetryMs",
    configTtl: "configTtlMs",
    connectTimeout: "connectTimeoutMs",
  };
  for (const [param, option] of Object.entries(names)) {
    const value = params.has(param) ? number(params.get(param)) : undefined;
    if (value !== undefined) options[option] = value;
  }
  return options;
}

const client = new PushClient(optionsFromQuery(window.location.search));
window.pushDemo = { client }; // for the browser console

// --- unread bookkeeping: the badge is the unread list plus what the server counted beyond it ---

const unread = new Map(); // noce_ack -> notification
let uncounted = 0; // unread on the server but not listed (beyond the list's limit)
let awaitingList = false; // between LOGIN (counts only) and the first UNREAD reply

const total = (counts) => Object.values(counts ?? {}).reduce((sum, n) => sum + n, 0);

function renderBadge() {
  const count = unread.size + uncounted;
  const badge = $("badge");
  badge.textContent = String(count);
  badge.dataset.count = String(count);
  badge.classList.toggle("zero", count === 0);
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(item);
  while ($("log").children.length > 60) $("log").lastChild.remove();
}

function noticeElement(notice) {
  const item = document.createElement("li");
  item.className = `notice ${unread.has(notice.noce_ack) ? "unread" : "read"}`;
  item.dataset.noceAck = notice.noce_ack;
  item.title = "Click to mark read";
  const kind = document.createElement("span");
  kind.className = "kind";
  kind.textContent = KIND_NAMES[notice.msg_type] ?? `type ${notice.msg_type}`;
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = notice.body?.title ?? notice.body?.text ?? JSON.stringify(notice.body);
  const meta = document.createElement("span");
  meta.className = "meta";
  const parts = [notice.uid ? `from uid ${notice.uid}` : "from the system", new Date(timeOf(notice)).toLocaleString()];
  if (notice.body?.title && notice.body?.text) parts.push(notice.body.text);
  meta.textContent = parts.join(" · ");
  item.append(kind, title, meta);
  item.addEventListener("click", () => markRead(notice.noce_ack));
  return item;
}

// Listed items carry the server's create_time; live pushes carry none, so they get their arrival.
const timeOf = (notice) => notice.create_time ?? notice.receivedAt;

/** The history is what is unread now: the last list from the server plus what arrived since. */
function renderHistory() {
  const items = [...unread.values()].sort((a, b) => timeOf(b) - timeOf(a));
  $("history-list").replaceChildren(...items.map(noticeElement));
  const byType = {};
  for (const item of items) byType[item.msg_type] = (byType[item.msg_type] ?? 0) + 1;
  const parts = Object.entries(byType).map(([type, n]) => `${n} ${KIND_NAMES[type] ?? type}`);
  if (uncounted) parts.push(`${uncounted} more not listed`);
  $("history-counts").textContent = parts.length ? `Unread: ${parts.join(", ")}.` : "";
  renderBadge();
}

function markRead(noceAck) {
  if (!unread.has(noceAck)) return;
  unread.delete(noceAck);
  for (const item of document.querySelectorAll(`#live-list .notice[data-noce-ack="${CSS.escape(noceAck)}"]`)) {
    item.classList.replace("unread", "read");
  }
  renderHistory();
  client
    .ack(noceAck)
    .then((acked) => {
      log(`ack ${noceAck.slice(0, 8)}…: ${acked} marked read`);
      return client.fetchUnread();
    })
    .catch((error) => log(`ack ${noceAck.slice(0, 8)}…: ${error.message} (sent again after the next login)`));
}

// --- client events ---

const STATE_TEXT = {
  closed: "not connected",
  connecting: "opening the socket",
  open: "connected, not logged in",
  "logged-in": "",
  reconnecting: "",
  "gave-up": "gave up reconnecting",
};

client.addEventListener("state", ({ detail }) => {
  const state = $("state");
  state.textContent = detail.state;
  state.dataset.state = detail.state;
  let text = STATE_TEXT[detail.state] ?? "";
  if (detail.state === "reconnecting") {
    text = `attempt ${detail.attempt} of ${detail.of} in ${(detail.inMs / 1000).toFixed(1)} s`;
  }
  $("state-detail").textContent = text;
  $("logout-btn").disabled = detail.state !== "logged-in";
  $("reconnect-btn").hidden = detail.state !== "gave-up";
  if (detail.state !== "logged-in") $("who").textContent = "not logged in";
  log(`state: ${detail.state}${text ? ` (${text})` : ""}${detail.reason ? `, ${detail.reason}` : ""}`);
});

client.addEventListener("login", ({ detail }) => {
  $("who").textContent = `uid ${detail.uid}`;
  if (!$("send-uid").value) $("send-uid").value = String(detail.uid);
  unread.clear();
  uncounted = total(detail.unread);
  awaitingList = true;
  renderHistory();
  log(`logged in as uid ${detail.uid}, ${uncounted} unread`);
});

client.addEventListener("message", ({ detail }) => {
  const notice = { ...detail, receivedAt: Date.now() };
  if (!unread.has(notice.noce_ack)) {
    unread.set(notice.noce_ack, notice);
    // Replayed at login, it is already in the LOGIN counts.
    if (awaitingList && uncounted > 0) uncounted -= 1;
  }
  $("live-list").prepend(noticeElement(notice));
  renderHistory();
  log(`${KIND_NAMES[detail.msg_type] ?? detail.msg_type} arrived: ${detail.noce_ack.slice(0, 8)}…`);
});

client.addEventListener("unread", ({ detail }) => {
  window.pushDemo.lastUnread = detail;
  awaitingList = false;
  unread.clear();
  for (const item of detail.items) unread.set(item.noce_ack, item);
  uncounted = Math.max(0, total(detail.counts) - detail.items.length);
  for (const item of document.querySelectorAll("#live-list .notice.unread")) {
    if (!unread.has(item.dataset.noceAck)) item.classList.replace("unread", "read");
  }
  renderHistory();
  log(`unread list: ${detail.items.length} listed, ${total(detail.counts)} in all`);
});

client.addEventListener("error", ({ detail }) => log(`error ${detail.code}: ${detail.msg}`));

// --- page controls ---

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const ukey = $("ukey").value.trim();
  if (ukey) client.login({ ukey });
});

$("logout-btn").addEventListener("click", () => {
  client.logout().catch((error) => log(`logout: ${error.message}`));
  unread.clear();
  uncounted = 0;
  renderHistory();
});

$("reconnect-btn").addEventListener("click", () => client.connect());

$("refresh-btn").addEventListener("click", () => {
  client.fetchUnread().catch((error) => log(`unread: ${error.message}`));
});

$("send-kind").addEventListener("change", () => {
  for (const element of document.querySelectorAll(".comment-only")) {
    element.hidden = $("send-kind").value !== "comment";
  }
});

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const result = $("send-result");
  result.textContent = "sending…";
  try {
    const response = await fetch(form.action, { method: "POST", body: new FormData(form) });
    const answer = await response.json();
    if (!response.ok) {
      result.textContent = `refused (${answer.code}): ${answer.msg}`;
      return;
    }
    const acks = Object.values(answer.data.noce_acks ?? {});
    result.textContent = `stored ${answer.data.stored}, sent live to ${answer.data.sent}: ${acks.join(", ")}`;
  } catch (error) {
    result.textContent = `failed: ${error.message}`;
  }
});

client.connect();
