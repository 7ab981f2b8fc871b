#!/usr/bin/env python3
"""bench/fanout-callgrind.sh drives this. Fixed fan-out against a running `spool serve` (memory engine, anonymous allowed):
N_WS WebSocket and N_SSE SSE subscribers on one stream (or spread over STREAMS streams, subscriber i
on stream i % STREAMS), then K messages per stream published over HTTP (round-robin over the
streams). Run once with K messages and once with K=0 under callgrind: the difference of the two
totals is the cost of publishing the messages and delivering K to every subscriber."""
import asyncio, base64, os, sys, time

host, port = "127.0.0.1", int(sys.argv[1])
_pid, n_ws, n_sse, k = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
n_streams = int(sys.argv[6]) if len(sys.argv) > 6 else 1
STREAMS = ["fan"] if n_streams == 1 else [f"fan-{s}" for s in range(n_streams)]
counts = {}

def ws_frame(text):
    data = text.encode(); mask = os.urandom(4)
    hdr = bytes([0x81]) + (bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + len(data).to_bytes(2, "big"))
    return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

def pong(payload):
    mask = os.urandom(4)
    return bytes([0x8A, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

async def ws_sub(i, ready):
    r, w = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write((f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: spool.v1.json\r\n\r\n").encode())
    await r.readuntil(b"\r\n\r\n")
    w.write(ws_frame('{"type":"connect"}') + ws_frame('{"type":"subscribe","stream":"%s"}' % STREAMS[i % n_streams]))
    await w.drain()
    n = 0
    while True:
        h = await r.readexactly(2)
        op, ln = h[0] & 0x0F, h[1] & 0x7F
        if ln == 126: ln = int.from_bytes(await r.readexactly(2), "big")
        elif ln == 127: ln = int.from_bytes(await r.readexactly(8), "big")
        p = await r.readexactly(ln)
        if op == 0x9:
            w.write(pong(p)); continue
        if op == 0x8:
            raise RuntimeError(f"ws {i} closed: {p!r}")
        if p.startswith(b'{"type":"subscribed"'):
            ready.set()
        elif p.startswith(b'{"type":"message"'):
            n += 1; counts[("ws", i)] = n
            if n == k:
                w.close(); return

async def sse_sub(i, ready):
    r, w = await asyncio.open_connection(host, port)
    w.write(f"GET /v1/streams/{STREAMS[i % n_streams]}/events?format=json HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    ready.set()
    n = 0; buf = b""
    while True:
        size = int((await r.readline()).strip(), 16)
        chunk = await r.readexactly(size + 2)
        buf += chunk[:-2]
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if b'data: {"epoch"' in ev:
                n += 1; counts[("sse", i)] = n
                if n == k:
                    w.close(); return

async def publish():
    r, w = await asyncio.open_connection(host, port)
    for m in range(k * n_streams):
        body = (f"{m}:" + "x" * 120).encode()
        w.write((f"POST /v1/streams/{STREAMS[m % n_streams]}/messages HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        head = await r.readuntil(b"\r\n\r\n")
        ln = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        await r.readexactly(ln)
    w.close()

async def main():
    readies = []; tasks = []
    for i in range(n_ws):
        e = asyncio.Event(); readies.append(e); tasks.append(asyncio.create_task(ws_sub(i, e)))
    for i in range(n_sse):
        e = asyncio.Event(); readies.append(e); tasks.append(asyncio.create_task(sse_sub(i, e)))
    for e in readies:
        await asyncio.wait_for(e.wait(), 600)
    await asyncio.sleep(2)
    t = time.time()
    if k > 0:
        await publish()
        await asyncio.wait_for(asyncio.gather(*tasks), 1800)
    else:
        for t_ in tasks: t_.cancel()
    print(f"deliveries {sum(counts.values())} in {time.time()-t:.1f}s", flush=True)

asyncio.run(main())
