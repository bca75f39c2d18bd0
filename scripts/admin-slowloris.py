#!/usr/bin/env python3
"""Times /live and /ready on a node's admin port while N slow-loris
connections (a partial request head, then one byte a second) hold it, from
127.0.0.2 (loopback only). Bounded: runs for --seconds, then closes all.

    scripts/admin-slowloris.py --admin 127.0.0.1:8080 [--conns 1000] [--seconds 20]

Prints p50/p99/max of the probe times and how many probes were answered.
"""
import argparse, asyncio, time

async def loris(host, port, stop):
    try:
        r, w = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
    except OSError:
        return
    try:
        w.write(b"GET /live HTTP/1.1\r\nHost: x\r\n")
        await w.drain()
        while not stop.is_set():
            await asyncio.sleep(1)
            w.write(b"X")
            await w.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        w.close()

async def probe(host, port, path):
    t = time.perf_counter()
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    line = await asyncio.wait_for(r.readline(), 10)
    w.close()
    return time.perf_counter() - t, line.decode().strip()

async def main():
    a = argparse.ArgumentParser()
    a.add_argument("--admin", default="127.0.0.1:8080")
    a.add_argument("--conns", type=int, default=1000)
    a.add_argument("--seconds", type=float, default=20)
    args = a.parse_args()
    host, port = args.admin.rsplit(":", 1)
    assert host.startswith("127."), "loopback only"
    port = int(port)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loris(host, port, stop)) for _ in range(min(args.conns, 5000))]
    await asyncio.sleep(3)  # let the flood take every slot
    times, answered, failed = [], 0, 0
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        for path in ("/live", "/ready"):
            try:
                dt, line = await probe(host, port, path)
                times.append(dt)
                answered += line.startswith("HTTP/1.1")
            except (OSError, asyncio.TimeoutError):
                failed += 1
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    times.sort()
    pct = lambda p: times[min(len(times) - 1, int(p * len(times)))] * 1e3 if times else float("nan")
    print(f"{args.conns} slow-loris connections: {answered} probes answered, {failed} failed; "
          f"p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {times[-1]*1e3 if times else float('nan'):.1f} ms")

asyncio.run(main())
