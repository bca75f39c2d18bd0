#!/usr/bin/env python3
"""A 3-member Macula Raft group beside a 3-member etcd cluster, both on
loopback, loaded by the same client (`macula bench kv`) in one invocation:
put latency (one client), linearizable get latency, put throughput (64
clients), and leader failover after kill -9 (time until a new leader is
seen, and the longest gap between two acknowledged writes of a client
writing throughout). Both run with their default timings (etcd: heartbeat
100 ms, election 1000 ms; Macula: heartbeat 100 ms, election 400-800 ms).
Bounded: every wait has a deadline; everything started is killed at the end.

    cargo build --release -p macula-cli
    apt-get install etcd-server etcd-client   # etcd 3.4 (Debian)
    scripts/bench-raft.py [--bin target/release/macula] [--rounds 2]
"""
import argparse, json, os, re, signal, subprocess, tempfile, threading, time, urllib.request

REALM = "bench.raft"


def drain(p):
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()


def field(p, key, limit=30):
    end = time.time() + limit
    while time.time() < end:
        line = p.stdout.readline()
        m = re.search(rf"{key}: (\S+)", line)
        if m:
            return m.group(1)
    raise SystemExit(f"no {key!r} line")


class Macula:
    def __init__(self, bin, root):
        self.bin, self.procs, self.http, self.ids = bin, [], [], []
        dirs = [os.path.join(root, f"m{i}") for i in range(3)]
        for d in dirs:
            out = subprocess.run([bin, "identity", "--data-dir", d], capture_output=True,
                                 text=True, check=True).stdout.strip()
            self.ids.append(out.split()[-1])
        members = ",".join(self.ids)
        addr = None
        for d in dirs:
            args = ["start", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--realm", REALM,
                    "--data-dir", d, "--raft-group", "bench", "--raft-members", members]
            if addr:
                args += ["--bootstrap", addr]
            p = subprocess.Popen([bin] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env={**os.environ, "RUST_LOG": "warn"})
            listen, http = field(p, "listen"), field(p, "http")
            drain(p)
            addr = addr or listen
            self.procs.append(p)
            self.http.append(http)
        self.addr = addr

    def leader(self, alive=None):
        """The leader's index as every live member sees it, or None."""
        seen = set()
        for i, h in enumerate(self.http):
            if alive is not None and i not in alive:
                continue
            try:
                with urllib.request.urlopen(f"http://{h}/admin/raft", timeout=2) as r:
                    doc = json.load(r)
            except OSError:
                return None
            groups = doc.get("groups", doc) if isinstance(doc, dict) else doc
            g = next((g for g in groups if g.get("name") == "bench"), None)
            if not g or not g.get("leader"):
                return None
            seen.add(g["leader"])
        if len(seen) != 1:
            return None
        lid = seen.pop()
        return self.ids.index(lid) if lid in self.ids else None

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


class Etcd:
    def __init__(self, root):
        self.procs, self.urls = [], []
        peers = [f"127.0.0.1:{23800 + i}" for i in range(3)]
        clients = [f"127.0.0.1:{23790 + i}" for i in range(3)]
        cluster = ",".join(f"e{i}=http://{peers[i]}" for i in range(3))
        for i in range(3):
            p = subprocess.Popen([
                "etcd", "--name", f"e{i}", "--data-dir", os.path.join(root, f"e{i}"),
                "--listen-peer-urls", f"http://{peers[i]}", "--initial-advertise-peer-urls",
                f"http://{peers[i]}", "--listen-client-urls", f"http://{clients[i]}",
                "--advertise-client-urls", f"http://{clients[i]}", "--initial-cluster", cluster,
                "--initial-cluster-state", "new", "--initial-cluster-token", "bench",
                "--log-level", "warn"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            drain(p)
            self.procs.append(p)
            self.urls.append(f"http://{clients[i]}")
        end = time.time() + 30
        while self.leader() is None:
            if time.time() > end:
                raise SystemExit("etcd elected no leader in 30 s")
            time.sleep(0.1)

    def leader(self, alive=None):
        for i, u in enumerate(self.urls):
            if alive is not None and i not in alive:
                continue
            try:
                req = urllib.request.Request(u + "/v3/maintenance/status", data=b"{}", method="POST")
                with urllib.request.urlopen(req, timeout=2) as r:
                    st = json.load(r)
                if st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    return i
            except OSError:
                continue
        return None

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


def load(bin, target, extra):
    out = subprocess.run([bin, "bench", "kv", *target, "--json", *extra], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "MACULA_REALM": REALM,
                                                      "RUST_LOG": "error"})
    if out.returncode != 0:
        raise SystemExit(f"bench kv {target} failed: {out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def failover(bin, cluster, target):
    """Kills the leader 2 s into a 6 s write loop; (new leader s, gap ms, lost)."""
    writer = subprocess.Popen([bin, "bench", "kv", *target, "--json", "--failover-secs", "6"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MACULA_REALM": REALM, "RUST_LOG": "error"})
    time.sleep(2)
    old = cluster.leader()
    if old is None:
        raise SystemExit("no leader before the kill")
    cluster.procs[old].send_signal(signal.SIGKILL)
    t0 = time.perf_counter()
    cluster.procs[old].wait()
    alive = {i for i in range(3) if i != old}
    while True:
        new = cluster.leader(alive)
        if new is not None and new != old:
            break
        if time.perf_counter() - t0 > 30:
            raise SystemExit("no new leader within 30 s")
        time.sleep(0.01)
    took = time.perf_counter() - t0
    out, err = writer.communicate(timeout=120)
    if writer.returncode != 0:
        raise SystemExit(f"failover writer failed: {out}{err}")
    f = json.loads(out.strip().splitlines()[-1])["failover"]
    return took, f["longest_gap_ms"], f["lost"], f["acknowledged"]


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--bin", default="target/release/macula")
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--count", type=int, default=2000)
    args = a.parse_args()
    root = tempfile.TemporaryDirectory()
    etcd = Etcd(os.path.join(root.name, "etcd"))
    mac = Macula(args.bin, os.path.join(root.name, "macula"))
    try:
        end = time.time() + 30
        while mac.leader() is None:
            if time.time() > end:
                raise SystemExit("the Macula group elected no leader in 30 s")
            time.sleep(0.1)
        et = ["--etcd", ",".join(etcd.urls)]
        mt = ["--macula", mac.addr, "--group", "bench"]
        rows = []
        for r in range(args.rounds):
            for name, t in (("etcd", et), ("macula", mt)):
                rep = load(args.bin, t, ["--count", str(args.count)])
                rows.append((name, r, rep))
                print(f"round {r} {name:6}: put p50 {rep['put']['p50_us']:7.0f} us p99 "
                      f"{rep['put']['p99_us']:7.0f} us | get p50 {rep['get']['p50_us']:7.0f} us "
                      f"p99 {rep['get']['p99_us']:7.0f} us | {rep['throughput_puts_per_s']:7.0f} "
                      f"puts/s (64 clients)", flush=True)
        for name, cluster, t in (("etcd", etcd, et), ("macula", mac, mt)):
            took, gap, lost, acked = failover(args.bin, cluster, t)
            print(f"failover {name:6}: new leader {took*1000:5.0f} ms after kill -9; "
                  f"longest write gap {gap:5.0f} ms; {acked} writes acknowledged, {lost} lost",
                  flush=True)
    finally:
        mac.stop()
        etcd.stop()


if __name__ == "__main__":
    main()
