// Drives the unmodified @azure/web-pubsub-client 1.0.4 SDK against an iotgate Web PubSub listener.
// tests/webpubsub.rs starts iotgate, issues the client URLs with POST /api/v1/devices/{id}/token
// and runs: node scenario.mjs '<json config>'. Each check prints one JSON line
// {"check": name, "ok": bool, ...}; the process exits 1 on the first failed check.
//
// Client A reaches iotgate through a TCP relay in this process, so the test can cut A's
// connection abruptly (no closing handshake, as a network failure would) and watch the SDK resume
// it with awps_connection_id / awps_reconnection_token.

import net from "node:net";
import { WebPubSubClient } from "@azure/web-pubsub-client";

const config = JSON.parse(process.argv[2]);
const deadline = (ms) => new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms));
const within = (promise, ms, what) => Promise.race([promise, deadline(ms)]).catch((e) => fail(what, e));

function report(check, ok, extra = {}) {
  console.log(JSON.stringify({ check, ok, ...extra }));
}

function fail(check, error) {
  report(check, false, { error: String(error?.stack ?? error) });
  process.exit(1);
}

// A relay from a local port to iotgate; cut() destroys every open pair at once.
function relay(target) {
  const pairs = new Set();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(target.port, target.host);
    const pair = { inbound, outbound };
    pairs.add(pair);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
    const end = () => {
      inbound.destroy();
      outbound.destroy();
      pairs.delete(pair);
    };
    inbound.on("error", end).on("close", end);
    outbound.on("error", end).on("close", end);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      resolve({
        port: server.address().port,
        cut() {
          const n = pairs.size;
          for (const { inbound, outbound } of pairs) {
            inbound.resetAndDestroy?.() ?? inbound.destroy();
            outbound.resetAndDestroy?.() ?? outbound.destroy();
          }
          pairs.clear();
          return n;
        },
        close() {
          server.close();
        },
      });
    });
  });
}

// Collects one client's group messages in arrival order.
function inbox(client) {
  const messages = [];
  const waiters = [];
  client.on("group-message", (e) => {
    messages.push(e.message);
    for (const w of [...waiters]) w();
  });
  return {
    messages,
    until(predicate, ms, what) {
      return within(
        new Promise((resolve) => {
          const check = () => {
            if (predicate(messages)) resolve(messages);
          };
          waiters.push(check);
          check();
        }),
        ms,
        what,
      );
    },
  };
}

const target = new URL(config.urlA);
const proxy = await relay({ host: target.hostname, port: Number(target.port) });
const viaProxy = new URL(config.urlA);
viaProxy.port = String(proxy.port);

const a = new WebPubSubClient(viaProxy.toString());
const b = new WebPubSubClient(config.urlB);
const aInbox = inbox(a);
const bInbox = inbox(b);
let aConnected = [];
a.on("connected", (e) => aConnected.push(e));
let aDisconnected = 0;
a.on("disconnected", () => aDisconnected++);

await within(a.start(), 10000, "a_start");
await within(b.start(), 10000, "b_start");
// start() resolves once the socket is open; the connected event follows with system/connected.
await within(
  new Promise((resolve) => {
    const poll = () => (aConnected.length > 0 ? resolve() : setTimeout(poll, 20));
    poll();
  }),
  5000,
  "a_connected_event",
);
report("connected", aConnected.length === 1 && aConnected[0].userId === config.deviceA, {
  connected: aConnected,
});
if (aConnected[0]?.userId !== config.deviceA) fail("connected", `userId ${aConnected[0]?.userId}`);

await within(a.joinGroup("room"), 5000, "a_join");
await within(b.joinGroup("room"), 5000, "b_join");
report("joined", true);

// B → group → A (and not back to B: noEcho).
await within(b.sendToGroup("room", { n: 1 }, "json", { noEcho: true }), 5000, "b_send_1");
await aInbox.until((m) => m.length >= 1, 5000, "a_receives_1");
const first = aInbox.messages[0];
if (first.group !== "room" || first.data?.n !== 1 || first.fromUserId !== config.deviceB) {
  fail("group_message", JSON.stringify(first));
}
report("group_message", true, { message: first });

// An event with an ack: it is telemetry now.
await within(a.sendEvent("telemetry", { temperature: 21.5 }, "json"), 5000, "a_event");
report("event_acked", true);

// A repeated ackId is answered Duplicate, which the SDK reports as isDuplicated.
const once = await within(b.sendToGroup("room", { n: "dup" }, "json", { ackId: 900, noEcho: true }), 5000, "dup_first");
const twice = await within(b.sendToGroup("room", { n: "dup" }, "json", { ackId: 900, noEcho: true }), 5000, "dup_second");
if (once.isDuplicated || !twice.isDuplicated) fail("duplicate_ack", JSON.stringify({ once, twice }));
report("duplicate_ack", true);
await aInbox.until((m) => m.some((x) => x.data?.n === "dup"), 5000, "a_receives_dup");

// Cut A abruptly; B sends while A is away; A resumes and receives everything it missed, once,
// in order.
const before = aInbox.messages.length;
const cut = proxy.cut();
report("cut", cut >= 1, { sockets: cut });
for (let n = 2; n <= 4; n++) {
  await within(b.sendToGroup("room", { n }, "json", { noEcho: true }), 5000, `b_send_${n}`);
}
await aInbox.until((m) => m.length >= before + 3, 30000, "a_receives_missed");
await new Promise((r) => setTimeout(r, 500));
const missed = aInbox.messages.slice(before).map((m) => m.data?.n);
if (JSON.stringify(missed) !== "[2,3,4]") fail("resumed", `after the cut A received ${JSON.stringify(missed)}`);
if (aDisconnected !== 0) fail("resumed", "the SDK reported a disconnect: the connection was not resumed");
if (aConnected.length !== 1) fail("resumed", "the SDK started a new connection instead of resuming");
report("resumed", true, { missed });

// Still in the group after the resume, still able to send events.
await within(b.sendToGroup("room", { n: 5 }, "json", { noEcho: true }), 5000, "b_send_5");
await aInbox.until((m) => m.some((x) => x.data?.n === 5), 5000, "a_receives_5");
await within(a.sendEvent("telemetry", { temperature: 22.5 }, "json"), 5000, "a_event_after_resume");
report("after_resume", true);

// Without the role: joinGroup is refused with Forbidden.
const c = new WebPubSubClient(config.urlNoRoles);
await within(c.start(), 10000, "c_start");
const refusal = await Promise.race([
  c.joinGroup("room").then(() => null, (error) => error),
  deadline(5000),
]).catch((error) => fail("forbidden", error));
if (refusal === null) fail("forbidden", "joinGroup without a role succeeded");
if (refusal?.errorDetail?.name !== "Forbidden") fail("forbidden", `error ${refusal?.errorDetail?.name}: ${refusal}`);
report("forbidden", true, { message: refusal.errorDetail.message });

c.stop();
a.stop();
b.stop();
proxy.close();
report("done", bInbox.messages.length === 0, { bReceived: bInbox.messages.length });
process.exit(0);
