"""Under systemd: READY/STOPPING/WATCHDOG over a fake NOTIFY_SOCKET, SIGHUP reloads, and the unit file itself."""
from __future__ import annotations

import asyncio
import configparser
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from conftest import Client, require_services
from watchout.auth import mint_token
from watchout.cli import _parser
from watchout.notify import Notifier
from watchout.settings import FIELDS

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "watchout.service"
ENV_EXAMPLE = ROOT / "config" / "watchout.env.example"
DEPLOY_DOC = ROOT / "docs" / "deploy-systemd.md"
SECRET_A = "secret-A-0123456789abcdef0123456789abcdef"
SECRET_B = "secret-B-0123456789abcdef0123456789abcdef"


class FakeManager:
    """A unix datagram socket standing in for systemd's notify socket (a path, or '@name' abstract)."""

    def __init__(self, abstract: bool = False) -> None:
        self._dir = tempfile.mkdtemp(prefix="wo-")  # short: unix socket paths stop at 108 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"watchout-test-{os.getpid()}-{os.path.basename(self._dir)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.sock.setblocking(False)

    async def recv(self, timeout: float = 20.0) -> dict[str, str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    async def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Skip datagrams (watchdog pings, say) until one carries `key`."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class Service:
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def log_shows(self, pattern: str, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return True
            await asyncio.sleep(0.05)
        return False

    async def connect(self, token: str, stream_id: str) -> tuple[Client, dict[str, Any]]:
        """A phone registering `stream_id`; returns the client and the first reply (or the close)."""
        client = Client(await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{self.port}/ws"))
        await client.send({"type": "register", "clientType": "mobile", "streamId": stream_id, "token": token})
        raw = await client.recv_raw(10)
        return client, (json.loads(raw) if isinstance(raw, str) else {"closed": client.conn.close_code})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    fake = FakeManager()
    yield fake
    fake.close()


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Any]:
    """start(manager, env, *args): `python -m watchout serve` under a fake manager; waits for READY=1."""
    started: list[asyncio.subprocess.Process] = []

    async def run(manager: FakeManager, env_extra: dict[str, str] | None = None,
                  *args: str) -> tuple[Service, dict[str, str]]:
        port = _free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("WATCHOUT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update({"WATCHOUT_PORT": str(port), "NOTIFY_SOCKET": manager.address,
                    "WATCHOUT_DATA_DIR": str(tmp_path / "data"), **(env_extra or {})})
        log_path = tmp_path / f"serve-{len(started)}.log"
        with log_path.open("wb") as log_file:  # a file, not a pipe: a chatty debug log cannot block the service
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", "serve", *args, env=env,
                                                        stdout=log_file, stderr=subprocess.STDOUT)
        started.append(proc)
        service = Service(proc, port, log_path)
        try:
            ready = await manager.wait_for("READY")
        except TimeoutError:
            raise AssertionError("no READY=1 from watchout serve:\n" + service.log()) from None
        return service, ready

    yield run
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _fetch(url: str, token: str | None = None) -> tornado.httpclient.HTTPResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await tornado.httpclient.AsyncHTTPClient().fetch(url, headers=headers, raise_error=False)


# ----------------------------------------------------------------------------- readiness and shutdown

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_ready_is_sent_once_listening_and_stopping_when_sigterm_starts_the_shutdown(start, abstract):
    manager = FakeManager(abstract=abstract)
    try:
        service, ready = await start(manager, {"WATCHOUT_JWT_SECRET": SECRET_A})
        # READY=1 means "serving": the port must answer the moment it arrives, with no retry.
        health = await _fetch(service.url("/health"))
        assert health.code == 200 and json.loads(health.body)["status"] == "healthy"
        assert ready["READY"] == "1" and ready["MAINPID"] == str(service.proc.pid)
        assert ready["STATUS"] == f"listening on 127.0.0.1:{service.port}"
        service.proc.send_signal(signal.SIGTERM)
        stopping = await manager.wait_for("STOPPING", 10)
        assert stopping["STOPPING"] == "1" and "STATUS" in stopping
        assert await asyncio.wait_for(service.proc.wait(), 15) == 0
    finally:
        manager.close()


async def test_watchdog_keep_alives_arrive_every_half_watchdog_usec(start, manager):
    await start(manager, {"WATCHOUT_JWT_SECRET": SECRET_A, "WATCHDOG_USEC": "200000"})
    arrivals = []
    while len(arrivals) < 6:
        if "WATCHDOG" in await manager.recv(5):
            arrivals.append(time.monotonic())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert 0.06 < sum(gaps) / len(gaps) < 0.2  # every 0.1 s, well inside the 0.2 s systemd would allow


async def test_no_watchdog_keep_alives_without_watchdog_usec(start, manager):
    await start(manager, {"WATCHOUT_JWT_SECRET": SECRET_A})
    with pytest.raises(TimeoutError):
        await manager.recv(0.5)


def test_watchdog_meant_for_another_process_is_left_alone(manager):
    env = {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "30000000"}
    assert Notifier({**env, "WATCHDOG_PID": "4242"}, pid=4243).watchdog_interval_s is None
    assert Notifier({**env, "WATCHDOG_PID": "4243"}, pid=4243).watchdog_interval_s == 15.0
    assert Notifier(env, pid=4243).watchdog_interval_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000"}, pid=4243).watchdog_interval_s is None  # no manager to ping


def test_notifier_without_notify_socket_sends_nothing():
    notifier = Notifier({})
    assert not notifier.is_enabled
    assert notifier.ready("listening") is False and notifier.stopping("bye") is False


def test_send_failures_never_raise_and_are_logged_once(caplog, tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="watchout.notify"):
        assert notifier.ready("listening") is False
        assert notifier.send("WATCHDOG=1") is False
        assert notifier.stopping("bye") is False
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


def test_status_with_a_newline_stays_one_assignment(manager):
    notifier = Notifier({"NOTIFY_SOCKET": manager.address}, pid=7)
    assert notifier.ready("line one\nREADY=0")
    data = manager.sock.recv(4096).decode()
    notifier.close()
    assert data.splitlines() == ["READY=1", "STATUS=line one READY=0", "MAINPID=7"]


# ----------------------------------------------------------------------------- SIGHUP

def _config(path: Path, secret: str, *, log_level: str = "info", mongo_db: str = "watchout") -> None:
    path.write_text(f'[server]\nlog_level = "{log_level}"\n\n[auth]\njwt_secret = "{secret}"\njwt_leeway_s = 0.0\n\n'
                    f'[store]\nmongo_db = "{mongo_db}"\n')


async def _hup(service: Service, manager: FakeManager) -> dict[str, str]:
    """SIGHUP, then the READY=1 that ends the reload (RELOADING=1 comes first)."""
    service.proc.send_signal(signal.SIGHUP)
    await manager.wait_for("RELOADING", 10)
    return await manager.wait_for("READY", 10)


async def _pong(client: Client) -> bool:
    await client.send({"type": "ping", "id": "p"})
    return (await client.recv_type("pong", timeout=5))["ref"] == "p"


async def test_sighup_rotates_the_jwt_key_and_log_level_while_connections_stay_open(start, manager, tmp_path):
    config = tmp_path / "watchout.toml"
    _config(config, SECRET_A)
    service, _ = await start(manager, {}, "--config", str(config))
    old, reply = await service.connect(mint_token(SECRET_A, "HS256", "alice", "user"), "cam-a")
    assert reply["type"] == "registered"
    assert (await _fetch(service.url("/health"))).code == 200
    assert not await service.log_shows(r"GET /health", timeout=0.3)  # info: no access log lines

    _config(config, SECRET_B, log_level="debug", mongo_db="elsewhere")
    ready = await _hup(service, manager)
    assert "refused" not in ready["STATUS"]

    assert await _pong(old)  # the connection made with key A stays open and served
    fresh, reply = await service.connect(mint_token(SECRET_B, "HS256", "bob", "user"), "cam-b")
    assert reply["type"] == "registered"
    refused, _ = await service.connect(mint_token(SECRET_A, "HS256", "carol", "user"), "cam-c")
    assert (await refused.closed())[0] == 4401
    # The REST API checks bearer tokens with the same new key.
    assert (await _fetch(service.url("/stats"), mint_token(SECRET_B, "HS256", "bob", "user"))).code == 200
    assert (await _fetch(service.url("/stats"), mint_token(SECRET_A, "HS256", "alice", "user"))).code == 401
    assert (await _fetch(service.url("/health"))).code == 200
    assert await service.log_shows(r"GET /health")  # debug now: tornado's access log shows
    log = service.log()
    assert re.search(r"reloaded: .*changed: .*jwt_secret", log) and "log_level debug" in log
    assert re.search(r"WARNING .*restart.*mongo_db", log)
    assert SECRET_A not in log and SECRET_B not in log
    old.close()
    fresh.close()


async def test_sighup_with_invalid_config_keeps_serving_with_the_old_settings_and_names_the_key(
        start, manager, tmp_path):
    config = tmp_path / "watchout.toml"
    _config(config, SECRET_A)
    service, _ = await start(manager, {}, "--config", str(config))
    old, reply = await service.connect(mint_token(SECRET_A, "HS256", "alice", "user"), "cam-a")
    assert reply["type"] == "registered"

    _config(config, "too-short", log_level="debug")
    ready = await _hup(service, manager)
    assert "refused" in ready["STATUS"]
    assert re.search(r"ERROR .*reload refused.*jwt_secret", service.log())

    assert await _pong(old)
    again, reply = await service.connect(mint_token(SECRET_A, "HS256", "bob", "user"), "cam-b")
    assert reply["type"] == "registered"  # key A is still the key
    assert (await _fetch(service.url("/health"))).code == 200
    assert not await service.log_shows(r"GET /health", timeout=0.3)  # and the level is still info
    old.close()
    again.close()


async def test_sighup_in_the_embedded_run_keeps_the_generated_key(start, manager):
    service, _ = await start(manager, {})
    admin = re.search(r"(eyJ[\w-]+\.[\w-]+\.[\w-]+)", service.log()).group(1)
    assert (await _fetch(service.url("/stats"), admin)).code == 200
    assert "refused" not in (await _hup(service, manager))["STATUS"]
    assert (await _fetch(service.url("/stats"), admin)).code == 200
    assert "keeping the key in use" in service.log()


# ----------------------------------------------------------------------------- the unit file

def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_execstart_runs_the_console_script_serve_with_the_documented_layout():
    exec_start = shlex.split(_unit()["Service"]["ExecStart"])
    script = Path(exec_start[0])
    assert exec_start[1] == "serve" and script.name == "watchout"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in setup["options.entry_points"]["console_scripts"].strip().splitlines())
    assert {k.strip(): v.strip() for k, v in scripts.items()}.get(script.name) == "watchout.cli:main"
    args = _parser().parse_args(exec_start[1:])  # the real CLI accepts the unit's arguments
    assert args.command == "serve"
    doc = DEPLOY_DOC.read_text()
    assert str(script.parent.parent) in doc and args.config in doc  # the docs install where the unit looks


def test_unit_is_type_notify_with_reload_watchdog_and_env_file():
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["WatchdogSec"]) > 0 and service["Restart"] == "on-failure"
    assert service["LimitNOFILE"] == "65536"
    assert service["User"] == service["Group"] == "watchout"
    assert service["EnvironmentFile"] in DEPLOY_DOC.read_text()


def test_unit_keeps_the_data_directory_in_a_private_state_directory():
    service = _unit()["Service"]
    assert service["StateDirectory"] == "watchout" and service["StateDirectoryMode"] == "0700"
    environment = dict(item.split("=", 1) for item in shlex.split(service["Environment"]))
    # ProtectSystem=strict leaves only the state directory writable: data_dir must be that directory.
    assert environment["WATCHOUT_DATA_DIR"] == f"/var/lib/{service['StateDirectory']}"
    assert service["ProtectSystem"] == "strict" and "ReadWritePaths" not in service
    assert environment["WATCHOUT_DATA_DIR"] in DEPLOY_DOC.read_text()


def test_example_env_file_sets_only_real_settings():
    names = [line.split("=", 1)[0].lstrip("#").strip() for line in ENV_EXAMPLE.read_text().splitlines()
             if re.match(r"#?WATCHOUT_\w+=", line)]
    assert "WATCHOUT_JWT_SECRET" in names and "WATCHOUT_MONGO_URL" in names
    assert [n for n in names if n[len("WATCHOUT_"):].lower() not in FIELDS] == []


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=unit.parent)


def test_systemd_analyze_verify_passes(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if require_services():
            pytest.fail("systemd-analyze is not installed (Debian package systemd; .ci/run installs it)")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's binary exists: point a copy of the unit at this venv's console script.
    script = Path(sys.executable).parent / "watchout"
    assert script.is_file(), "the package is not installed in this venv (pip install -e .)"
    text = UNIT.read_text()
    exec_start = shlex.split(_unit()["Service"]["ExecStart"])[0]
    unit = tmp_path / "watchout.service"
    unit.write_text(text.replace(exec_start, str(script)))
    result = _verify(unit)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "watchout" in line] == []
    # verify reports mistakes as warnings with exit code 0: make sure it does read our unit.
    unit.write_text(text.replace(exec_start, str(script)).replace("Type=notify", "Type=notfy"))
    assert "watchout.service" in (lambda r: r.stdout + r.stderr)(_verify(unit))
