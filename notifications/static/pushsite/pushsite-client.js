/**
 * pushsite browser client: one dependency-free ES module (docs/client.md).
 *
 *   import { PushClient } from "/static/pushsite/pushsite-client.js";
 *   const push = new PushClient();
 *   push.addEventListener("message", (event) => show(event.detail));
 *   push.login({ ukey: "..." });
 *
 * Invariants (PROTOCOL.md section 1, "Client behaviour"):
 * - a heartbeat goes out heartbeatMs after the last frame received; any frame
 *   received restarts that timer;
 * - an unanswered heartbeat is sent once more after heartbeatTimeoutMs, and
 *   after another heartbeatTimeoutMs of silence the socket counts as dead;
 * - after a loss, reconnect attempt n starts reconnectDelaysMs[n-1], stretched by
 *   a random 0 to 20 %, after the moment of the loss (never before, never two
 *   at once); when all attempts failed the state is "gave-up" and nothing is
 *   tried until connect();
 * - after a KICK 503 with body.retry_after, the next attempt starts retry_after
 *   seconds (plus the same jitter) after the close instead, and still counts as
 *   one of the attempts; a close 1000 stays final, whatever the KICK said;
 * - a refused login is retried every loginRetryMs until it succeeds; after a
 *   reconnect the client logs in again and fetches the unread list;
 * - GET /api/push/config is read at most once per configTtlMs;
 * - a pushed notification is reported once per noce_ack ("message" event).
 *
 * Guarded by tests/js/client.test.mjs (timings and states, fake timers) and
 * tests/e2e/test_demo_browser.py (the demo page in headless Chromium).
 */

export const MsgType = Object.freeze({
  LOGIN: 1,
  LOGOUT: 2,
  HEARTBEAT: 3,
  ACK: 4,
  COMMENT: 5,
  SYSTEM_NOTICE: 6,
  USER_NOTICE: 7,
  UNREAD: 8,
  ERROR: 9,
  KICK: 10,
});

export const State = Object.freeze({
  CLOSED: "closed",
  CONNECTING: "connecting",
  OPEN: "open",
  LOGGED_IN: "logged-in",
  RECONNECTING: "reconnecting",
  GAVE_UP: "gave-up",
});

const NOTIFICATION_TYPES = new Set([MsgType.COMMENT, MsgType.SYSTEM_NOTICE, MsgType.USER_NOTICE]);
const WS_OPEN = 1; // WebSocket.OPEN, written out so a replacement class needs no statics
const MAX_ACKS_PER_FRAME = 500; // the server refuses longer noce_acks lists
const MIN_CONFIG_TTL_MS = 5 * 60 * 1000;
const MAX_CONFIG_TTL_MS = 10 * 60 * 1000;
// Up to this fraction is added to every reconnect delay, so that the clients a
// restart dropped together do not all come back in the same second.
const RECONNECT_JITTER = 0.2;

/** Timing options, their protocol defaults, and the /api/push/config key (seconds) behind each. */
const TIMINGS = {
  heartbeatMs: { fallback: 180000, key: "heartbeat" },
  heartbeatTimeoutMs: { fallback: 30000, key: "heartbeat_timeout" },
  reconnectDelaysMs: { fallback: [60000, 120000, 180000], key: "reconnect_delays" },
  loginRetryMs: { fallback: 30000, key: "login_retry" },
  configTtlMs: { fallback: MIN_CONFIG_TTL_MS, key: "config_ttl" },
  connectTimeoutMs: { fallback: 30000, key: null },
};

export const DEFAULTS = Object.freeze({
  baseUrl: "",
  wsUrl: null,
  unreadLimit: 50,
  dedupeSize: 1000,
  ...Object.fromEntries(Object.entries(TIMINGS).map(([name, timing]) => [name, timing.fallback])),
});

/** A refused request (ERROR frame) or a request cut off by a lost connection (code 0). */
export class PushError extends Error {
  constructor(code, msg, frame = null) {
    super(`${code}: ${msg}`);
    this.name = "PushError";
    this.code = code;
    this.msg = msg;
    this.frame = frame;
  }
}

/** The wait a KICK 503 asks for (body.retry_after, seconds) in ms, or null when it names none. */
function kickRetryAfterMs(frame) {
  const seconds = frame.code === 503 ? frame.body?.retry_after : undefined;
  return typeof seconds === "number" && Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : null;
}

export class PushClient extends EventTarget {
  /**
   * @param {object} [options] baseUrl, wsUrl, timings in milliseconds (see
   *   DEFAULTS), unreadLimit, dedupeSize, and the injection points fetch,
   *   WebSocket, setTimeout, clearTimeout, now and random (like Math.random).
   */
  constructor(options = {}) {
    super();
    this._options = { ...options };
    // Looked up at call time, so fake timers installed after construction apply.
    this._fetch = options.fetch ?? ((...args) => globalThis.fetch(...args));
    this._WebSocket = options.WebSocket ?? null;
    this._setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    this._now = options.now ?? (() => Date.now());
    this._random = options.random ?? (() => Math.random());

    this._state = State.CLOSED;
    this._config = null;
    this._configAt = 0;
    this._ws = null;
    this._currentAttempt = null; // the connection attempt under way, if any
    this._wanted = false; // the page wants a connection (connect() until close())
    this._credentials = null;
    this._uid = 0;
    this._unreadCounts = {};
    this._seq = 0;
    this._pending = new Map(); // seq -> {resolve, reject}
    this._seen = new Set(); // noce_acks already reported, oldest first
    this._acksToSend = new Set();
    this._acksInFlight = new Set();
    this._lossAt = null; // when the current loss began; null while connected
    this._attempt = 0; // reconnect attempts made since _lossAt
    this._retryAfterMs = null; // a KICK's retry_after, for the close that follows it
    this._heartbeatsUnanswered = 0;
    this._loginInFlight = false;
    this._timers = { heartbeat: null, reconnect: null, loginRetry: null, connect: null };
  }

  get state() {
    return this._state;
  }

  /** The uid the socket is logged in as, 0 when anonymous. */
  get uid() {
    return this._uid;
  }

  /** Unread counts by msg_type, from the last LOGIN or UNREAD reply. */
  get unreadCounts() {
    return { ...this._unreadCounts };
  }

  get config() {
    return this._config;
  }

  /** Open the socket (a no-op while connected); after "gave-up" it starts over. */
  connect() {
    this._wanted = true;
    if ([State.CONNECTING, State.OPEN, State.LOGGED_IN].includes(this._state)) return;
    this._clearTimer("reconnect");
    this._dropSocket(); // a reconnect attempt under way is replaced, not left open beside the new one
    this._lossAt = null;
    this._attempt = 0;
    this._retryAfterMs = null;
    this._setState(State.CONNECTING);
    this._open();
  }

  /** Log in with {ukey} (web) or {token} (app); retried every loginRetryMs until it succeeds. */
  login(credentials) {
    const { ukey, token } = credentials ?? {};
    if ((ukey === undefined) === (token === undefined)) {
      throw new TypeError("login needs exactly one of ukey or token");
    }
    const key = ukey ?? token;
    if (typeof key !== "string" || !key.trim()) throw new TypeError("the login key must be a non-empty string");
    const switching = this._state === State.LOGGED_IN;
    this._credentials = ukey !== undefined ? { ukey } : { token };
    this._clearTimer("loginRetry");
    if (switching) {
      this._switchUser();
    } else if (this._state === State.OPEN && !this._loginInFlight) {
      this._sendLogin();
    } else if (!this._wanted) {
      this.connect();
    }
  }

  /** Forget the credentials and leave the user's delivery; the socket stays open. */
  logout() {
    this._credentials = null;
    this._clearTimer("loginRetry");
    if (this._state !== State.LOGGED_IN) return Promise.resolve(null);
    return this._request("logout").then((frame) => {
      this._afterLogout();
      return frame.body;
    });
  }

  /**
   * Mark notifications read. Acks given while not logged in are kept and sent
   * after the next login. Resolves with the number the server marked read.
   */
  ack(noceAcks) {
    for (const noceAck of [].concat(noceAcks)) {
      if (typeof noceAck === "string" && noceAck) this._acksToSend.add(noceAck);
    }
    return this._flushAcks();
  }

  /** Ask for the unread list ({limit, msgType}); the answer also comes as an "unread" event. */
  fetchUnread({ limit, msgType } = {}) {
    if (this._state !== State.LOGGED_IN) return Promise.reject(new PushError(403, "unread needs login"));
    const ceiling = this._config?.unread_limit ?? 200;
    const body = { limit: Math.max(1, Math.min(limit ?? this._options.unreadLimit ?? DEFAULTS.unreadLimit, ceiling)) };
    if (msgType !== undefined) body.msg_type = msgType;
    return this._request("unread", body).then((frame) => {
      this._unreadCounts = { ...frame.body.counts };
      for (const item of frame.body.items) this._remember(item.noce_ack);
      this._emit("unread", frame.body);
      return frame.body;
    });
  }

  /** Close the socket and stop every timer; connect() starts again with the same credentials. */
  close() {
    this._wanted = false;
    for (const name of Object.keys(this._timers)) this._clearTimer(name);
    this._lossAt = null;
    this._attempt = 0;
    this._retryAfterMs = null;
    this._dropSocket(1000, "client closed");
    this._setState(State.CLOSED);
  }

  // --- timings and configuration ---------------------------------------------

  /** A timing option: given explicitly, else from the server's config, else the protocol default. */
  _timing(name) {
    const timing = TIMINGS[name];
    if (this._options[name] !== undefined) return this._options[name];
    const fromServer = timing.key && this._config ? this._config[timing.key] : undefined;
    if (fromServer === undefined || fromServer === null) return timing.fallback;
    const ms = Array.isArray(fromServer) ? fromServer.map((s) => s * 1000) : fromServer * 1000;
    // The contract asks clients to cache the config for 5 to 10 minutes, whatever it says.
    return name === "configTtlMs" ? Math.min(MAX_CONFIG_TTL_MS, Math.max(MIN_CONFIG_TTL_MS, ms)) : ms;
  }

  _configUrl() {
    const base = this._options.baseUrl ?? DEFAULTS.baseUrl;
    return `${base.replace(/\/+$/, "")}/api/push/config`;
  }

  /** The config, from the cache while it is fresh; a stale one (or none, given wsUrl) if a read fails. */
  async _loadConfig(signal) {
    if (this._config && this._now() - this._configAt < this._timing("configTtlMs")) return this._config;
    try {
      const response = await this._fetch(this._configUrl(), { headers: { Accept: "application/json" }, signal });
      if (!response.ok) throw new Error(`config answered HTTP ${response.status}`);
      const config = await response.json();
      if (!config || typeof config.ws_url !== "string") throw new Error("config has no ws_url");
      this._config = config;
      this._configAt = this._now();
    } catch (error) {
      // With a wsUrl of its own the client can run on the defaults (a page on another origin
      // may not be allowed to read the config); without one it has nowhere to connect.
      if (!this._config && !this._options.wsUrl) throw error;
      const fallback = this._config ? "the cached one" : "the defaults";
      this._emit("error", { code: 0, msg: `config read failed, using ${fallback}: ${error.message}` });
    }
    return this._config ?? {};
  }

  // --- the socket --------------------------------------------------------------

  /** One connection attempt; a failure counts as (part of) a loss. */
  async _open() {
    const attempt = {};
    this._currentAttempt = attempt;
    const controller = typeof AbortController === "function" ? new AbortController() : null;
    this._setTimer("connect", this._timing("connectTimeoutMs"), () => {
      controller?.abort();
      this._attemptFailed(attempt, "connect timeout");
    });
    let config;
    try {
      config = await this._loadConfig(controller?.signal);
    } catch (error) {
      this._attemptFailed(attempt, `config: ${error.message}`);
      return;
    }
    if (this._currentAttempt !== attempt) return; // timed out or closed meanwhile
    let ws;
    try {
      const WebSocketClass = this._WebSocket ?? globalThis.WebSocket;
      ws = new WebSocketClass(this._options.wsUrl ?? config.ws_url);
    } catch (error) {
      this._attemptFailed(attempt, `socket: ${error.message}`);
      return;
    }
    this._ws = ws;
    ws.onopen = () => ws === this._ws && this._onOpen();
    ws.onmessage = (event) => ws === this._ws && this._onFrame(event.data);
    ws.onclose = (event) => ws === this._ws && this._onClose(event);
    ws.onerror = () => {}; // a close event always follows; it decides
  }

  _attemptFailed(attempt, reason) {
    if (this._currentAttempt !== attempt) return;
    this._currentAttempt = null;
    this._clearTimer("connect");
    this._dropSocket();
    this._lost(reason);
  }

  _onOpen() {
    this._currentAttempt = null;
    this._clearTimer("connect");
    this._heartbeatsUnanswered = 0;
    this._armHeartbeat(this._timing("heartbeatMs"));
    this._setState(State.OPEN);
    if (this._credentials) this._sendLogin();
    else this._recovered(); // nothing to restore on an anonymous socket
  }

  _onClose(event) {
    const wasOpening = this._currentAttempt !== null;
    this._currentAttempt = null;
    this._clearTimer("connect");
    this._ws = null;
    this._stopSession(`connection closed (${event.code})`);
    // 1000 from the server means it ended the session on purpose, and 4001 that a
    // newer socket of the user took this one's place: do not come back on our own.
    if ((event.code === 1000 || event.code === 4001) && !wasOpening) {
      this._wanted = false;
      this._lossAt = null;
      this._retryAfterMs = null;
      this._setState(State.CLOSED, { code: event.code, reason: event.reason });
      return;
    }
    this._lost(`closed with ${event.code}`, event.code);
  }

  /** The connection is gone (or an attempt failed): schedule the next attempt, or give up. */
  _lost(reason, code) {
    this._stopSession(reason);
    const retryAfterMs = this._retryAfterMs;
    this._retryAfterMs = null; // it answers this close only
    if (!this._wanted) {
      this._setState(State.CLOSED, { reason });
      return;
    }
    if (this._lossAt === null) {
      this._lossAt = this._now();
      this._attempt = 0;
    }
    const delays = this._timing("reconnectDelaysMs");
    if (this._attempt >= delays.length) {
      this._wanted = false;
      this._setState(State.GAVE_UP, { attempts: this._attempt, reason, code });
      return;
    }
    // Attempts are timed from the loss, not from each other: 60, 120, 180 s after it.
    // A server that is too busy to log us in says when to come back; that replaces
    // the schedule for this attempt, earlier or later.
    const from = retryAfterMs === null ? this._lossAt : this._now();
    const delayMs = retryAfterMs ?? delays[this._attempt];
    const jitterMs = Math.round(delayMs * RECONNECT_JITTER * this._random());
    const waitMs = Math.max(0, from + delayMs + jitterMs - this._now());
    this._attempt += 1;
    const detail = { attempt: this._attempt, of: delays.length, inMs: waitMs, reason, code };
    if (retryAfterMs !== null) detail.retryAfterMs = retryAfterMs;
    this._setState(State.RECONNECTING, detail);
    this._setTimer("reconnect", waitMs, () => this._open());
  }

  /** The new socket works: the next loss starts a new schedule. */
  _recovered() {
    this._lossAt = null;
    this._attempt = 0;
  }

  _dropSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._currentAttempt = null;
    this._clearTimer("connect");
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    this._stopSession("connection closed");
  }

  /** Forget everything that belonged to the socket: login, timers, pending requests. */
  _stopSession(reason) {
    this._clearTimer("heartbeat");
    this._clearTimer("loginRetry");
    this._uid = 0;
    this._loginInFlight = false;
    this._acksInFlight.clear();
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const { reject } of pending) reject(new PushError(0, reason));
  }

  // --- heartbeat -----------------------------------------------------------------

  _armHeartbeat(ms) {
    this._setTimer("heartbeat", ms, () => this._heartbeatDue());
  }

  _heartbeatDue() {
    if (this._heartbeatsUnanswered >= 2) {
      this._dropSocket();
      this._lost("no answer to two heartbeats");
      return;
    }
    this._heartbeatsUnanswered += 1;
    this._send("heartbeat");
    this._armHeartbeat(this._timing("heartbeatTimeoutMs"));
  }

  // --- frames ----------------------------------------------------------------------

  _send(action, body) {
    const frame = { action, seq: ++this._seq };
    if (body !== undefined) frame.body = body;
    if (this._ws && this._ws.readyState === WS_OPEN) this._ws.send(JSON.stringify(frame));
    return frame.seq;
  }

  _request(action, body) {
    if (!this._ws || this._ws.readyState !== WS_OPEN) {
      return Promise.reject(new PushError(0, `${action}: not connected`));
    }
    return new Promise((resolve, reject) => {
      this._pending.set(this._send(action, body), { resolve, reject });
    });
  }

  _onFrame(text) {
    this._heartbeatsUnanswered = 0;
    this._armHeartbeat(this._timing("heartbeatMs"));
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._emit("error", { code: 0, msg: "the server sent a frame that is not JSON" });
      return;
    }
    if (frame.noce_ack && NOTIFICATION_TYPES.has(frame.msg_type)) {
      if (this._remember(frame.noce_ack)) this._emit("message", frame);
      return;
    }
    if (frame.msg_type === MsgType.KICK) {
      this._retryAfterMs = kickRetryAfterMs(frame);
      this._emit("error", { code: frame.code, msg: frame.msg, frame });
      return;
    }
    const waiter = frame.seq === null || frame.seq === undefined ? null : this._pending.get(frame.seq);
    if (!waiter) {
      if (frame.msg_type === MsgType.ERROR) this._emit("error", { code: frame.code, msg: frame.msg, frame });
      return;
    }
    this._pending.delete(frame.seq);
    if (frame.msg_type === MsgType.ERROR) waiter.reject(new PushError(frame.code, frame.msg, frame));
    else waiter.resolve(frame);
  }

  /** True the first time a noce_ack is seen; the memory is bounded to dedupeSize. */
  _remember(noceAck) {
    if (this._seen.has(noceAck)) return false;
    this._seen.add(noceAck);
    const limit = this._options.dedupeSize ?? DEFAULTS.dedupeSize;
    for (const oldest of this._seen) {
      if (this._seen.size <= limit) break;
      this._seen.delete(oldest);
    }
    return true;
  }

  // --- login -------------------------------------------------------------------------

  _sendLogin() {
    this._clearTimer("loginRetry");
    const credentials = this._credentials;
    this._loginInFlight = true;
    this._request("login", credentials).then(
      (frame) => {
        this._loginInFlight = false;
        this._loggedIn(frame, credentials);
      },
      (error) => {
        this._loginInFlight = false;
        this._loginRefused(error, credentials);
      },
    );
  }

  _loggedIn(frame, credentials) {
    this._recovered();
    this._uid = frame.body.uid;
    this._unreadCounts = { ...frame.body.unread };
    this._setState(State.LOGGED_IN, { uid: this._uid });
    this._emit("login", frame.body);
    if (this._credentials !== credentials) {
      // login() or logout() was called while this login was on its way.
      this._switchUser();
      return;
    }
    this._flushAcks().catch(() => {});
    // What arrived while this page was away: the unread list, newest first.
    this.fetchUnread().catch((error) => {
      if (error.code !== 0) this._emit("error", { code: error.code, msg: `unread: ${error.msg}` });
    });
  }

  /** The server refuses a second login on one socket: leave the current user, then log in. */
  _switchUser() {
    this._request("logout").then(
      () => this._afterLogout(),
      () => {}, // the socket went; the reconnect logs in with the current credentials
    );
  }

  _loginRefused(error, credentials) {
    if (error.code === 0) return; // the socket went; the reconnect logs in again
    this._recovered(); // the server answered: the socket works, the key is the problem
    this._emit("error", { code: error.code, msg: `login: ${error.msg}`, frame: error.frame });
    if (this._credentials !== credentials) {
      if (this._credentials && this._state === State.OPEN) this._sendLogin();
      return;
    }
    // 400 means the frame itself is wrong: sending it unchanged again cannot help.
    if (error.code === 400) return;
    this._setTimer("loginRetry", this._timing("loginRetryMs"), () => {
      if (this._state === State.OPEN && this._credentials) this._sendLogin();
    });
  }

  _afterLogout() {
    this._uid = 0;
    this._unreadCounts = {};
    this._setState(State.OPEN);
    if (this._credentials) this._sendLogin();
  }

  // --- acks -----------------------------------------------------------------------------

  _flushAcks() {
    if (this._state !== State.LOGGED_IN) return Promise.resolve(0);
    const todo = [...this._acksToSend].filter((noceAck) => !this._acksInFlight.has(noceAck));
    const sends = [];
    for (let start = 0; start < todo.length; start += MAX_ACKS_PER_FRAME) {
      const chunk = todo.slice(start, start + MAX_ACKS_PER_FRAME);
      for (const noceAck of chunk) this._acksInFlight.add(noceAck);
      sends.push(
        this._request("ack", { noce_acks: chunk }).then(
          (frame) => {
            for (const noceAck of chunk) {
              this._acksToSend.delete(noceAck);
              this._acksInFlight.delete(noceAck);
            }
            return frame.body.acked;
          },
          (error) => {
            // Kept for the next flush (the next ack() or login).
            for (const noceAck of chunk) this._acksInFlight.delete(noceAck);
            throw error;
          },
        ),
      );
    }
    return Promise.all(sends).then((counts) => counts.reduce((sum, n) => sum + n, 0));
  }

  // --- plumbing ---------------------------------------------------------------------------

  _setState(state, detail = {}) {
    const previous = this._state;
    this._state = state;
    if (previous === state && state !== State.RECONNECTING) return;
    this._emit("state", { state, previous, ...detail });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setTimer(name, ms, fn) {
    this._clearTimer(name);
    this._timers[name] = this._setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, ms);
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) {
      this._clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }
}
