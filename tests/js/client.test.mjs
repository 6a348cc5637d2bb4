// Timing and state logic of the browser client (notifications/static/pushsite/pushsite-client.js),
// with Node's own test runner and fake timers: `node --test tests/js/`.
//
// The WebSocket and fetch here are stand-ins that record what the client does;
// the real server and a real browser are exercised by tests/e2e/test_demo_browser.py.

import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import { MsgType, PushClient, State } from "../../notifications/static/pushsite/pushsite-client.js";

const SECOND = 1000;
const CONFIG = {
  ws_url: "ws://push.test/ws/push/",
  heartbeat: 180,
  heartbeat_timeout: 30,
  reconnect_delays: [60, 120, 180],
  login_retry: 30,
  idle_timeout: 180,
  max_frame_bytes: 65536,
  unread_limit: 200,
  config_ttl: 300,
};

/** A WebSocket that records frames and lets the test play the server. */
class FakeSocket {
  static all = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  send(text) {
    assert.equal(this.readyState, 1, "the client sends only on an open socket");
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }

  // --- the server's side ---
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  reply(fields) {
    this.onmessage?.({
      data: JSON.stringify({ code: 200, msg: "SUCCESS", uid: 0, body: {}, noce_ack: null, seq: null, ...fields }),
    });
  }

  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "", wasClean: false });
  }

  actions() {
    return this.sent.map((frame) => frame.action);
  }

  last(action) {
    return this.sent.filter((frame) => frame.action === action).at(-1);
  }
}

/** fetch for GET /api/push/config: counts calls, can be told to fail. */
function fakeFetch(config = CONFIG) {
  const fetch = async (url) => {
    fetch.calls.push(url);
    if (fetch.failing) throw new TypeError("network down");
    return { ok: true, status: 200, json: async () => structuredClone(config) };
  };
  fetch.calls = [];
  fetch.failing = false;
  return fetch;
}

/** Let promise continuations (the config fetch, replies) run. */
async function settle() {
  for (let i = 0; i < 5; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

/** Advance the fake clock by ms, letting continuations run in between. */
async function advance(ms) {
  mock.timers.tick(ms);
  await settle();
}

/** A client on fake sockets; its jitter is 0 unless a test gives `random`, so the schedule is exact. */
function makeClient(options = {}) {
  const fetch = fakeFetch(options.config);
  const client = new PushClient({
    fetch,
    WebSocket: FakeSocket,
    baseUrl: "http://push.test",
    random: () => 0,
    ...options,
  });
  const states = [];
  const events = { message: [], unread: [], login: [], error: [] };
  client.addEventListener("state", (event) => states.push(event.detail));
  for (const type of Object.keys(events)) client.addEventListener(type, (event) => events[type].push(event.detail));
  return { client, fetch, states, events };
}

function socket(index = -1) {
  return FakeSocket.all.at(index);
}

/** Connect, open the socket and answer the login: a logged-in client. */
async function loggedIn(options = {}) {
  const made = makeClient(options);
  made.client.login({ ukey: "dev-42" });
  await settle();
  socket().open();
  answerLogin(socket());
  await settle();
  return made;
}

function answerLogin(ws, uid = 42, unread = {}) {
  const login = ws.last("login");
  ws.reply({ msg_type: MsgType.LOGIN, uid, body: { uid, unread }, seq: login.seq });
}

/** What the server does with a socket it has no room for: KICK 503, then close 1013. */
function sendAway(ws, body = { retry_after: 7 }) {
  ws.reply({ msg_type: MsgType.KICK, code: 503, msg: "server busy; retry later", body });
  ws.drop(1013);
}

/** random() answering the given values in turn, then the last one again. */
function randoms(...values) {
  let next = 0;
  return () => values[Math.min(next++, values.length - 1)];
}

function push(ws, noceAck, msgType = MsgType.USER_NOTICE) {
  ws.reply({ msg_type: msgType, uid: 0, body: { to_uid: 42, title: noceAck }, noce_ack: noceAck });
}

beforeEach(() => {
  FakeSocket.all = [];
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
});

afterEach(() => {
  mock.timers.reset();
});

describe("config", () => {
  test("is read from /api/push/config and gives the socket URL", async () => {
    const { client, fetch } = makeClient();
    client.connect();
    await settle();
    assert.deepEqual(fetch.calls, ["http://push.test/api/push/config"]);
    assert.equal(socket().url, CONFIG.ws_url);
    assert.equal(client.state, State.CONNECTING);
  });

  test("is cached for configTtlMs and read again after", async () => {
    const { client, fetch } = makeClient({ configTtlMs: 300 * SECOND, reconnectDelaysMs: [10 * SECOND] });
    client.connect();
    await settle();
    socket().open();
    await advance(200 * SECOND);
    socket().drop();
    await advance(10 * SECOND); // reconnect 210 s after the first read: still cached
    assert.equal(FakeSocket.all.length, 2);
    assert.equal(fetch.calls.length, 1);
    socket().open();
    await advance(100 * SECOND - 1);
    socket().drop();
    await advance(10 * SECOND); // 310 s after the first read: read again
    assert.equal(fetch.calls.length, 2);
  });

  test("server's config_ttl is held between 5 and 10 minutes", async () => {
    const { client, fetch } = makeClient({ config: { ...CONFIG, config_ttl: 5 }, reconnectDelaysMs: [SECOND] });
    client.connect();
    await settle();
    socket().open();
    await advance(60 * SECOND);
    socket().drop();
    await advance(SECOND);
    assert.equal(fetch.calls.length, 1, "a 5 s config_ttl is raised to 5 minutes");
  });

  test("server's timings are used when the page gives none", async () => {
    const config = { ...CONFIG, heartbeat: 100 };
    const { client } = makeClient({ config });
    client.connect();
    await settle();
    socket().open();
    await advance(100 * SECOND - 1);
    assert.deepEqual(socket().actions(), []);
    await advance(1);
    assert.deepEqual(socket().actions(), ["heartbeat"]);
  });

  test("a failed refresh falls back to the cached config", async () => {
    const { client, fetch, events } = makeClient({ configTtlMs: 10 * SECOND, reconnectDelaysMs: [60 * SECOND] });
    client.connect();
    await settle();
    socket().open();
    socket().drop();
    fetch.failing = true;
    await advance(60 * SECOND);
    assert.equal(fetch.calls.length, 2);
    assert.equal(FakeSocket.all.length, 2, "the stale config still gives a socket URL");
    assert.match(events.error.at(-1).msg, /config read failed, using the cached one/);
  });

  test("with its own wsUrl the client connects on the defaults when the config cannot be read", async () => {
    const { client, fetch, events } = makeClient({ wsUrl: "wss://push.example.com/ws/push/" });
    fetch.failing = true;
    client.connect();
    await settle();
    assert.equal(socket().url, "wss://push.example.com/ws/push/");
    assert.match(events.error.at(-1).msg, /using the defaults/);
    socket().open();
    await advance(180 * SECOND);
    assert.deepEqual(socket().actions(), ["heartbeat"], "the protocol's default heartbeat");
  });
});

describe("login", () => {
  test("goes out when the socket opens, then the unread list is fetched", async () => {
    const { client, states, events } = makeClient();
    client.login({ ukey: "dev-42" });
    await settle();
    const ws = socket();
    ws.open();
    assert.deepEqual(ws.sent[0], { action: "login", body: { ukey: "dev-42" }, seq: 1 });
    answerLogin(ws, 42, { 7: 2 });
    await settle();
    assert.equal(client.state, State.LOGGED_IN);
    assert.equal(client.uid, 42);
    assert.deepEqual(events.login, [{ uid: 42, unread: { 7: 2 } }]);
    assert.deepEqual(ws.last("unread").body, { limit: 50 });
    assert.deepEqual(
      states.map((s) => s.state),
      [State.CONNECTING, State.OPEN, State.LOGGED_IN],
    );

    const items = [{ noce_ack: "a1", msg_type: 7, uid: 0, body: { to_uid: 42 }, is_sent: true, create_time: 1 }];
    ws.reply({ msg_type: MsgType.UNREAD, uid: 42, body: { items, counts: { 7: 1 } }, seq: ws.last("unread").seq });
    await settle();
    assert.deepEqual(events.unread, [{ items, counts: { 7: 1 } }]);
    assert.deepEqual(client.unreadCounts, { 7: 1 });
  });

  test("with a token is an app login", async () => {
    const { client } = makeClient();
    client.login({ token: "app-token" });
    await settle();
    socket().open();
    assert.deepEqual(socket().sent[0].body, { token: "app-token" });
  });

  test("needs exactly one of ukey and token", () => {
    const { client } = makeClient();
    assert.throws(() => client.login({}), TypeError);
    assert.throws(() => client.login({ ukey: "a", token: "b" }), TypeError);
    assert.throws(() => client.login({ ukey: "  " }), TypeError);
  });

  for (const code of [401, 503]) {
    test(`refused with ${code} is retried every 30 s until it succeeds`, async () => {
      const { client, events } = makeClient();
      client.login({ ukey: "dev-42" });
      await settle();
      const ws = socket();
      ws.open();
      for (let round = 1; round <= 3; round += 1) {
        ws.reply({ msg_type: MsgType.ERROR, code, msg: "login refused", seq: ws.last("login").seq });
        await settle();
        assert.equal(client.state, State.OPEN);
        await advance(30 * SECOND - 1);
        assert.equal(ws.actions().filter((a) => a === "login").length, round, "not before 30 s");
        await advance(1);
        assert.equal(ws.actions().filter((a) => a === "login").length, round + 1, "at 30 s");
      }
      assert.deepEqual(
        events.error.map((e) => e.code),
        [code, code, code],
      );
      answerLogin(ws);
      await settle();
      assert.equal(client.state, State.LOGGED_IN);
      await advance(120 * SECOND);
      assert.equal(ws.actions().filter((a) => a === "login").length, 4, "no login after success");
    });
  }

  test("refused as malformed (400) is not resent unchanged", async () => {
    const { client } = makeClient();
    client.login({ ukey: "dev-42" });
    await settle();
    const ws = socket();
    ws.open();
    ws.reply({ msg_type: MsgType.ERROR, code: 400, msg: "body.ukey: bad", seq: ws.last("login").seq });
    await advance(120 * SECOND);
    assert.equal(ws.actions().filter((a) => a === "login").length, 1);
  });

  test("logout forgets the credentials and keeps the socket", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    const done = client.logout();
    ws.reply({ msg_type: MsgType.LOGOUT, body: { uid: 42 }, seq: ws.last("logout").seq });
    assert.deepEqual(await done, { uid: 42 });
    assert.equal(client.state, State.OPEN);
    assert.equal(client.uid, 0);
    assert.equal(ws.closedWith, null);
  });

  test("a second login switches user: logout first, then login", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    client.login({ ukey: "dev-43" });
    assert.equal(ws.sent.at(-1).action, "logout");
    ws.reply({ msg_type: MsgType.LOGOUT, body: { uid: 42 }, seq: ws.last("logout").seq });
    await settle();
    assert.deepEqual(ws.sent.at(-1), { action: "login", body: { ukey: "dev-43" }, seq: ws.sent.at(-1).seq });
    answerLogin(ws, 43);
    await settle();
    assert.equal(client.uid, 43);
  });
});

describe("heartbeat", () => {
  test("goes out 180 s after the last frame received", async () => {
    await loggedIn();
    const ws = socket();
    const before = ws.sent.length;
    await advance(180 * SECOND - 1);
    assert.equal(ws.sent.length, before);
    await advance(1);
    assert.equal(ws.sent.at(-1).action, "heartbeat");
  });

  test("any frame received restarts the 180 s", async () => {
    await loggedIn();
    const ws = socket();
    await advance(179 * SECOND);
    push(ws, "n1"); // a push, not a reply, also counts
    await advance(179 * SECOND);
    assert.notEqual(ws.sent.at(-1).action, "heartbeat");
    ws.reply({ msg_type: MsgType.ERROR, code: 400, msg: "whatever" });
    await advance(179 * SECOND);
    assert.notEqual(ws.sent.at(-1).action, "heartbeat");
    await advance(SECOND);
    assert.equal(ws.sent.at(-1).action, "heartbeat");
  });

  test("sending does not restart it: only frames received do", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    await advance(100 * SECOND);
    client.ack("x").catch(() => {});
    await advance(80 * SECOND);
    assert.equal(ws.sent.at(-1).action, "heartbeat");
  });

  test("an answered heartbeat is not resent", async () => {
    await loggedIn();
    const ws = socket();
    await advance(180 * SECOND);
    ws.reply({ msg_type: MsgType.HEARTBEAT, body: { ts: Date.now() }, seq: ws.last("heartbeat").seq });
    await advance(179 * SECOND);
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 1);
    await advance(SECOND);
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 2);
  });

  test("unanswered: sent once more after 30 s, dead 30 s later", async () => {
    const { client, states } = await loggedIn();
    const ws = socket();
    await advance(180 * SECOND);
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 1);
    await advance(30 * SECOND - 1);
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 1);
    await advance(1);
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 2, "resent at 30 s");
    await advance(30 * SECOND - 1);
    assert.equal(ws.closedWith, null);
    assert.equal(client.state, State.LOGGED_IN);
    await advance(1);
    assert.notEqual(ws.closedWith, null, "closed 30 s after the resend");
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 2, "no third heartbeat");
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(states.at(-1).attempt, 1);
    assert.equal(states.at(-1).inMs, 60 * SECOND);
  });

  test("an answer to the resent heartbeat keeps the socket", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    await advance(210 * SECOND);
    ws.reply({ msg_type: MsgType.HEARTBEAT, body: { ts: 1 }, seq: ws.last("heartbeat").seq });
    await advance(60 * SECOND);
    assert.equal(ws.closedWith, null);
    assert.equal(client.state, State.LOGGED_IN);
  });
});

describe("reconnect", () => {
  test("at most 3 attempts, 60, 120 and 180 s after the loss, then gave-up", async () => {
    const { client, states } = await loggedIn();
    const lossAt = Date.now();
    socket().drop(1006);
    assert.equal(client.state, State.RECONNECTING);
    const started = [];
    for (const offset of [60, 120, 180]) {
      const count = FakeSocket.all.length;
      await advance(lossAt + offset * SECOND - 1 - Date.now());
      assert.equal(FakeSocket.all.length, count, `no attempt before ${offset} s`);
      await advance(1);
      assert.equal(FakeSocket.all.length, count + 1, `attempt at ${offset} s`);
      started.push((Date.now() - lossAt) / SECOND);
      socket().drop(1006); // the attempt fails: the server is still down
      await settle();
    }
    assert.deepEqual(started, [60, 120, 180]);
    assert.equal(client.state, State.GAVE_UP);
    assert.equal(states.at(-1).attempts, 3);
    assert.deepEqual(
      states.filter((s) => s.state === State.RECONNECTING).map((s) => s.attempt),
      [1, 2, 3],
    );
    await advance(3600 * SECOND);
    assert.equal(FakeSocket.all.length, 4, "nothing after giving up");
  });

  test("a failed config read counts as a failed attempt", async () => {
    const { client, fetch } = makeClient({ reconnectDelaysMs: [60 * SECOND, 120 * SECOND] });
    fetch.failing = true;
    client.connect();
    await settle();
    assert.equal(client.state, State.RECONNECTING);
    await advance(60 * SECOND);
    assert.equal(fetch.calls.length, 2);
    await advance(60 * SECOND);
    assert.equal(fetch.calls.length, 3);
    assert.equal(client.state, State.GAVE_UP);
    assert.equal(FakeSocket.all.length, 0);
  });

  test("an attempt that does not open within connectTimeoutMs fails", async () => {
    const { client } = await loggedIn({ connectTimeoutMs: 10 * SECOND });
    socket().drop();
    await advance(60 * SECOND);
    const hanging = socket();
    await advance(10 * SECOND);
    assert.notEqual(hanging.closedWith, null);
    assert.equal(client.state, State.RECONNECTING);
    await advance(50 * SECOND - 1);
    assert.equal(FakeSocket.all.length, 2);
    await advance(1);
    assert.equal(FakeSocket.all.length, 3, "the second attempt stays 120 s after the loss");
  });

  test("after a reconnect: login again, fetch unread, and a later loss starts over", async () => {
    const { client, events } = await loggedIn();
    socket().drop();
    await advance(60 * SECOND);
    socket().drop(); // first attempt fails
    await advance(60 * SECOND);
    const ws = socket();
    ws.open();
    assert.deepEqual(ws.sent[0].body, { ukey: "dev-42" }, "logs in again with the same key");
    answerLogin(ws, 42, { 7: 1 });
    await settle();
    assert.equal(client.state, State.LOGGED_IN);
    assert.equal(ws.last("unread").action, "unread", "fetches what was missed");
    assert.equal(events.login.length, 2);

    ws.drop();
    const count = FakeSocket.all.length;
    await advance(60 * SECOND);
    assert.equal(FakeSocket.all.length, count + 1, "the new loss waits 60 s again, attempt 1");
  });

  test("connect() while an attempt is opening replaces it", async () => {
    const { client } = await loggedIn();
    socket().drop();
    await advance(60 * SECOND);
    const opening = socket();
    client.connect();
    await settle();
    assert.notEqual(opening.closedWith, null, "the attempt under way is closed");
    assert.equal(FakeSocket.all.length, 3);
    assert.equal(client.state, State.CONNECTING);
    opening.open(); // too late: it belongs to nobody any more
    assert.deepEqual(opening.sent, []);
  });

  test("a kick for idle timeout (4000) reconnects on the schedule", async () => {
    const { client, events } = await loggedIn();
    const ws = socket();
    ws.reply({ msg_type: MsgType.KICK, code: 4000, msg: "idle timeout" });
    ws.drop(4000);
    assert.equal(events.error.at(-1).code, 4000);
    assert.equal(client.state, State.RECONNECTING);
  });

  test("a server close with 1000 is final", async () => {
    const { client } = await loggedIn();
    socket().drop(1000);
    assert.equal(client.state, State.CLOSED);
    await advance(600 * SECOND);
    assert.equal(FakeSocket.all.length, 1);
  });

  test("close() stops everything; connect() after gave-up starts over", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    client.close();
    assert.deepEqual(ws.closedWith, { code: 1000, reason: "client closed" });
    assert.equal(client.state, State.CLOSED);
    await advance(600 * SECOND);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(ws.actions().filter((a) => a === "heartbeat").length, 0);

    client.connect();
    await settle();
    assert.equal(FakeSocket.all.length, 2);
    socket().open();
    assert.deepEqual(socket().sent[0].body, { ukey: "dev-42" }, "close() keeps the credentials");
  });
});

describe("reconnect jitter", () => {
  for (const r of [0, 0.25, 0.5, 0.999999]) {
    test(`with random() = ${r} each attempt starts within [d, 1.2 d] after the loss`, async () => {
      const { client } = await loggedIn({ random: () => r });
      const lossAt = Date.now();
      socket().drop(1006);
      for (const d of [60, 120, 180]) {
        const offsetMs = Math.round(d * SECOND * (1 + 0.2 * r));
        assert.ok(offsetMs >= d * SECOND && offsetMs <= 1.2 * d * SECOND, `${offsetMs} ms for ${d} s`);
        const count = FakeSocket.all.length;
        await advance(lossAt + offsetMs - 1 - Date.now());
        assert.equal(FakeSocket.all.length, count, `no attempt before ${offsetMs} ms`);
        await advance(1);
        assert.equal(FakeSocket.all.length, count + 1, `attempt at ${offsetMs} ms`);
        socket().drop(1006);
        await settle();
      }
      assert.equal(client.state, State.GAVE_UP);
    });
  }

  test("random() = 0.5 puts the attempts at 66, 132 and 198 s", async () => {
    const { states } = await loggedIn({ random: () => 0.5 });
    const lossAt = Date.now();
    socket().drop(1006);
    const started = [];
    for (let attempt = 1; attempt <= 3; attempt += 1) {
      const count = FakeSocket.all.length;
      while (FakeSocket.all.length === count) await advance(SECOND);
      started.push((Date.now() - lossAt) / SECOND);
      socket().drop(1006);
      await settle();
    }
    assert.deepEqual(started, [66, 132, 198]);
    assert.deepEqual(
      states.filter((s) => s.state === State.RECONNECTING).map((s) => s.inMs),
      [66_000, 66_000, 66_000],
    );
  });

  test("each attempt draws its own jitter", async () => {
    const { states } = await loggedIn({ random: randoms(0, 0.5, 0.9) });
    socket().drop(1006);
    await advance(60 * SECOND);
    socket().drop(1006);
    await advance(132 * SECOND - 60 * SECOND);
    socket().drop(1006);
    const waits = states.filter((s) => s.state === State.RECONNECTING).map((s) => s.inMs);
    assert.deepEqual(waits, [60_000, 132_000 - 60_000, 212_400 - 132_000]);
  });

  test("two clients with different random() come back at different times", async () => {
    const early = await loggedIn({ random: () => 0.1 });
    const late = await loggedIn({ random: () => 0.9 });
    const earlySocket = socket(0);
    const lateSocket = socket(1);
    earlySocket.drop(1006);
    lateSocket.drop(1006);
    assert.equal(early.states.at(-1).inMs, 61_200);
    assert.equal(late.states.at(-1).inMs, 70_800);
    await advance(61_200);
    assert.equal(FakeSocket.all.length, 3, "only the first client is back at 61.2 s");
    assert.equal(early.client.state, State.RECONNECTING);
    await advance(70_800 - 61_200);
    assert.equal(FakeSocket.all.length, 4, "the second one at 70.8 s");
  });

  test("without a random option the jitter comes from Math.random", async (t) => {
    t.mock.method(Math, "random", () => 0.75);
    const { states } = await loggedIn({ random: undefined });
    socket().drop(1006);
    assert.equal(states.at(-1).inMs, 69 * SECOND);
  });
});

describe("server busy (KICK 503 with retry_after, close 1013)", () => {
  for (const r of [0, 0.5, 0.999999]) {
    test(`retry_after 7 with random() = ${r}: the next attempt comes 7 to 8.4 s later`, async () => {
      const { client, states, events } = await loggedIn({ random: () => r });
      const closedAt = Date.now();
      sendAway(socket(), { retry_after: 7 });
      assert.equal(events.error.at(-1).code, 503);
      assert.equal(client.state, State.RECONNECTING);
      const { inMs, retryAfterMs, attempt, code } = states.at(-1);
      assert.ok(inMs >= 7000 && inMs <= 8400, `waits ${inMs} ms`);
      assert.deepEqual({ retryAfterMs, attempt, code }, { retryAfterMs: 7 * SECOND, attempt: 1, code: 1013 });
      await advance(closedAt + 7 * SECOND - 1 - Date.now());
      assert.equal(FakeSocket.all.length, 1, "not before 7 s");
      await advance(closedAt + 8400 - Date.now());
      assert.equal(FakeSocket.all.length, 2, "by 8.4 s, long before the 60 s of the schedule");
    });
  }

  test("a socket sent away on connect() comes back after retry_after", async () => {
    const { client } = makeClient({ random: () => 0.5 });
    client.login({ ukey: "dev-42" });
    await settle();
    socket().open();
    sendAway(socket(), { retry_after: 20 });
    await advance(22 * SECOND - 1);
    assert.equal(FakeSocket.all.length, 1);
    await advance(1);
    assert.equal(FakeSocket.all.length, 2, "20 s plus 10 %");
    socket().open();
    answerLogin(socket());
    await settle();
    assert.equal(client.state, State.LOGGED_IN);
  });

  test("a reconnect attempt sent away waits retry_after, then the schedule goes on", async () => {
    const { client, states } = await loggedIn();
    const lossAt = Date.now();
    socket().drop(1006);
    await advance(60 * SECOND);
    socket().open();
    sendAway(socket(), { retry_after: 7 });
    assert.deepEqual(
      [states.at(-1).attempt, states.at(-1).inMs],
      [2, 7 * SECOND],
      "attempt 2 in 7 s, not at 120 s after the loss",
    );
    await advance(7 * SECOND);
    assert.equal(FakeSocket.all.length, 3);
    socket().drop(1006); // this one fails plainly: retry_after was for one close only
    await settle();
    assert.equal(states.at(-1).inMs, lossAt + 180 * SECOND - Date.now(), "attempt 3 back on the schedule");
    assert.equal(states.at(-1).retryAfterMs, undefined);
    await advance(lossAt + 180 * SECOND - Date.now());
    assert.equal(FakeSocket.all.length, 4);
    assert.equal(client.state, State.RECONNECTING);
  });

  test("sent away on every attempt, a client with a key uses up its attempts", async () => {
    const { client } = await loggedIn();
    sendAway(socket(), { retry_after: 5 });
    for (let attempt = 1; attempt <= 3; attempt += 1) {
      await advance(5 * SECOND);
      assert.equal(FakeSocket.all.length, attempt + 1, `attempt ${attempt} after 5 s`);
      socket().open();
      sendAway(socket(), { retry_after: 5 });
      await settle();
    }
    assert.equal(client.state, State.GAVE_UP);
    await advance(600 * SECOND);
    assert.equal(FakeSocket.all.length, 4);
  });

  test("close 1013 without a KICK backs off on the schedule", async () => {
    const { client, states } = await loggedIn({ random: () => 0.5 });
    socket().drop(1013);
    assert.equal(client.state, State.RECONNECTING);
    assert.deepEqual([states.at(-1).code, states.at(-1).inMs], [1013, 66 * SECOND]);
    await advance(66 * SECOND - 1);
    assert.equal(FakeSocket.all.length, 1, "no quick retry");
    await advance(1);
    assert.equal(FakeSocket.all.length, 2);
  });

  for (const [name, body] of [
    ["without retry_after (server full)", {}],
    ["with retry_after 0", { retry_after: 0 }],
    ["with retry_after -3", { retry_after: -3 }],
    ['with retry_after "7"', { retry_after: "7" }],
    ["with retry_after null", { retry_after: null }],
  ]) {
    test(`a KICK 503 ${name} then close 1013 follows the schedule`, async () => {
      const { states } = await loggedIn();
      sendAway(socket(), body);
      assert.equal(states.at(-1).inMs, 60 * SECOND);
      await advance(60 * SECOND - 1);
      assert.equal(FakeSocket.all.length, 1);
      await advance(1);
      assert.equal(FakeSocket.all.length, 2);
    });
  }

  test("retry_after on another KICK code is not a retry_after", async () => {
    const { states } = await loggedIn();
    socket().reply({ msg_type: MsgType.KICK, code: 4000, msg: "idle timeout", body: { retry_after: 7 } });
    socket().drop(4000);
    assert.equal(states.at(-1).inMs, 60 * SECOND);
  });

  for (const body of [{}, { retry_after: 7 }]) {
    test(`a KICK then close 1000 stays final (body ${JSON.stringify(body)})`, async () => {
      const { client, states, events } = await loggedIn();
      socket().reply({ msg_type: MsgType.KICK, code: 503, msg: "session ended", body });
      socket().drop(1000);
      assert.equal(events.error.at(-1).code, 503);
      assert.equal(client.state, State.CLOSED);
      await advance(600 * SECOND);
      assert.equal(FakeSocket.all.length, 1, "no reconnect");

      // The KICK's retry_after does not outlive its socket: a later loss uses the schedule.
      client.connect();
      await settle();
      socket().open();
      answerLogin(socket());
      await settle();
      socket().drop(1006);
      assert.equal(client.state, State.RECONNECTING);
      assert.equal(states.at(-1).inMs, 60 * SECOND);
    });
  }
});

describe("messages and acks", () => {
  test("pushed notifications are reported once per noce_ack", async () => {
    const { events } = await loggedIn();
    const ws = socket();
    push(ws, "n1", MsgType.COMMENT);
    push(ws, "n2", MsgType.SYSTEM_NOTICE);
    push(ws, "n1", MsgType.COMMENT); // a replay of the same message
    assert.deepEqual(
      events.message.map((m) => [m.noce_ack, m.msg_type]),
      [
        ["n1", 5],
        ["n2", 6],
      ],
    );
  });

  test("ack sends the noce_acks and resolves with the count", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    const acked = client.ack(["n1", "n2"]);
    assert.deepEqual(ws.last("ack").body, { noce_acks: ["n1", "n2"] });
    ws.reply({ msg_type: MsgType.ACK, uid: 42, body: { acked: 2 }, seq: ws.last("ack").seq });
    assert.equal(await acked, 2);
  });

  test("acks given while offline are sent after the next login", async () => {
    const { client } = await loggedIn();
    socket().drop();
    assert.equal(await client.ack("n9"), 0);
    await advance(60 * SECOND);
    const ws = socket();
    ws.open();
    answerLogin(ws);
    await settle();
    assert.deepEqual(ws.last("ack").body, { noce_acks: ["n9"] });
  });

  test("a refused ack is kept and sent again with the next one", async () => {
    const { client } = await loggedIn();
    const ws = socket();
    const first = client.ack("n1");
    ws.reply({ msg_type: MsgType.ERROR, code: 429, msg: "too many frames", seq: ws.last("ack").seq });
    await assert.rejects(first, (error) => error.code === 429);
    client.ack("n2").catch(() => {});
    assert.deepEqual(ws.last("ack").body, { noce_acks: ["n1", "n2"] });
  });

  test("a lost connection rejects requests on their way", async () => {
    const { client } = await loggedIn();
    const pending = client.fetchUnread({ limit: 5, msgType: 7 });
    assert.deepEqual(socket().last("unread").body, { limit: 5, msg_type: 7 });
    socket().drop();
    await assert.rejects(pending, (error) => error.code === 0);
  });
});
