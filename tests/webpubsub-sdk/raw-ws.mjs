// A plain Node `ws` client speaking json.webpubsub.azure.v1 by hand, as the Web PubSub docs show
// ("PubSub WebSocket Client"): run by tests/webpubsub.rs as `node raw-ws.mjs <client url>`.
// Prints one JSON line per frame received and exits 0 once the exchange below completed.

import WebSocket from "ws";

const url = process.argv[2];
const ws = new WebSocket(url, "json.webpubsub.azure.v1");
const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: "timed out" }));
  process.exit(1);
}, 10000);

const send = (frame) => {
  ws.send(JSON.stringify(frame));
  return true;
};
const steps = [
  // After system/connected: join, then send to the group (echo on), then an event.
  (frame) => frame.type === "system" && frame.event === "connected" &&
    send({ type: "joinGroup", group: "lobby", ackId: 1 }),
  (frame) => frame.type === "ack" && frame.ackId === 1 && frame.success &&
    send({ type: "sendToGroup", group: "lobby", ackId: 2, dataType: "text", data: "hello lobby" }),
];
const seen = { ack2: false, message: false };

ws.on("message", (data) => {
  const frame = JSON.parse(data.toString());
  console.log(JSON.stringify(frame));
  if (steps.length > 0) {
    if (!steps.shift()(frame)) {
      console.log(JSON.stringify({ error: "unexpected frame" }));
      process.exit(1);
    }
    return;
  }
  if (frame.type === "ack" && frame.ackId === 2 && frame.success) seen.ack2 = true;
  if (frame.type === "message" && frame.from === "group" && frame.data === "hello lobby") seen.message = true;
  if (seen.ack2 && seen.message) {
    ws.send(JSON.stringify({ type: "event", event: "telemetry", ackId: 3, dataType: "json", data: { from: "ws" } }));
    seen.ack2 = false;
    seen.message = false;
    seen.event = true;
  }
  if (seen.event && frame.type === "ack" && frame.ackId === 3) {
    clearTimeout(timer);
    ws.close(1000);
    process.exit(frame.success ? 0 : 1);
  }
});
ws.on("error", (error) => {
  console.log(JSON.stringify({ error: String(error) }));
  process.exit(1);
});
