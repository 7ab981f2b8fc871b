// The socket.io peer of spool-bench's WebSocket benchmarks (`spool-bench ws-*`).
//
//   node --expose-gc bench/socketio-server.js --port 7171 [--host 127.0.0.1] [--backlog 511]
//
// A plain socket.io 4.8 server with connection state recovery enabled (the feature that
// corresponds to Spool's sessions): a client that lost its connection and comes back within
// `maxDisconnectionDuration` with its `pid` and last `offset` gets its rooms back and the
// packets it missed. Events, all with an acknowledgement:
//
//   subscribe(room, ack)        joins `room`
//   publish(room, data, ack)    broadcasts `message(data)` to `room` (stored for recovery), then acks
//
// Plain HTTP on the same port, for the benchmark:
//
//   GET /stats   {"clients":…,"sockets":…,"sessions":…,"packets":…,"rss":…}
//   GET /gc      runs a full garbage collection first (needs --expose-gc), then answers /stats
//
// Started and stopped by spool-bench; it prints "listening on HOST:PORT" once ready.

"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

// `--name value` or `--name=value`.
function arg(name, fallback) {
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === `--${name}` && i + 1 < args.length) return args[i + 1];
    if (args[i].startsWith(`--${name}=`)) return args[i].slice(name.length + 3);
  }
  return fallback;
}

const host = arg("host", "127.0.0.1");
const port = Number(arg("port", "7171"));
// The listen backlog: Node's default (511) unless given.
const backlog = Number(arg("backlog", "511"));

const httpServer = http.createServer((req, res) => {
  if (req.url === "/gc" && typeof global.gc === "function") {
    global.gc();
  }
  if (req.url === "/stats" || req.url === "/gc") {
    const adapter = io.of("/").adapter;
    res.setHeader("content-type", "application/json");
    res.end(
      JSON.stringify({
        clients: io.engine.clientsCount,
        sockets: io.of("/").sockets.size,
        sessions: adapter.sessions ? adapter.sessions.size : null,
        packets: adapter.packets ? adapter.packets.length : null,
        rss: process.memoryUsage().rss,
      }),
    );
    return;
  }
  res.statusCode = 404;
  res.end();
});

const io = new Server(httpServer, {
  // The benchmark's clients speak the WebSocket transport directly (no long-polling first).
  transports: ["websocket"],
  serveClient: false,
  connectionStateRecovery: {
    maxDisconnectionDuration: 2 * 60 * 1000,
    skipMiddlewares: true,
  },
});

io.on("connection", (socket) => {
  socket.on("subscribe", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack();
  });
  socket.on("publish", (room, data, ack) => {
    io.to(room).emit("message", data);
    if (typeof ack === "function") ack();
  });
});

httpServer.listen({ host, port, backlog }, () => {
  console.log(`listening on ${host}:${port}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
