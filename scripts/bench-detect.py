#!/usr/bin/env python3
"""Time to detect a dead peer: a `macula start` daemon A, and a full node B
(`macula start`, joined to A) that is killed with SIGKILL, N times over.
Each round polls A's /metrics every 10 ms until `macula_peers_declared_down_total`
grows, and reports p50/p99/max of kill -> declared down. Loopback only,
bounded (N rounds, 30 s each at most).

    cargo build --release -p macula-cli
    scripts/bench-detect.py [--bin target/release/macula] [--rounds 30]
"""
import argparse, os, re, signal, subprocess, tempfile, threading, time, urllib.request

def spawn(bin, args):
    return subprocess.Popen([bin] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "RUST_LOG": "warn"})

def field(p, key, limit=20):
    end = time.time() + limit
    while time.time() < end:
        line = p.stdout.readline()
        m = re.search(rf"{key}: (\S+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"no {key!r} line")

def metric(http, name):
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0

def peers(http):
    with urllib.request.urlopen(f"http://{http}/admin/peers", timeout=5) as r:
        return r.read().decode()

def main():
    a = argparse.ArgumentParser()
    a.add_argument("--bin", default="target/release/macula")
    a.add_argument("--rounds", type=int, default=30)
    args = a.parse_args()
    realm = "bench.detect"
    dirs = tempfile.TemporaryDirectory()
    A = spawn(args.bin, ["start", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
                         "--realm", realm, "--data-dir", os.path.join(dirs.name, "a")])
    try:
        addr, http = field(A, "listen"), field(A, "http")
        # Keep reading A's output so its pipe never fills.
        threading.Thread(target=lambda: [None for _ in A.stdout], daemon=True).start()
        times = []
        for i in range(args.rounds):
            d = os.path.join(dirs.name, f"b{i}")
            B = spawn(args.bin, ["start", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
                                 "--realm", realm, "--data-dir", d, "--bootstrap", addr])
            bid = field(B, "node_id")
            threading.Thread(target=lambda p=B: [None for _ in p.stdout], daemon=True).start()
            end = time.time() + 30
            while bid not in peers(http) and time.time() < end:
                time.sleep(0.05)
            time.sleep(0.5)  # some traffic (health, DHT) on the connection
            before = metric(http, "macula_peers_declared_down_total")
            B.send_signal(signal.SIGKILL)
            t0 = time.perf_counter()
            B.wait()
            while metric(http, "macula_peers_declared_down_total") <= before:
                if time.perf_counter() - t0 > 30:
                    raise SystemExit("not detected within 30 s")
                time.sleep(0.01)
            times.append(time.perf_counter() - t0)
        times.sort()
        pct = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))]
        print(f"detect dead peer (kill -9), {len(times)} rounds: p50 {pct(0.5)*1000:.0f} ms, "
              f"p99 {pct(0.99)*1000:.0f} ms, min {times[0]*1000:.0f} ms, max {times[-1]*1000:.0f} ms")
    finally:
        A.send_signal(signal.SIGTERM)
        A.wait(timeout=10)

if __name__ == "__main__":
    main()
