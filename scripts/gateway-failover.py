#!/usr/bin/env python3
"""Events lost, duplicated and told (Lagged) when a subscriber's gateway is
killed (SIGKILL) under a steady stream; loopback only, every process bounded.

    scripts/gateway-failover.py [--bin target/release/macula] [--runs 3]
                                [--rate 2000] [--seconds 20] [--kill-at 6]
                                [--gateways 1|2|both] [--restart-after S]

Starts three daemons (A, B, C), a subscriber `macula sub --json` attached
through `--connect B,C,A` (with `--single-gateway` for the one-gateway
case), and a publisher `macula pub --count rate*seconds --rate rate` attached
to A. At --kill-at seconds into the stream it kills B, the subscriber's
first (primary) gateway, with SIGKILL. When the publisher is done (and the
stream has drained, at most 20 s) it stops the subscriber and prints per
run: published, received (distinct seq), duplicates, lost (published minus
received), told (sum of the Lagged counts the subscriber printed), and the
failover time: kill -> first event after the longest silence in the
subscriber's stream following the kill (the stall), with that silence.

With --restart-after S the subscriber is attached through B alone and B is
started again S seconds after the kill (same data directory, same port):
the failover time is then the recovery time after a restart of S seconds.
"""
import argparse, json, os, re, signal, subprocess, sys, tempfile, threading, time

REALM = "bench.gwfailover"


def spawn(bin_, args, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACULA_")}
    env["RUST_LOG"] = env.get("RUST_LOG", "warn")
    return subprocess.Popen([bin_] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, text=True, **kw)


def field(proc, key, limit=20):
    """The value of the first `key: value` line on stdout."""
    end = time.time() + limit
    prefix = key + ": "
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise RuntimeError(f"no {key!r} line")


def drain(pipe, sink):
    for line in pipe:
        sink(line)


def start_daemon(bin_, tmp, name, bootstrap=None, listen="127.0.0.1:0"):
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    args = ["start", "--listen", listen, "--http", "127.0.0.1:0",
            "--realm", REALM, "--data-dir", d]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    p = spawn(bin_, args)
    addr = field(p, "listen")
    threading.Thread(target=drain, args=(p.stdout, lambda l: None), daemon=True).start()
    threading.Thread(target=drain, args=(p.stderr, lambda l: None), daemon=True).start()
    return p, addr


def one_run(bin_, gateways, rate, seconds, kill_at, restart_after=None):
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            a, a_addr = start_daemon(bin_, tmp, "a")
            procs.append(a)
            b, b_addr = start_daemon(bin_, tmp, "b", a_addr)
            procs.append(b)
            c, c_addr = start_daemon(bin_, tmp, "c", a_addr)
            procs.append(c)
            time.sleep(2)  # joins settle
            connect = b_addr if restart_after is not None else f"{b_addr},{c_addr},{a_addr}"
            sub_args = ["sub", "gw.**", "--json", "--realm", REALM,
                        "--connect", connect]
            if gateways == 1:
                sub_args.append("--single-gateway")
            sub = spawn(bin_, sub_args)
            procs.append(sub)
            events = []  # (arrival time, seq)
            told = []
            subscribed = threading.Event()

            def on_err(line):
                if "subscribed to" in line:
                    subscribed.set()
                m = re.search(r"missed (\d+) event", line)
                if m:
                    told.append((time.time(), int(m.group(1))))

            def on_out(line):
                try:
                    events.append((time.time(), json.loads(line)["seq"]))
                except (ValueError, KeyError):
                    pass

            threading.Thread(target=drain, args=(sub.stdout, on_out), daemon=True).start()
            threading.Thread(target=drain, args=(sub.stderr, on_err), daemon=True).start()
            if not subscribed.wait(20):
                raise RuntimeError("subscriber did not subscribe")
            count = int(rate * seconds)
            pub = spawn(bin_, ["pub", "gw.x", "tick", "--count", str(count),
                               "--rate", str(rate), "--realm", REALM,
                               "--connect", a_addr])
            procs.append(pub)
            # Wait for the first event, then kill B kill_at seconds later.
            end = time.time() + 20
            while not events and time.time() < end:
                time.sleep(0.01)
            time.sleep(kill_at)
            killed = time.time()
            b.send_signal(signal.SIGKILL)
            b.wait()
            if restart_after is not None:
                time.sleep(restart_after)
                b, _ = start_daemon(bin_, tmp, "b", a_addr, listen=b_addr)
                procs.append(b)
            pub.wait(timeout=seconds * 4 + 60)
            # Drain: until the last seq arrived or nothing arrives for 5 s
            # (at most 20 s).
            end = time.time() + 20
            last_len = -1
            quiet_since = time.time()
            while time.time() < end:
                if events and events[-1][1] >= count:
                    break
                if len(events) != last_len:
                    last_len, quiet_since = len(events), time.time()
                elif time.time() - quiet_since > 5:
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            sub.send_signal(signal.SIGTERM)
            try:
                sub.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sub.kill()
            seqs = [s for _, s in events]
            distinct = len(set(seqs))
            # Longest silence after the kill, and when it ended.
            after = [t for t, _ in events if t >= killed]
            prev, gap, resumed = killed, 0.0, None
            for t in after:
                if t - prev > gap:
                    gap, resumed = t - prev, t
                prev = t
            return {
                "gateways": gateways,
                "restart_after_s": restart_after,
                "published": count,
                "received": distinct,
                "duplicates": len(seqs) - distinct,
                "lost": count - distinct,
                "told": sum(n for _, n in told),
                "failover_s": round(resumed - killed, 2) if resumed else None,
                "longest_silence_s": round(gap, 2),
            }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/macula")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--kill-at", type=float, default=6)
    ap.add_argument("--gateways", default="both", choices=["1", "2", "both"])
    ap.add_argument("--restart-after", type=float, default=None)
    args = ap.parse_args()
    modes = [1, 2] if args.gateways == "both" else [int(args.gateways)]
    for g in modes:
        for _ in range(args.runs):
            r = one_run(args.bin, g, args.rate, args.seconds, args.kill_at,
                        args.restart_after)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())
