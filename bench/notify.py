#!/usr/bin/env python3
"""Notifications under load: alerts at a fixed rate to 10 webhook endpoints, and what that does to frame latency.

    python bench/notify.py                                   # ~3 minutes: 2 rounds of base, each, all
    python bench/notify.py --duration 3 --pairs 1 --fanout each    # a quick check
    python bench/notify.py --alerts-per-s 500 --json bench/results/notify.json

The target (the issue): 1,000 alerts/s to 10 webhook endpoints on loopback with no loss, with the frame
latency of bench/relay.py's scenario B no worse than 1.2x the same run without notifications.

It starts one `watchout serve` (relay.OwnServer: a fresh data directory, a generated signing key,
webhook_allow_private on, log level warning), and one receiver process with 10 HTTP endpoints on
127.0.0.1 (a port each) that verify every request's Standard Webhooks signature, answer 204 and count
deliveries per alertId. Every phase streams scenario B (10 phones x 15 fps -> 2 dashboards + 1
ml-service each, 32 KiB frames; bench/relay.py's workers) while ml-service clients send alerts at a fixed
rate over the same 10 streams:

base   no webhooks registered: the alerts are stored (and fanned out to no one);
each   10 webhooks, webhook i for stream i only, to endpoint i: 1 POST per alert;
all    10 webhooks for every stream, one per endpoint: 10 POSTs per alert.

A round is base then each notify mode; --pairs rounds, one server for all of them (so every phase
measures the same process, store and caches; noise hits every phase of a round alike). After a notify
phase the script waits (at most --drain s) until every acknowledged alert reached its endpoint(s),
counts what is missing, then deletes the phase's webhooks (cancelling what is still pending) before
the next phase. bench/README.md explains the columns.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay  # noqa: E402 - bench/relay.py: the client workers, /proc readings and the server runner

MODES = ("each", "all")
ENDPOINTS = 10
FRAME_KINDS = ("dashboard", "ml-service", "dashboard")  # scenario B's consumers of each stream
MAX_SAMPLES = 2_000_000


def _now_us() -> int:
    """The send-time clock put into each alert's metadata: time.monotonic_ns() in µs (stays below 2**53)."""
    return time.monotonic_ns() // 1000


# =============================================================================== client side (workers)
# Run by relay._worker_entry in their own processes, like relay.py's workers; registered in relay.WORKERS
# below (a spawned child imports this file as __mp_main__ first, so the names exist there too).

class PacedAlerts(relay._Worker):
    """ml-services sending alerts at a fixed total rate, round robin over the streams, one connection per stream
    (subscribed with `consumes: []`, so they receive no frames); counts acks and keeps each ack's alertId."""

    def __init__(self, spec: dict[str, Any], credit: Any = None) -> None:
        super().__init__(spec)
        self.streams: list[tuple[int, str]] = spec["streams"]
        self.sent = 0
        self.sent_window = 0
        self.sent_us = array("q")  # per alert number k: send time (µs)
        self.acked: dict[int, tuple[str, int]] = {}  # k -> (alertId, stream index)
        self.ack_ms = array("d")
        self.duplicate_acks = 0
        self.behind_max_ms = 0.0
        self.pump_error: str | None = None
        self.pad = ("Person near the gate " * 8)[:max(0, spec["alert_bytes"] - 180)]

    async def cmd_setup(self) -> dict[str, Any]:
        async def one(index: int, sid: str) -> Any:
            ws = await relay._open(self.spec["url"])
            self.sockets.append(ws)
            message = {"type": "subscribe", "clientType": "ml-service", "streamId": sid,
                       "token": self.spec["ml_token"], "consumes": [], "produces": ["alert"]}
            await relay._handshake(ws, message, "subscribed")
            return ws
        self.ws = await asyncio.gather(*(one(i, sid) for i, sid in self.streams))
        for ws in self.ws:
            self.tasks.append(asyncio.create_task(self._read_acks(ws)))
        return {}

    async def _read_acks(self, ws: Any) -> None:
        import orjson
        from websockets.exceptions import ConnectionClosed
        index = {sid: i for i, sid in self.streams}
        try:
            while True:
                message = orjson.loads(await ws.recv(decode=False))
                kind = message.get("type")
                if kind == "ack":
                    k = int(message.get("ref") or -1)
                    if 0 <= k < len(self.sent_us):
                        if k in self.acked:
                            self.duplicate_acks += 1
                            continue
                        self.acked[k] = (message["alertId"], index.get(message.get("streamId"), -1))
                        self.ack_ms.append((_now_us() - self.sent_us[k]) / 1000)
                elif kind == "error":
                    self.note_error(message)
        except ConnectionClosed as exc:
            if not self.spec.get("closing"):
                self.note_close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, never silent
            self.closes[f"reader {type(exc).__name__}: {exc}"] = 1

    async def cmd_start(self, t_start: int, t0: int, t1: int) -> dict[str, Any]:
        self.tasks.append(asyncio.create_task(self._pump(t_start, t0, t1)))
        return {}

    async def _pump(self, t_start: int, t0: int, t1: int) -> None:
        import orjson
        period = 1e9 / self.spec["rate"]
        n = len(self.streams)
        k = 0
        try:
            while True:
                due = t_start + int(k * period)
                if due >= t1:
                    return
                delay = (due - time.monotonic_ns()) / 1e9
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.behind_max_ms = max(self.behind_max_ms, -delay * 1000)
                now_us = _now_us()
                index, sid = self.streams[k % n]
                alert = {"type": "alert", "id": str(k), "streamId": sid, "severity": "high",
                         "message": f"bench alert {k} {self.pad}", "timestamp": int(time.time() * 1000),
                         "metadata": {"confidence": 0.9, "objectType": "person", "seq": k, "t": now_us}}
                self.sent_us.append(now_us)
                await self.ws[k % n].send(orjson.dumps(alert), text=True)
                self.sent += 1
                if now_us * 1000 >= t0:
                    self.sent_window += 1
                k += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the result
            self.pump_error = relay._describe(exc)

    async def cmd_finish(self, drain_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + drain_s
        while len(self.acked) < self.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return {"sent": self.sent, "sent_window": self.sent_window, "acks": len(self.acked),
                "duplicate_acks": self.duplicate_acks, "acked": [(k, a, i) for k, (a, i) in self.acked.items()],
                "sent_us": self.sent_us.tobytes(), "ack_ms": self.ack_ms.tobytes(),
                "behind_max_ms": round(self.behind_max_ms, 1), "pump_error": self.pump_error,
                **self.common_result()}


class _Endpoint(asyncio.Protocol):
    """One webhook receiver connection: minimal HTTP/1.1 (Content-Length bodies), 204 for a verified request,
    401 for a bad signature, 400 for what it cannot parse."""

    def __init__(self, owner: WebhookReceivers, index: int) -> None:
        self.owner = owner
        self.index = index
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.owner.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = -1
            if length < 0 or "chunked" in headers.get("transfer-encoding", ""):
                self.owner.bad_requests += 1
                self._answer(400, True)
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            status = self.owner.receive(self.index, headers, body)
            self._answer(status, headers.get("connection", "").lower() == "close")

    def _answer(self, status: int, close: bool) -> None:
        reason = {204: "No Content", 400: "Bad Request", 401: "Unauthorized"}[status]
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n"
                             f"{'Connection: close' if close else ''}\r\n\r\n".encode())
        if close:
            self.transport.close()


class WebhookReceivers(relay._Worker):
    """The 10 webhook endpoints: each verifies the Standard Webhooks signature with its webhook's secret (given by
    `arm`), counts deliveries per alertId and records delivery latency (receipt - the alert's metadata.t)."""

    def __init__(self, spec: dict[str, Any], credit: Any = None) -> None:
        super().__init__(spec)
        self.servers: list[Any] = []
        self.connections = 0
        self.bad_requests = 0
        self._reset({})

    def _reset(self, secrets_by_endpoint: dict[int, str]) -> None:
        from standardwebhooks import Webhook
        self.verifiers = {int(i): Webhook(s) for i, s in secrets_by_endpoint.items()}
        self.counts: list[dict[str, int]] = [{} for _ in range(self.spec["endpoints"])]
        self.webhook_ids: set[str] = set()
        self.repeated_webhook_ids = 0
        self.bad_signatures = 0
        self.unarmed = 0
        self.received = 0
        self.recv_ns = array("q")  # every receipt's time
        self.sent_us = array("q")  # per receipt with a bench alert: its send time (µs) and latency (ms)
        self.latency = array("d")
        self.last_ns = 0

    async def cmd_setup(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for i in range(self.spec["endpoints"]):
            server = await loop.create_server(lambda i=i: _Endpoint(self, i), "127.0.0.1", 0, backlog=4096)
            self.servers.append(server)
        return {"ports": [s.sockets[0].getsockname()[1] for s in self.servers]}

    def receive(self, index: int, headers: dict[str, str], body: bytes) -> int:
        now = time.monotonic_ns()
        verifier = self.verifiers.get(index)
        if verifier is None:
            self.unarmed += 1
            return 401
        try:
            payload = verifier.verify(body, headers)
        except Exception:  # noqa: BLE001 - WebhookVerificationError and malformed bodies alike
            self.bad_signatures += 1
            return 401
        self.received += 1
        self.last_ns = now
        self.recv_ns.append(now)
        webhook_id = headers.get("webhook-id", "")
        if webhook_id in self.webhook_ids:
            self.repeated_webhook_ids += 1
        else:
            self.webhook_ids.add(webhook_id)
        data = payload.get("data") or {}
        alert_id = str(data.get("alertId"))
        counts = self.counts[index]
        counts[alert_id] = counts.get(alert_id, 0) + 1
        sent_us = (data.get("metadata") or {}).get("t")
        if isinstance(sent_us, int) and len(self.latency) < MAX_SAMPLES:
            self.sent_us.append(sent_us)
            self.latency.append((now / 1000 - sent_us) / 1000)
        return 204

    async def cmd_arm(self, secrets_by_endpoint: dict[int, str]) -> dict[str, Any]:
        self._reset(secrets_by_endpoint)
        return {}

    async def cmd_progress(self) -> dict[str, Any]:
        return {"unique": [len(c) for c in self.counts], "received": self.received, "last_ns": self.last_ns}

    async def cmd_collect(self) -> dict[str, Any]:
        result = {"counts": self.counts, "received": self.received, "repeated_webhook_ids": self.repeated_webhook_ids,
                  "bad_signatures": self.bad_signatures, "unarmed": self.unarmed, "bad_requests": self.bad_requests,
                  "connections": self.connections, "recv_ns": self.recv_ns.tobytes(),
                  "sent_us": self.sent_us.tobytes(), "latency": self.latency.tobytes(), "last_ns": self.last_ns}
        self._reset({})
        return result

    async def cmd_close(self) -> dict[str, Any]:
        for server in self.servers:
            server.close()
        return await super().cmd_close()


relay.WORKERS.update({"paced-alerts": PacedAlerts, "webhook-receivers": WebhookReceivers})


# =============================================================================== orchestrator side

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of frames and alerts before each window")
    p.add_argument("--pairs", type=int, default=2, help="rounds of base + notify phase(s)")
    p.add_argument("--fanout", choices=("each", "all", "both"), default="both",
                   help="each: alert of stream i -> endpoint i; all: every alert -> all 10 endpoints")
    p.add_argument("--alerts-per-s", type=float, default=1000.0, help="alerts a second, all streams together")
    p.add_argument("--alert-bytes", type=int, default=200, help="approximate alert message size")
    p.add_argument("--drain", type=float, default=30.0,
                   help="after a notify phase, wait at most this long for every webhook to arrive")
    p.add_argument("--streams", type=int, default=10, help="scenario B's streams (also the alerts' streams)")
    p.add_argument("--fps", type=float, default=15.0, help="scenario B's frames a second per stream")
    p.add_argument("--bytes", type=int, default=32768, help="scenario B's raw bytes per frame")
    p.add_argument("--procs", type=int, default=max(1, min(4, cpus - 1)), help="client processes for the consumers")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=cpus >= 2,
                   help="server on CPU 1, every client process (and the receivers) on CPU 0")
    p.add_argument("--profile", metavar="DIR",
                   help="record the server with py-spy (raw collapsed stacks, idle frames included, without pausing "
                        "the server) during each measured window into DIR (needs py-spy on PATH)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.modes = list(MODES) if args.fanout == "both" else [args.fanout]
    if args.duration <= 0 or args.warmup < 0 or args.pairs < 1 or args.alerts_per_s <= 0 or args.drain < 0:
        p.error("--duration, --alerts-per-s and --pairs must be positive, --warmup and --drain 0 or more")
    if args.streams < 1 or args.streams > ENDPOINTS or args.fps <= 0 or args.bytes < relay.HEADER.size + 3:
        p.error(f"--streams 1..{ENDPOINTS}, --fps positive, --bytes at least 27")
    if args.pin and cpus < 2:
        p.error("--pin needs at least 2 CPUs")
    return args


class Api:
    """The REST calls the bench makes: webhooks, /stats, /metrics."""

    def __init__(self, http: str, tokens: dict[str, str]) -> None:
        self.http = http
        self.tokens = tokens

    def call(self, method: str, path: str, body: Any = None, role: str = "user") -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.http + path, data=data, method=method,
                                         headers={"Authorization": "Bearer " + self.tokens[role],
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise relay.BenchError(f"{method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from None
        return json.loads(raw) if raw else None

    def stats(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = self.call("GET", "/stats", role="admin")
            return result
        except (OSError, ValueError, relay.BenchError):
            return {}

    def metrics(self) -> dict[str, float]:
        """watchout_deliveries_total by result and watchout_deliveries_pending; {} when unreadable."""
        try:
            with urllib.request.urlopen(self.http + "/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r'watchout_deliveries_total\{channel="webhook",result="([^"]+)"\} (\S+)', line)
            if match:
                out[match.group(1)] = float(match.group(2))
            elif line.startswith("watchout_deliveries_pending "):
                out["pending"] = float(line.split()[1])
        return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, all processes), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(fields[:8]) - fields[3] - fields[4]) / relay.CLK_TCK


def _samples(raw: bytes, kind: str = "d") -> array:
    values = array(kind)
    values.frombytes(raw)
    return values


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class Run:
    def __init__(self, args: argparse.Namespace, bench: relay.Bench, api: Api, receivers: relay.Proc,
                 ports: list[int]) -> None:
        self.args = args
        self.bench = bench
        self.api = api
        self.receivers = receivers
        self.ports = ports
        self.count = 0

    def webhooks(self, mode: str | None, streams: list[tuple[int, str]]) -> tuple[list[str], dict[int, str]]:
        """Register the phase's webhooks; (their ids, endpoint -> secret)."""
        ids, secrets_by_endpoint = [], {}
        for i in range(ENDPOINTS if mode == "all" else len(streams) if mode == "each" else 0):
            body: dict[str, Any] = {"url": f"http://127.0.0.1:{self.ports[i]}/hook/{i}"}
            if mode == "each":
                body["streams"] = [streams[i][1]]
            created = self.api.call("POST", "/api/webhooks", body)
            ids.append(created["id"])
            secrets_by_endpoint[i] = created["secret"]
        return ids, secrets_by_endpoint

    def phase(self, name: str, mode: str | None, round_no: int) -> dict[str, Any]:
        a, bench = self.args, self.bench
        self.count += 1
        streams = [(i, f"bench-n-{bench.tag}-{self.count}-{i}") for i in range(a.streams)]
        consumers = [(i * 3 + j, sid, FRAME_KINDS[j], i) for i, sid in streams for j in range(3)]
        groups = bench.consumer_groups(len(consumers))
        producer = bench.proc(f"{name}{round_no}-phones", "frame-producer",
                              {"streams": streams, "frame_bytes": a.bytes, "mode": "rate", "fps": a.fps})
        cons = [bench.proc(f"{name}{round_no}-consumers{k}", "frame-consumer",
                           {"clients": [consumers[i] for i in g], "window": "send"}) for k, g in enumerate(groups)]
        sender = bench.proc(f"{name}{round_no}-alerts", "paced-alerts",
                            {"streams": streams, "rate": a.alerts_per_s, "alert_bytes": a.alert_bytes,
                             "max_s": a.warmup + a.duration + a.drain + 240})
        webhook_ids: list[str] = []
        procs = bench.spawn([producer, *cons, sender])
        profiler = None
        try:
            producer.call("setup", 30)
            relay.call_all(cons, "setup", 30)
            sender.call("setup", 30)
            webhook_ids, secrets_by_endpoint = self.webhooks(mode, streams)
            self.receivers.call("arm", 10, secrets_by_endpoint=secrets_by_endpoint)
            stats0, metrics0 = self.api.stats(), self.api.metrics()
            t_start, t0, t1 = bench.timeline(a.warmup)
            pids = [p.pid for p in procs] + [self.receivers.pid]
            relay.call_all(procs, "start", 10, t_start=t_start, t0=t0, t1=t1)
            relay.sleep_until_ns(t0)
            m0, s0 = machine_busy_s(), relay.Snap(bench.pid, pids)
            if a.profile:
                profiler = _profile(a.profile, bench.pid, f"{name}{round_no}", a.duration)
            relay.sleep_until_ns(t1)
            m1, s1 = machine_busy_s(), relay.Snap(bench.pid, pids)
            progress_t1 = self.receivers.call("progress", 10)
            prod = producer.call("finish", 10, drain_s=0)
            sent_window = {int(k): v for k, v in prod["sent_window"].items()}
            per_proc = {p.name: {"expect": {consumers[i][0]: sent_window[consumers[i][3]] for i in g}}
                        for p, g in zip(cons, groups)}
            results = relay.call_all(cons, "finish", 10, per_proc, drain_s=1.5)
            alerts = sender.call("finish", 20, drain_s=10.0)
            relay.call_all(procs, "close", 15)
        finally:
            for p in procs:
                p.stop()
            if profiler is not None:
                try:
                    profiler.wait(a.duration + 30)
                except subprocess.TimeoutExpired:
                    profiler.kill()
        expected = self.expected(mode, alerts["acked"], streams)
        drain_began = time.monotonic()
        drained = self.drain(expected, a.drain if mode else 0.0)
        s2 = relay.Snap(bench.pid, pids)
        stats1, metrics1 = self.api.stats(), self.api.metrics()
        for webhook_id in webhook_ids:  # cancels what is still pending; attempts under way still finish
            self.api.call("DELETE", f"/api/webhooks/{webhook_id}")
        if webhook_ids:
            time.sleep(1.0)  # let those finish (the receivers still accept them) before the next phase
        got = self.receivers.call("collect", 30)
        res = self.figures(name, mode, round_no, t0, t1, s0, s1, s2, prod, results, alerts, expected, got,
                           progress_t1, drained, time.monotonic() - drain_began, stats0, stats1, metrics0, metrics1)
        ours = res["server_cpu_s"] + res["wall_s"] * ((res["client_util_sum"] or 0) + (res["receiver_util"] or 0))
        res["other_util"] = round(max(0.0, m1 - m0 - ours) / res["wall_s"], 3) if res["wall_s"] else None
        if res["other_util"] is not None and res["other_util"] >= 0.25:
            res["notes"].append(f"other processes used {res['other_util'] * 100:.0f}% of a CPU during the window")
        return res

    def expected(self, mode: str | None, acked: list[tuple[int, str, int]],
                 streams: list[tuple[int, str]]) -> list[set[str]]:
        """Per endpoint, the alertIds it must receive."""
        out: list[set[str]] = [set() for _ in range(ENDPOINTS)]
        if mode == "all":
            every = {alert_id for _, alert_id, _ in acked}
            out = [set(every) for _ in range(ENDPOINTS)]
        elif mode == "each":
            for _, alert_id, index in acked:
                out[index].add(alert_id)
        return out

    def drain(self, expected: list[set[str]], limit: float) -> bool:
        want = [len(e) for e in expected]
        deadline = time.monotonic() + limit
        while True:
            progress = self.receivers.call("progress", 10)
            if all(u >= w for u, w in zip(progress["unique"], want)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def figures(self, name: str, mode: str | None, round_no: int, t0: int, t1: int, s0: relay.Snap,
                s1: relay.Snap, s2: relay.Snap, prod: dict[str, Any], results: list[dict[str, Any]],
                alerts: dict[str, Any], expected: list[set[str]], got: dict[str, Any], progress_t1: dict[str, Any],
                drained: bool, drain_wait_s: float, stats0: dict[str, Any], stats1: dict[str, Any],
                metrics0: dict[str, float], metrics1: dict[str, float]) -> dict[str, Any]:
        a = self.args
        cpu = relay.cpu_between(s0, s1)
        wall, rpid = cpu["wall_s"], self.receivers.pid
        utils = {pid: (s1.workers[pid] - s0.workers[pid]) / wall for pid in s1.workers if pid in s0.workers and wall}
        receiver_util = round(utils.pop(rpid), 3) if rpid in utils else None
        cpu["client_util_max"] = round(max(utils.values()), 3) if utils else None
        cpu["client_util_sum"] = round(sum(utils.values()), 3) if utils else None
        cpu["client_processes"] = len(utils)
        drain_cpu = round((s2.srv_user + s2.srv_sys) - (s1.srv_user + s1.srv_sys), 3)
        # frames (scenario B)
        frames_sent = sum(int(v) for v in prod["sent_window"].values())
        frames_expected = frames_sent * 3
        frames_delivered = sum(sum(r["in_window"].values()) for r in results)
        frame_lat = relay.percentiles(relay.latencies(results))
        # alerts and webhooks
        counts: list[dict[str, int]] = got["counts"]
        want = sum(len(e) for e in expected)
        unique = sum(len(e & set(c)) for e, c in zip(expected, counts))
        dup = sum(n - 1 for c in counts for n in c.values() if n > 1)
        stray = sum(1 for e, c in zip(expected, counts) for alert_id in c if alert_id not in e)
        recv_ns = _samples(got["recv_ns"], "q")
        in_window = sum(1 for t in recv_ns if t0 <= t < t1)
        sent_us, latency = _samples(got["sent_us"], "q"), _samples(got["latency"])
        window_lat = [lat for s, lat in zip(sent_us, latency) if t0 <= s * 1000 < t1]
        ack_lat = relay.percentiles(list(_samples(alerts["ack_ms"])))
        fanout = 0 if not mode else ENDPOINTS if mode == "all" else 1
        sent_by_t1 = alerts["sent"]  # the sender stops at t1
        res: dict[str, Any] = {
            "phase": name, "mode": mode, "round": round_no,
            "alerts_sent": alerts["sent"], "alerts_sent_in_window": alerts["sent_window"], "acks": alerts["acks"],
            "alerts_per_s": round(alerts["sent_window"] / a.duration, 1),
            "alerts_stored": relay._delta(stats0, stats1, "alertsStored"),
            "ack_p50_ms": ack_lat["p50_ms"], "ack_p99_ms": ack_lat["p99_ms"],
            "sender_behind_max_ms": alerts["behind_max_ms"], "duplicate_acks": alerts["duplicate_acks"],
            "deliveries_expected": want, "deliveries_received": got["received"], "deliveries_unique": unique,
            "missing": want - unique, "dup": dup, "stray": stray, "repeated_webhook_ids": got["repeated_webhook_ids"],
            "bad_signatures": got["bad_signatures"], "unarmed_requests": got["unarmed"],
            "deliveries_per_s": round(in_window / a.duration, 1),
            "backlog_at_end": max(0, sent_by_t1 * fanout - progress_t1["received"]) if mode else 0,
            "drained": drained, "drain_wait_s": round(drain_wait_s, 1),
            "drain_s": round(max(0, got["last_ns"] - t1) / 1e9, 2) if mode and drained and got["last_ns"] else None,
            "delivery": relay.percentiles(window_lat),
            "frames_sent_in_window": frames_sent, "frames_delivered": frames_delivered,
            "frame_ratio": round(frames_delivered / frames_expected, 4) if frames_expected else None,
            "frame_lost": frames_expected - frames_delivered,
            "frame_dup": sum(sum(r["dup"].values()) for r in results),
            "frame": frame_lat, "frames_dropped_by_server": relay._delta(stats0, stats1, "framesDropped"),
            **cpu, "receiver_util": receiver_util, "server_cpu_drain_s": drain_cpu,
            "server_metrics": {k: round(metrics1.get(k, 0) - metrics0.get(k, 0)) for k in metrics1 if k != "pending"},
            "server_pending_gauge": metrics1.get("pending"),
        }
        notes = relay.Bench.issues([prod, *results, alerts])
        if alerts["acks"] != alerts["sent"]:
            notes.append(f"acks {alerts['acks']} != alerts sent {alerts['sent']}")
        if res["alerts_stored"] is not None and res["alerts_stored"] != alerts["sent"]:
            notes.append(f"server stored {res['alerts_stored']} alerts, {alerts['sent']} sent")
        if alerts["behind_max_ms"] > 100:
            notes.append(f"alert sender fell behind its schedule by up to {alerts['behind_max_ms']:.0f} ms")
        if mode and not drained:
            notes.append(f"not drained after {a.drain:g} s: {want - unique} deliveries still missing "
                         f"(server pending gauge {metrics1.get('pending')})")
        for key, label in (("bad_signatures", "bad signatures"), ("stray", "deliveries of unexpected alerts"),
                           ("unarmed_requests", "requests to endpoints without a webhook")):
            if res[key]:
                notes.append(f"{label}: {res[key]}")
        res["notes"] = notes
        return res


def _profile(directory: str, pid: int, label: str, seconds: float) -> subprocess.Popen[bytes] | None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    out = Path(directory) / f"server-{label}"
    try:
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                                 "--rate", "100", "--format", "raw", "--idle", "--nonblocking",
                                 "--output", f"{out}.txt"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        print("[bench] py-spy not found: no profile", file=sys.stderr)
        return None


# =============================================================================== report

def _f(value: Any, digits: int = 1) -> str:
    return relay._fmt(value, digits)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}"


COLUMNS = ("phase", "alerts/s", "sent", "acked", "ack p50", "ack p99", "expected", "received", "missing", "dup",
           "deliv/s", "backlog",
           "drain s", "deliv p50", "deliv p99", "frame p50", "frame p99", "frame max", "frame dlvd", "srv CPU s",
           "srv CPU%", "cli CPU%", "rcv CPU%", "other CPU%")


def table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [COLUMNS]
    for r in results:
        label = f"{r['phase']} {r['round']}"
        if r.get("error"):
            rows.append((label, "FAILED: " + r["error"], *[""] * (len(COLUMNS) - 2)))
            continue
        notify = bool(r["mode"])
        drain = "-" if not notify else _f(r["drain_s"], 1) if r["drained"] else f">{r['drain_wait_s']:g}"
        rows.append((label, _f(r["alerts_per_s"], 0), _f(r["alerts_sent"]), _f(r["acks"]), _f(r["ack_p50_ms"], 1),
                     _f(r["ack_p99_ms"], 1),
                     _f(r["deliveries_expected"]) if notify else "-", _f(r["deliveries_unique"]) if notify else "-",
                     _f(r["missing"]) if notify else "-", _f(r["dup"]) if notify else "-",
                     _f(r["deliveries_per_s"], 0) if notify else "-", _f(r["backlog_at_end"]) if notify else "-",
                     drain, _f(r["delivery"]["p50_ms"], 1), _f(r["delivery"]["p99_ms"], 1),
                     _f(r["frame"]["p50_ms"], 2), _f(r["frame"]["p99_ms"], 2), _f(r["frame"]["max_ms"], 1),
                     _f(r["frame_ratio"], 4), _f(r["server_cpu_s"], 2), _pct(r["server_util"]),
                     _pct(r["client_util_sum"]), _pct(r["receiver_util"]), _pct(r.get("other_util"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(results: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Per notify mode: frame p50/p99 medians over rounds, notify/base ratios, and the target's verdict."""
    ok = [r for r in results if not r.get("error")]
    base = [r for r in ok if r["mode"] is None]
    out: dict[str, Any] = {}
    for mode in modes:
        notify = [r for r in ok if r["mode"] == mode]
        if not base or not notify:
            continue
        entry: dict[str, Any] = {"rounds": len(notify)}
        for q in ("p50_ms", "p99_ms"):
            b, n = _median([r["frame"][q] for r in base]), _median([r["frame"][q] for r in notify])
            entry[f"base_{q}"], entry[f"notify_{q}"] = b, n
            entry[f"ratio_{q[:3]}"] = round(n / b, 3) if b and n is not None else None
            pairs = [(x["frame"][q], y["frame"][q]) for x in base for y in notify if x["round"] == y["round"]]
            entry[f"ratio_{q[:3]}_per_round"] = [round(y / x, 3) if x and y is not None else None for x, y in pairs]
        entry["missing"] = sum(r["missing"] for r in notify)
        entry["dup"] = sum(r["dup"] for r in notify)
        entry["all_drained"] = all(r["drained"] for r in notify)
        entry["pending"] = sum(r["server_pending_gauge"] or 0 for r in notify if not r["drained"])
        entry["deliveries_per_s"] = _median([r["deliveries_per_s"] for r in notify])
        entry["alerts_per_s"] = _median([r["alerts_per_s"] for r in notify])
        entry["delivery_p99_ms"] = _median([r["delivery"]["p99_ms"] for r in notify])
        ratios = (entry["ratio_p50"], entry["ratio_p99"])
        entry["meets_target"] = bool(entry["missing"] == 0 and entry["all_drained"] and entry["alerts_per_s"]
                                     and all(r is not None and r <= 1.2 for r in ratios))
        out[mode] = entry
    return out


def machine() -> dict[str, Any]:
    model = None
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"Model name:\s*(.+)", text)
        model = match.group(1).strip() if match else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu_model": model, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": sys.version.split()[0]}


# =============================================================================== main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench/notify.py reads /proc for CPU: Linux only", file=sys.stderr)
        return 2
    try:
        import orjson  # noqa: F401 - the workers need these
        import standardwebhooks  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as exc:
        print(f"bench/notify.py needs {exc.name}: pip install -e '.[test]'", file=sys.stderr)
        return 2
    relay.raise_fd_limit(8192)
    began = time.monotonic()
    data_dir = tempfile.mkdtemp(prefix="watchout-bench-notify-")
    env = dict(os.environ)
    env.update(WATCHOUT_JWT_SECRET=secrets.token_urlsafe(48), WATCHOUT_DATA_DIR=str(Path(data_dir) / "data"),
               WATCHOUT_WEBHOOK_ALLOW_PRIVATE="1", WATCHOUT_LOG_LEVEL="warning")
    for name in ("WATCHOUT_JWT_PUBLIC_KEY_FILE", "WATCHOUT_JWT_ALGORITHMS"):
        env.pop(name, None)
    server: relay.OwnServer | None = None
    receivers: relay.Proc | None = None
    results: list[dict[str, Any]] = []
    try:
        tokens = relay.mint_tokens(relay.settings_for_tokens(env))
        if args.pin:  # the server inherits CPU 1 (all its threads, as `taskset -c 1` would); then we go to CPU 0
            os.sched_setaffinity(0, {1})
        try:
            server = relay.OwnServer(env, Path(data_dir) / "server.log")
        finally:
            if args.pin:
                os.sched_setaffinity(0, {0})
        pid = server.process.pid
        print(f"[bench] watchout serve (pid {pid}) at {server.url}; data and log in {data_dir}", file=sys.stderr)
        bench = relay.Bench(args, server.url, pid, tokens)
        api = Api(bench.http, tokens)
        plan = [("base", None)] + [(f"notify-{m}", m) for m in args.modes]
        rounds_s = len(plan) * (args.warmup + args.duration + 8) + len(args.modes) * args.drain
        receivers = bench.proc("receivers", "webhook-receivers",
                               {"endpoints": ENDPOINTS, "max_s": args.pairs * rounds_s + 600})
        bench.spawn([receivers])
        ports = receivers.call("setup", 30)["ports"]
        run = Run(args, bench, api, receivers, ports)
        for round_no in range(1, args.pairs + 1):
            for name, mode in plan:
                print(f"[bench] round {round_no}: {name} ...", file=sys.stderr, flush=True)
                try:
                    results.append(run.phase(name, mode, round_no))
                except KeyboardInterrupt:
                    results.append({"phase": name, "mode": mode, "round": round_no, "error": "interrupted"})
                    raise
                except Exception as exc:  # noqa: BLE001 - one failed phase must not hide the others
                    results.append({"phase": name, "mode": mode, "round": round_no,
                                    "error": relay._describe(exc)[:400]})
    except relay.BenchError as exc:
        print(f"bench/notify.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
    finally:
        if receivers is not None:
            receivers.stop()
        if server is not None:
            server.stop()
    about = machine()
    verdict = summary(results, args.modes)
    print(f"\nWatchout notifications benchmark, {about['date']}: {about['cpu_model']}, {about['cpus']} CPUs"
          f"{', server pinned to CPU 1, clients and receivers to CPU 0' if args.pin else ''}; "
          f"{time.monotonic() - began:.0f} s in all")
    print(f"  every phase: scenario B ({args.streams} streams x {args.fps:g} fps x 3 consumers, {args.bytes} B frames) "
          f"+ {args.alerts_per_s:g} alerts/s over the same streams; {args.warmup:g} s warm-up, "
          f"{args.duration:g} s measured, {args.pairs} round(s)")
    print(f"  base: no webhooks; notify-each: webhook i for stream i -> endpoint i; notify-all: every alert -> "
          f"{ENDPOINTS} endpoints; drain at most {args.drain:g} s")
    print("  latencies in ms; deliv = webhook receipt - alert send; backlog = deliveries not yet received at the "
          "window's end\n")
    print(table(results))
    print()
    for mode, v in verdict.items():
        print(f"{mode}: frame p50 {_f(v['notify_p50_ms'], 2)} vs {_f(v['base_p50_ms'], 2)} ms "
              f"= {_f(v['ratio_p50'], 2)}x, p99 {_f(v['notify_p99_ms'], 2)} vs {_f(v['base_p99_ms'], 2)} ms "
              f"= {_f(v['ratio_p99'], 2)}x (medians over {v['rounds']} round(s)); "
              f"{_f(v['deliveries_per_s'], 0)} deliveries/s, "
              + (f"all delivered (dup {v['dup']})" if v['all_drained'] and not v['missing'] else
                 f"{v['missing']:,} missing after the drain (server's pending gauge {_f(v['pending'], 0)}), "
                 f"dup {v['dup']}")
              + " -> target (all delivered, frame p50 and p99 <= 1.2x base) "
              + ("met" if v["meets_target"] else "NOT met"))
    if args.profile:
        print(f"  (profiled with py-spy into {args.profile}: the sampling costs the server CPU too)")
    for r in results:
        for note in r.get("notes", []):
            print(f"  note ({r['phase']} {r['round']}): {note}")
    warnings = server.log_summary() if server is not None else {}
    print(f"\nserver: exit code {server.exit_code if server else '-'}"
          + ("" if warnings else ", no warnings or errors logged"))
    if any("delivery lease lost" in line for line in warnings):
        print("  (\"delivery lease lost\": attempts under way when a phase's webhooks were deleted, after the drain)")
    for line, count in sorted(warnings.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  x{count}  {line[:160]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": about, "args": vars(args), "results": results,
                                               "summary": verdict, "server_warnings": warnings},
                                              indent=2, default=str))
        print(f"\nJSON written to {args.json}")
    return 0 if results and all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
