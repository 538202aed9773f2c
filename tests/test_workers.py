"""`watchout serve --workers N`: the refusals, the supervising parent (READY, watchdog, signals, restarts)
and a real run of two worker processes sharing one port over the Redis broker."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import TEST_SECRET, require_services
from watchout.auth import mint_token

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHOUT_") and k not in NOTIFY_VARS}
    env["WATCHOUT_DATA_DIR"] = ":memory:"  # each worker its own store, and nothing written into the checkout
    env.update(extra)
    return env


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watchout", "serve", "--port", "0", *args], env=env,
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


# ----------------------------------------------------------------------------- refusals

def test_workers_without_broker_url_are_refused_with_the_reason():
    result = _serve("--workers", "2", env=_clean_env(WATCHOUT_JWT_SECRET=TEST_SECRET))
    assert result.returncode == 2
    assert "--workers 2" in result.stderr
    assert "broker_url is empty" in result.stderr and "through the Redis broker" in result.stderr
    assert "mongo_url is empty" in result.stderr and "embedded SQLite store serves one process only" in result.stderr
    assert "several workers need MongoDB (mongo_url) and Redis (broker_url)" in result.stderr
    assert "listening" not in result.stdout + result.stderr  # refused before binding anything


def test_workers_with_a_broker_but_the_embedded_store_are_refused():
    result = _serve("--workers", "2", env=_clean_env(WATCHOUT_JWT_SECRET=TEST_SECRET, WATCHOUT_BROKER_URL=REDIS_URL))
    assert result.returncode == 2
    assert "mongo_url is empty" in result.stderr and "embedded SQLite store serves one process only" in result.stderr
    assert "broker_url is empty" not in result.stderr


def test_workers_zero_means_one_per_cpu():
    cpus = os.cpu_count() or 1
    if cpus < 2:
        pytest.skip("one CPU: --workers 0 is a plain serve here")
    result = _serve("--workers", "0", env=_clean_env(WATCHOUT_JWT_SECRET=TEST_SECRET))
    assert result.returncode == 2 and f"--workers {cpus} " in result.stderr


def test_a_negative_worker_count_is_a_usage_error():
    result = _serve("--workers", "-1", env=_clean_env())
    assert result.returncode == 2 and "--workers" in result.stderr and "0 or more" in result.stderr


# ----------------------------------------------------------------------------- a stand-in for systemd

class Manager:
    """systemd's notify socket, faked: records each datagram with the pid of the process that sent it."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="wo-")  # short: unix socket paths stop at 108 bytes
        self.address = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.received: list[tuple[int, dict[str, str]]] = []

    def recv(self, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("no datagram from the service") from None
                time.sleep(0.005)
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append((pid, message))
        return message

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Skip datagrams (keep-alives, status) until one carries `key`."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.recv(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class Parent:
    proc: subprocess.Popen[bytes]
    log_path: Path
    manager: Manager
    port: int = 0
    pids: dict[int, int] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log()))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{pattern!r} (x{count}) not in the log:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker index, from the parent's log."""
        return {int(m[1]): int(m[2]) for m in re.finditer(r"worker (\d+) started \(pid (\d+)\)", self.log())}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def manager() -> Iterator[Manager]:
    fake = Manager()
    yield fake
    fake.close()


@pytest.fixture
def launch(tmp_path: Path, manager: Manager) -> Iterator[Callable[..., Parent]]:
    """launch(script, *args, env=...): a Python script under the fake manager, its output in a log file."""
    parents: list[Parent] = []

    def run(script: str, *args: str, env: dict[str, str]) -> Parent:
        path = tmp_path / f"script-{len(parents)}.py"
        path.write_text(script)
        log_path = tmp_path / f"parent-{len(parents)}.log"
        with log_path.open("wb") as log_file:  # a file, not a pipe: nothing can block on it
            proc = subprocess.Popen([sys.executable, str(path), *args], stdout=log_file, stderr=subprocess.STDOUT,
                                    env={**env, "NOTIFY_SOCKET": manager.address}, cwd=ROOT)
        parent = Parent(proc, log_path, manager)
        parents.append(parent)
        return parent

    yield run
    for parent in parents:
        if parent.proc.poll() is None:
            parent.proc.kill()
            parent.proc.wait(10)
        for pid in parent.worker_pids().values():  # a worker dies with its parent (PR_SET_PDEATHSIG)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


# ----------------------------------------------------------------------------- the supervisor, with fake workers

# Fake workers speak the protocol a real one speaks (READY, WATCHDOG, RELOADING) over the channel the
# supervisor gives them, per mode: ok; late (READY only after SIGUSR1); stuck (keep-alives stop after
# 0.3 s); fail (exit 3 at once).
FAKE_WORKERS = r'''
import logging, os, resource, signal, sys, time
from watchout.notify import Notifier
from watchout.supervisor import Supervisor

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
modes = sys.argv[1].split(",")


def run(index, channel):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGABRT leaves no core file behind
    mode = modes[index]
    if mode == "fail":
        return 3
    events = []
    for sig, name in ((signal.SIGTERM, "term"), (signal.SIGHUP, "hup"), (signal.SIGUSR1, "go")):
        signal.signal(sig, lambda *_, name=name: events.append(name))
    notifier = Notifier.to_supervisor(channel, 0.05)
    while mode == "late" and "go" not in events:
        time.sleep(0.01)
    notifier.ready("fake ready")
    stuck_at = time.monotonic() + 0.3 if mode == "stuck" else None
    while "term" not in events:
        if "hup" in events:
            events.remove("hup")
            print(f"fake {index} reloaded", flush=True)
            notifier.reloading()
            notifier.ready("fake reloaded")
        if stuck_at is None or time.monotonic() < stuck_at:
            notifier.send("WATCHDOG=1")
        time.sleep(0.02)
    print(f"fake {index} stopping", flush=True)
    return 0


sys.exit(Supervisor(len(modes), run, Notifier(os.environ), status="fake service", shutdown_timeout_s=1.0,
                    on_ready=lambda: print("ALL READY", flush=True)).run())
'''


def test_ready_is_sent_once_every_worker_is_ready_and_sigterm_stops_them_all(launch, manager):
    parent = launch(FAKE_WORKERS, "ok,late", env=_clean_env())
    parent.wait_log(r"worker 0 ready")
    with pytest.raises(TimeoutError):
        manager.wait_for("READY", 0.5)  # worker 1 is not ready yet
    os.kill(parent.worker_pids()[1], signal.SIGUSR1)
    ready = manager.wait_for("READY", 10)
    assert ready["MAINPID"] == str(parent.proc.pid) and ready["STATUS"] == "fake service"
    parent.wait_log("ALL READY")
    assert parent.stop() == 0
    assert manager.wait_for("STOPPING", 1)["STOPPING"] == "1"
    assert "fake 0 stopping" in parent.log() and "fake 1 stopping" in parent.log()
    assert parent.log().count("ALL READY") == 1
    assert {pid for pid, _ in manager.received} == {parent.proc.pid}  # the workers never talk to systemd


def test_sighup_is_forwarded_and_ready_follows_once_every_worker_reloaded(launch, manager):
    parent = launch(FAKE_WORKERS, "ok,ok", env=_clean_env())
    manager.wait_for("READY", 10)
    parent.proc.send_signal(signal.SIGHUP)
    assert manager.wait_for("RELOADING", 5)["RELOADING"] == "1"
    again = manager.wait_for("READY", 5)
    assert again["STATUS"] == "fake service"
    assert "fake 0 reloaded" in parent.log() and "fake 1 reloaded" in parent.log()
    assert parent.stop() == 0


def test_a_worker_that_ends_is_started_again_after_a_growing_delay(launch, manager):
    parent = launch(FAKE_WORKERS, "ok,ok", env=_clean_env())
    manager.wait_for("READY", 10)
    first = parent.worker_pids()[1]
    os.kill(first, signal.SIGKILL)
    parent.wait_log(rf"worker 1 \(pid {first}\) ended unexpectedly \(signal 9\) after [\d.]+ s: "
                    r"starting another in 0\.5 s")
    second = int(parent.wait_log(r"worker 1 started \(pid (\d+)\)", count=2)[-1][1])
    parent.wait_log(rf"worker 1 ready \(pid {second}\)")
    os.kill(second, signal.SIGKILL)
    parent.wait_log(r"worker 1 .* starting another in 1\.0 s")  # a worker dying again and again waits longer
    parent.wait_log(r"worker 1 ready", count=3)
    assert parent.worker_pids()[0] == int(re.findall(r"worker 0 started \(pid (\d+)\)", parent.log())[0])
    assert parent.stop() == 0


def test_a_worker_whose_keep_alives_stop_is_aborted_and_replaced(launch, manager):
    parent = launch(FAKE_WORKERS, "ok,stuck", env=_clean_env(WATCHDOG_USEC="200000"))
    manager.wait_for("READY", 10)
    stuck = parent.worker_pids()[1]
    parent.wait_log(rf"worker 1 \(pid {stuck}\) sent no keep-alive for [\d.]+ s \(its event loop is stuck\): "
                    r"aborting it \(SIGABRT\)")
    parent.wait_log(rf"worker 1 \(pid {stuck}\) ended unexpectedly \(signal 6\)")
    parent.wait_log(r"worker 1 started", count=2)
    pings = [m for pid, m in manager.received if "WATCHDOG" in m and pid == parent.proc.pid]
    assert pings  # the parent itself goes on telling systemd it is alive
    assert parent.stop() == 0


def test_a_worker_failing_at_start_up_stops_the_service_with_exit_code_1(launch, manager):
    parent = launch(FAKE_WORKERS, "ok,fail", env=_clean_env())
    assert parent.proc.wait(20) == 1
    assert re.search(r"worker 1 \(pid \d+\) ended during start-up \(exit code 3\): stopping the service", parent.log())
    assert re.search(r"worker 0 stopped \(pid \d+, ", parent.log())  # the other worker was stopped
    assert "ALL READY" not in parent.log()
    assert not [m for _, m in manager.received if "READY" in m]


# ----------------------------------------------------------------------------- two real workers over Redis

# `watchout serve --workers 2` refuses the embedded store, and no MongoDB runs here: this runs the
# code below that check, so each worker has an embedded store of its own and only what crosses
# Redis (status, frames, alerts of shared streams, and each node's figures) is shared.
SERVE_WORKERS = r'''
import os, sys
from watchout.cli import _serve
from watchout.settings import load_settings


def load():
    return load_settings(None, os.environ)


sys.exit(_serve(load(), load, workers=int(sys.argv[1])))
'''


@pytest.fixture
def prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (redis.RedisError, OSError):
        client.close()
        if require_services():
            pytest.fail("Redis does not answer on 127.0.0.1:6379 (WATCHOUT_REQUIRE_SERVICES=1)")
        pytest.skip("Redis does not answer on 127.0.0.1:6379")
    name = f"wotest:{uuid.uuid4().hex[:12]}:"
    yield name
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


def _start_workers(launch: Callable[..., Parent], manager: Manager, prefix: str, node: str,
                   **extra: str) -> Parent:
    env = _clean_env(WATCHOUT_JWT_SECRET=TEST_SECRET, WATCHOUT_HOST="127.0.0.1", WATCHOUT_PORT="0",
                     WATCHOUT_BROKER_URL=REDIS_URL, WATCHOUT_BROKER_PREFIX=prefix, WATCHOUT_BROKER_HEARTBEAT_S="1",
                     WATCHOUT_NODE_ID=node, WATCHOUT_SHUTDOWN_TIMEOUT_S="2", **extra)
    parent = launch(SERVE_WORKERS, "2", env=env)
    try:
        ready = manager.wait_for("READY", 30)
    except TimeoutError:
        raise AssertionError("no READY=1 from the parent:\n" + parent.log()) from None
    parent.port = _port(parent)
    assert ready["MAINPID"] == str(parent.proc.pid)
    assert ready["STATUS"] == f"listening on 127.0.0.1:{parent.port}, 2 workers"
    return parent


def _port(parent: Parent) -> int:
    return int(parent.wait_log(r"WebSocket: ws://127\.0\.0\.1:(\d+)/ws")[0][1])


def _stats(port: int) -> dict[str, Any]:
    """/stats as an admin sees it, over a new connection each time (so either worker may answer)."""
    admin = mint_token(TEST_SECRET, "HS256", "admin", "admin", ttl_s=600)
    headers = {"Authorization": f"Bearer {admin}", "Connection": "close"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/stats", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def _wait_nodes(port: int, expected: set[str], timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(port)
        if {n["node"] for n in stats["nodes"]} == expected:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"/stats shows {[n['node'] for n in stats['nodes']]}, not {sorted(expected)}")
        time.sleep(0.05)


def _register(port: int, stream_id: str) -> dict[str, Any]:
    from websockets.sync.client import connect

    token = mint_token(TEST_SECRET, "HS256", "alice", "user", ttl_s=600)
    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=5, proxy=None) as ws:
        ws.send(json.dumps({"type": "register", "clientType": "mobile", "streamId": stream_id, "token": token}))
        reply: dict[str, Any] = json.loads(ws.recv(timeout=5))
    return reply


def test_two_workers_share_one_port_and_each_reports_itself_in_the_cluster_stats(launch, manager, prefix):
    node = f"wk-{uuid.uuid4().hex[:6]}"
    parent = _start_workers(launch, manager, prefix, node)
    ids = {f"{node}/0", f"{node}/1"}
    stats = _wait_nodes(parent.port, ids)
    assert stats["nodeCount"] == 2
    answered = {_stats(parent.port)["node"] for _ in range(12)}
    assert answered <= ids  # every answer comes from one of the two workers, all on one port
    assert all(_register(parent.port, f"cam-{k}")["type"] == "registered" for k in range(4))
    assert parent.log().count("Watchout 0.1.0 is running.") == 1  # the parent prints the URLs, once
    assert parent.log().count("keeps its own embedded store") == 1  # said by the parent, not by each worker
    for worker in sorted(ids):  # each worker runs the node jobs for its own connections, under its own name
        assert f"jobs scheduled on node {worker}: check-producers" in parent.log()
        assert re.search(rf"watchout\.jobs: jobs scheduled on node {re.escape(worker)}: .* node={re.escape(worker)}$",
                         parent.log(), re.MULTILINE)  # every line of a worker names it

    parent.proc.send_signal(signal.SIGHUP)
    assert manager.wait_for("RELOADING", 10)["RELOADING"] == "1"
    assert "refused" not in manager.wait_for("READY", 10)["STATUS"]
    assert parent.log().count("reloaded: JWT verification key re-read") == 2
    assert "take effect only after a restart" not in parent.log()  # each worker keeps its own node_id

    pids = parent.worker_pids()
    assert parent.stop() == 0
    assert manager.wait_for("STOPPING", 1)["STOPPING"] == "1"
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values())
    assert {pid for pid, _ in manager.received} == {parent.proc.pid}  # READY, STOPPING: the parent only
    assert parent.log().count("INFO    watchout: stopped") == 2


def _two_free_ports() -> int:
    """A port P with P + 1 free as well (for metrics_port with two workers)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


def test_a_worker_killed_with_sigkill_is_restarted_under_the_same_node_id(launch, manager, prefix):
    node = f"wk-{uuid.uuid4().hex[:6]}"
    metrics = _two_free_ports()
    parent = _start_workers(launch, manager, prefix, node, WATCHOUT_METRICS_PORT=str(metrics))
    ids = {f"{node}/0", f"{node}/1"}
    _wait_nodes(parent.port, ids)
    for index in (0, 1):  # each worker serves its own metrics, on metrics_port + its index
        assert f"worker {index} serving as node {node}/{index}, its /metrics on port {metrics + index}" in parent.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics + index}/metrics", timeout=5) as response:
            assert b"watchout_connections" in response.read()
    killed = parent.worker_pids()[1]
    os.kill(killed, signal.SIGKILL)
    parent.wait_log(rf"worker 1 \(pid {killed}\) ended unexpectedly \(signal 9\)")
    parent.wait_log(r"worker 1 ready", count=2)
    assert parent.worker_pids()[1] != killed
    _wait_nodes(parent.port, ids)  # the new worker is node <id>/1 again
    assert _register(parent.port, "cam-after")["type"] == "registered"
    assert parent.stop() == 0


def test_one_node_with_a_broker_and_no_mongo_url_starts_and_warns(launch, manager, prefix):
    env = _clean_env(WATCHOUT_JWT_SECRET=TEST_SECRET, WATCHOUT_HOST="127.0.0.1", WATCHOUT_PORT="0",
                     WATCHOUT_BROKER_URL=REDIS_URL, WATCHOUT_BROKER_PREFIX=prefix)
    parent = launch("import sys\nfrom watchout.cli import main\nsys.exit(main(['serve']))\n", env=env)
    manager.wait_for("READY", 30)
    assert urllib.request.urlopen(f"http://127.0.0.1:{_port(parent)}/health", timeout=5).status == 200
    warning = parent.wait_log(r"WARNING .*broker_url is set but mongo_url is not: this node keeps its own embedded "
                              r"store, so streams, alerts and their history are not shared with the other nodes")
    assert warning
    assert parent.stop() == 0
