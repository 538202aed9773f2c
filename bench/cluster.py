#!/usr/bin/env python3
"""What crossing nodes costs: frames delivered on the producer's node vs on another node, over Redis.

    python bench/cluster.py                          # ~40 s: two phases of 10 s each
    python bench/cluster.py --duration 20 --fps 30 --streams 4 --consumers 4 --bytes 32768
    python bench/cluster.py --json bench/results/cluster.json

It starts two `watchout serve` processes on loopback, A and B, each with `broker_url` on the local
Redis (a key prefix of its own) and, unless WATCHOUT_MONGO_URL is set, its own embedded store. Then:

same   phones on A stream at a fixed rate to consumers on A: frames never leave A (A still checks
       once a second per stream whether another node listens, as every node of a cluster does);
cross  phones on A stream to consumers on B: A publishes each frame once, in binary form, on the
       stream's Redis channel; B turns it back into the consumers' JSON and fans it out.

Measured per phase, over the same window: frames delivered per second and their latency (the phone's
send call to the consumer's receipt, one clock for every local process), CPU seconds of A, B and Redis
per delivered frame (/proc/PID/stat), and the cross-node overhead: CPU per delivered frame summed over
both nodes in `cross` / A's in `same`. The clients are bench/relay.py's, each group in its own process.
With embedded stores a stream must exist on both nodes: each `cross` stream is registered on B once
(and let go) before its phone registers on A. bench/README.md explains the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay  # noqa: E402 - bench/relay.py: the client workers, /proc readings and the server runner

PHASES = ("same", "cross")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 2
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of frames before each window (A starts publishing within 1 s of B listening)")
    p.add_argument("--streams", type=int, default=4, help="phones, one stream each")
    p.add_argument("--fps", type=float, default=30.0, help="frames a second per phone")
    p.add_argument("--bytes", type=int, default=32768, help="raw bytes per frame (base64 in JSON)")
    p.add_argument("--consumers", type=int, default=4, help="dashboards per stream")
    p.add_argument("--phases", default="same,cross", help="comma-separated subset of same,cross")
    p.add_argument("--procs", type=int, default=max(1, min(4, cpus - 1)), help="client processes for the consumers")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the Redis both nodes use")
    p.add_argument("--heartbeat", type=float,
                   help="the nodes' broker_heartbeat_s (default 2, Watchout's default)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.pin = False  # relay.Bench reads it: clients and servers share the CPUs here
    args.phase_list = [s.strip() for s in args.phases.split(",") if s.strip()]
    if not args.phase_list or set(args.phase_list) - set(PHASES):
        p.error("--phases takes same, cross or both")
    if args.bytes < relay.HEADER.size + 3 or args.streams < 1 or args.consumers < 1 or args.fps <= 0:
        p.error("--bytes must be at least 27; --streams, --consumers and --fps positive")
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be positive, --warmup 0 or more")
    if args.heartbeat is None:
        args.heartbeat = 2.0  # Watchout's default
    return args


# =============================================================================== the nodes and Redis

class Node:
    """One `watchout serve` (relay.OwnServer) and how to read its figures."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, admin_token: str) -> None:
        self.name = name
        self.server = relay.OwnServer({**env, "WATCHOUT_NODE_ID": f"bench-{name}"}, log_dir / f"node-{name}.log")
        self.url = self.server.url
        self.pid = self.server.process.pid
        parsed = urllib.parse.urlsplit(self.url)
        self.http = f"http://{parsed.hostname}:{parsed.port}"
        self.admin_token = admin_token

    def stats(self) -> dict[str, Any]:
        """This node's own line of the cluster /stats (frames relayed and dropped here); {} if unreachable."""
        request = urllib.request.Request(self.http + "/stats", headers={"Authorization": "Bearer " + self.admin_token})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                data = json.loads(response.read())
        except (OSError, ValueError):
            return {}
        mine = [n for n in data.get("nodes", []) if n.get("self")]
        return mine[0] if mine else {}

    def cpu_s(self) -> float:
        user, system, _ = relay.proc_stat(self.pid)
        return user + system


def redis_pid(url: str) -> int | None:
    """The local Redis server's pid (INFO server), to count its CPU; None when remote or unreadable."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2.0)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    host = urllib.parse.urlsplit(url).hostname
    return pid if host in ("127.0.0.1", "localhost", "::1") and Path(f"/proc/{pid}/stat").exists() else None


def drop_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def pre_register(url: str, token: str, stream_ids: list[str]) -> None:
    """Create the streams in a node's own store: a phone registers each once and goes away."""
    from websockets.sync.client import connect

    for sid in stream_ids:
        with connect(url, open_timeout=10, proxy=None, max_size=None) as ws:
            ws.send(json.dumps(relay._register_msg(sid, token)))
            while True:
                reply = json.loads(ws.recv(timeout=10))
                if reply.get("type") == "registered":
                    break
                if reply.get("type") == "error":
                    raise relay.BenchError(f"pre-registering {sid} on {url}: {reply.get('code')}")


# =============================================================================== one phase

def run_phase(name: str, args: argparse.Namespace, bench: relay.Bench, a: Node, b: Node,
              redis: int | None) -> dict[str, Any]:
    """Phones on A; consumers on A (same) or B (cross); every figure over one measured window."""
    consumer_node = a if name == "same" else b
    streams = [(i, f"bench-{name}-{bench.tag}-{i}") for i in range(args.streams)]
    if consumer_node is not a:
        pre_register(b.url, bench.tokens["user"], [sid for _, sid in streams])
    consumers = [(i * args.consumers + j, sid, "dashboard", i) for i, sid in streams for j in range(args.consumers)]
    groups = bench.consumer_groups(len(consumers))
    producer = bench.proc(f"{name}-phones", "frame-producer",
                          {"url": a.url, "streams": streams, "frame_bytes": args.bytes, "mode": "rate",
                           "fps": args.fps})
    cons = [bench.proc(f"{name}-consumers{k}", "frame-consumer",
                       {"url": consumer_node.url, "clients": [consumers[i] for i in g], "window": "send"})
            for k, g in enumerate(groups)]
    procs = bench.spawn([producer, *cons])
    pids = [p.pid for p in procs]
    try:
        producer.call("setup", 30)
        relay.call_all(cons, "setup", 30)
        stats0 = {n.name: n.stats() for n in (a, b)}
        t_start, t0, t1 = bench.timeline(args.warmup)
        relay.call_all(procs, "start", 10, t_start=t_start, t0=t0, t1=t1)
        relay.sleep_until_ns(t0)
        before = _cpu(a, b, redis, pids)
        relay.sleep_until_ns(t1)
        after = _cpu(a, b, redis, pids)
        prod = producer.call("finish", 10, drain_s=0)
        sent_window = {int(k): v for k, v in prod["sent_window"].items()}
        per_proc = {p.name: {"expect": {consumers[i][0]: sent_window[consumers[i][3]] for i in g}}
                    for p, g in zip(cons, groups)}
        results = relay.call_all(cons, "finish", 10, per_proc, drain_s=1.5)
        stats1 = {n.name: n.stats() for n in (a, b)}
        relay.call_all(procs, "close", 15)
    finally:
        for p in procs:
            p.stop()
    wall = after["t"] - before["t"]
    cpu = {k: round(after[k] - before[k], 3) for k in ("A", "B", "redis") if after.get(k) is not None}
    clients = [(after["clients"][p] - before["clients"][p]) / wall for p in after["clients"] if p in before["clients"]]
    sent = sum(sent_window.values())
    expected = sent * args.consumers
    delivered = sum(sum(r["in_window"].values()) for r in results)
    res: dict[str, Any] = {
        "phase": name, "consumers_on": consumer_node.name,
        "desc": f"{args.streams} phones x {args.fps:g} fps on A -> {args.consumers} dashboards each on "
                f"{consumer_node.name}, {args.bytes} B frames ({prod['message_bytes']} B JSON)",
        "frames_sent_in_window": sent, "delivered": delivered,
        "delivered_per_s": round(delivered / args.duration, 1),
        "delivered_ratio": round(delivered / expected, 4) if expected else None,
        "lost": expected - delivered, "dup": sum(sum(r["dup"].values()) for r in results),
        "wall_s": round(wall, 3), "cpu_s": cpu,
        "cpu_us_per_frame": {k: round(v / delivered * 1e6, 1) if delivered else None for k, v in cpu.items()},
        "client_util_max": round(max(clients), 3) if clients else None,
        "client_util_sum": round(sum(clients), 3) if clients else None,
        "frames_dropped": {n: relay._delta(stats0[n], stats1[n], "framesDropped") for n in ("A", "B")},
        **relay.percentiles(relay.latencies(results)),
    }
    res["nodes_cpu_us_per_frame"] = round((cpu["A"] + cpu["B"]) / delivered * 1e6, 1) if delivered else None
    res["notes"] = relay.Bench.issues([prod, *results])
    return res


def _cpu(a: Node, b: Node, redis: int | None, client_pids: list[int]) -> dict[str, Any]:
    reading: dict[str, Any] = {"t": time.monotonic(), "A": a.cpu_s(), "B": b.cpu_s(), "clients": {}}
    if redis is not None:
        user, system, _ = relay.proc_stat(redis)
        reading["redis"] = user + system
    for pid in client_pids:
        try:
            user, system, _ = relay.proc_stat(pid)
            reading["clients"][pid] = user + system
        except OSError:
            pass
    return reading


# =============================================================================== report

def table(results: list[dict[str, Any]]) -> str:
    head = ("phase", "consumers on", "delivered/s", "ratio", "p50 ms", "p99 ms", "max ms", "CPU A s", "CPU B s",
            "Redis s", "µs/frame A", "µs/frame B", "µs/frame A+B", "cli CPU% max/sum")
    rows = [head]
    for r in results:
        if r.get("error"):
            rows.append((r["phase"], "-", "FAILED: " + r["error"], *[""] * (len(head) - 3)))
            continue
        per = r["cpu_us_per_frame"]
        cli = "-" if r["client_util_max"] is None else \
            f"{r['client_util_max'] * 100:.0f}/{r['client_util_sum'] * 100:.0f}"
        rows.append((r["phase"], r["consumers_on"] + (" (producer's)" if r["phase"] == "same" else " (other)"),
                     relay._fmt(r["delivered_per_s"], 0), relay._fmt(r["delivered_ratio"], 4),
                     relay._fmt(r["p50_ms"], 2), relay._fmt(r["p99_ms"], 2), relay._fmt(r["max_ms"], 2),
                     relay._fmt(r["cpu_s"]["A"], 2), relay._fmt(r["cpu_s"]["B"], 2),
                     relay._fmt(r["cpu_s"].get("redis"), 2), relay._fmt(per["A"], 1), relay._fmt(per["B"], 1),
                     relay._fmt(r["nodes_cpu_us_per_frame"], 1), cli))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def overhead(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """CPU per delivered frame: both nodes in `cross` over A in `same` (and with Redis's share added)."""
    by = {r["phase"]: r for r in results if not r.get("error")}
    if set(by) != set(PHASES):
        return None
    same, cross = by["same"], by["cross"]
    same_us = same["cpu_us_per_frame"]["A"]
    if not same_us or not cross["nodes_cpu_us_per_frame"]:
        return None
    out: dict[str, Any] = {"same_us_per_frame": same_us, "cross_us_per_frame": cross["nodes_cpu_us_per_frame"],
                           "ratio": round(cross["nodes_cpu_us_per_frame"] / same_us, 2)}
    if cross["cpu_us_per_frame"].get("redis") is not None:
        with_redis = cross["nodes_cpu_us_per_frame"] + cross["cpu_us_per_frame"]["redis"]
        out["ratio_with_redis"] = round(with_redis / (same_us + (same["cpu_us_per_frame"].get("redis") or 0)), 2)
    return out


# =============================================================================== main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench/cluster.py reads /proc for CPU: Linux only", file=sys.stderr)
        return 2
    try:
        import orjson  # noqa: F401 - the client workers need these
        import redis  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as exc:
        print(f"bench/cluster.py needs {exc.name}: pip install -e '.[test]'", file=sys.stderr)
        return 2
    relay.raise_fd_limit(8192)
    began = time.monotonic()
    tag = secrets.token_hex(3)
    prefix = f"watchout-bench-{tag}:"
    env = dict(os.environ)
    env.update(WATCHOUT_JWT_SECRET=secrets.token_urlsafe(48), WATCHOUT_BROKER_URL=args.redis_url,
               WATCHOUT_BROKER_PREFIX=prefix, WATCHOUT_BROKER_HEARTBEAT_S=str(args.heartbeat))
    for name in ("WATCHOUT_JWT_PUBLIC_KEY_FILE", "WATCHOUT_JWT_ALGORITHMS", "WATCHOUT_NODE_ID"):
        env.pop(name, None)
    log_dir = Path(tempfile.mkdtemp(prefix="watchout-bench-cluster-"))
    nodes: list[Node] = []
    results: list[dict[str, Any]] = []
    try:
        redis_process = redis_pid(args.redis_url)
        tokens = relay.mint_tokens(relay.settings_for_tokens(env))
        for name in ("A", "B"):
            nodes.append(Node(name, env, log_dir, tokens["admin"]))
            print(f"[bench] node {name}: watchout serve (pid {nodes[-1].pid}) at {nodes[-1].url}", file=sys.stderr)
        a, b = nodes
        bench = relay.Bench(args, a.url, a.pid, tokens)
        bench.tag = tag
        for phase in [p for p in PHASES if p in args.phase_list]:
            print(f"[bench] {phase} running ...", file=sys.stderr, flush=True)
            try:
                results.append(run_phase(phase, args, bench, a, b, redis_process))
            except Exception as exc:  # noqa: BLE001 - one failed phase must not hide the other
                results.append({"phase": phase, "error": relay._describe(exc)[:400]})
    except relay.BenchError as exc:
        print(f"bench/cluster.py: {exc}", file=sys.stderr)
        return 1
    except (OSError, ImportError) as exc:
        print(f"bench/cluster.py: {type(exc).__name__}: {exc} (is Redis at {args.redis_url}?)", file=sys.stderr)
        return 1
    finally:
        for node in nodes:
            node.server.stop()
        try:
            drop_keys(args.redis_url, prefix)
        except Exception:  # noqa: BLE001 - the keys expire by themselves
            pass

    cpus = os.cpu_count() or 1
    print(f"\nWatchout cluster benchmark: 2 nodes + Redis ({args.redis_url}, broker_heartbeat_s {args.heartbeat:g}), "
          f"{args.duration:g} s per phase, {args.procs} consumer process(es), {cpus} CPUs, "
          f"{time.monotonic() - began:.0f} s in all")
    for r in results:
        if not r.get("error"):
            print(f"  {r['phase']}: {r['desc']}")
    print()
    print(table(results))
    ratio = overhead(results)
    if ratio is not None:
        line = (f"\nCross-node overhead: {ratio['cross_us_per_frame']:.1f} µs of node CPU per delivered frame "
                f"(A + B) vs {ratio['same_us_per_frame']:.1f} on one node: {ratio['ratio']:.2f}x")
        if "ratio_with_redis" in ratio:
            line += f"; {ratio['ratio_with_redis']:.2f}x counting Redis's CPU too"
        print(line)
    for r in results:
        for note in r.get("notes", []):
            print(f"  note ({r['phase']}): {note}")
    exit_codes = {n.name: n.server.exit_code for n in nodes}
    warnings = {n.name: n.server.log_summary() for n in nodes}
    print(f"\nnodes: exit codes {exit_codes}, logs in {log_dir}")
    for name, groups in warnings.items():
        for line, count in sorted(groups.items(), key=lambda kv: -kv[1])[:6]:
            print(f"  {name} x{count}  {line[:150]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results,
                                               "overhead": ratio, "exit_codes": exit_codes, "warnings": warnings},
                                              indent=2, default=str))
        print(f"\nJSON written to {args.json}")
    return 0 if results and all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
