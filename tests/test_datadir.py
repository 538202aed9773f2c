"""The data directory and the kept signing key: created private, refused when unfit, shared by serve and token."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import tornado.httpclient

from watchout.serve import _announce
from watchout.datadir import load_or_create_secret, prepare_data_dir, read_secret
from watchout.errors import ConfigError
from watchout.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "datadir-secret-0123456789abcdef0123456789"


def _settings(data_dir: str | Path, **values: object) -> Settings:
    return load_settings(None, {}, {"data_dir": str(data_dir), **values})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(**extra: str) -> dict[str, str]:
    """No WATCHOUT_* from the caller's environment; this checkout's packages whatever the working directory."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WATCHOUT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _watchout(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watchout", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- the setting

def test_data_dir_defaults_to_watchout_data_and_reads_its_variable():
    assert Settings().data_dir == "watchout-data"
    assert Settings().database_path == os.path.join("watchout-data", "watchout.db")
    settings = load_settings(None, {"WATCHOUT_DATA_DIR": "/var/lib/watchout"})
    assert settings.data_dir == "/var/lib/watchout" and settings.database_path == "/var/lib/watchout/watchout.db"
    assert load_settings(None, {"WATCHOUT_DATA_DIR": ":memory:"}).database_path == ":memory:"


def test_an_empty_data_dir_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"WATCHOUT_DATA_DIR": ""})
    assert refused.value.key == "data_dir" and ":memory:" in str(refused.value)


# ----------------------------------------------------------------------------- the directory

def test_a_missing_data_dir_is_created_with_its_parents_and_mode_0700(tmp_path):
    target = tmp_path / "a" / "b" / "data"
    old_umask = os.umask(0o022)
    try:
        assert prepare_data_dir(_settings(target)) == target
    finally:
        os.umask(old_umask)
    assert target.is_dir() and _mode(target) == 0o700
    assert list(target.iterdir()) == []  # the write check leaves nothing behind


def test_an_existing_data_dir_is_used_as_it_is(tmp_path):
    target = tmp_path / "data"
    target.mkdir(mode=0o750)
    target.chmod(0o750)
    (target / "watchout.db").write_bytes(b"kept")
    assert prepare_data_dir(_settings(target)) == target
    assert _mode(target) == 0o750 and (target / "watchout.db").read_bytes() == b"kept"


def test_a_relative_data_dir_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_data_dir(_settings("watchout-data")) == tmp_path / "watchout-data"
    assert (tmp_path / "watchout-data").is_dir()


def test_memory_data_dir_touches_no_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prepare_data_dir(_settings(":memory:")) is None
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_that_is_a_file_is_refused_naming_it(tmp_path):
    target = tmp_path / "data"
    target.write_text("not a directory")
    with pytest.raises(ConfigError) as refused:
        prepare_data_dir(_settings(target))
    assert refused.value.key == "data_dir"
    assert f"{target} is not a directory" in str(refused.value) and "WATCHOUT_DATA_DIR" in str(refused.value)


def test_a_data_dir_that_cannot_be_created_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "data"
    with pytest.raises(ConfigError) as refused:
        prepare_data_dir(_settings(target))
    assert refused.value.key == "data_dir" and f"cannot create {target}" in str(refused.value)


def test_a_data_dir_that_is_not_writable_is_refused_even_as_root():
    # /proc/self is a directory nobody can create files in, root included (a chmod'ed directory would not
    # stop root): the check is a real write, not os.access().
    target = Path("/proc/self")
    if not target.is_dir():
        pytest.skip("no /proc on this system")
    with pytest.raises(ConfigError) as refused:
        prepare_data_dir(_settings(target))
    assert refused.value.key == "data_dir" and "cannot write in /proc/self" in str(refused.value)


# ----------------------------------------------------------------------------- the key

def test_the_key_is_created_0600_and_reused(tmp_path):
    old_umask = os.umask(0o022)
    try:
        first = load_or_create_secret(tmp_path)
    finally:
        os.umask(old_umask)
    key_file = tmp_path / "jwt-secret"
    assert _mode(key_file) == 0o600
    assert key_file.read_text().strip() == first and len(first) >= 64  # token_urlsafe(48): 64 characters
    assert load_or_create_secret(tmp_path) == first == read_secret(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwt-secret"]  # no temporary file left


def test_no_key_file_reads_as_none(tmp_path):
    assert read_secret(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_key_file_readable_by_others_is_refused_with_the_fix(tmp_path):
    key_file = tmp_path / "jwt-secret"
    key_file.write_text(SECRET + "\n")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError) as refused:
        load_or_create_secret(tmp_path)
    message = str(refused.value)
    assert str(key_file) in message and "0644" in message and f"chmod 600 {key_file}" in message
    assert key_file.read_text() == SECRET + "\n"  # left as it was
    key_file.chmod(0o600)
    assert load_or_create_secret(tmp_path) == SECRET


def test_an_empty_key_file_is_refused(tmp_path):
    key_file = tmp_path / "jwt-secret"
    key_file.write_text("\n")
    key_file.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        load_or_create_secret(tmp_path)
    assert f"{key_file} is empty" in str(refused.value) and "delete it" in str(refused.value)
    assert key_file.read_text() == "\n"


CREATE_KEY = """
import sys, time
from pathlib import Path
from watchout.datadir import load_or_create_secret
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(load_or_create_secret(Path(sys.argv[1])))
"""


@pytest.mark.parametrize("round_", range(3))
def test_processes_starting_at_once_share_one_key(tmp_path, round_):
    start_at = f"{time.time() + 1.5:.3f}"  # every process imported and waiting by then
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_KEY, str(tmp_path), start_at], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    keys = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        keys.append(out.strip())
    assert len(set(keys)) == 1 and keys[0] == (tmp_path / "jwt-secret").read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jwt-secret"]


# ----------------------------------------------------------------------------- watchout token

def test_token_signs_with_the_kept_key_when_none_is_configured(tmp_path):
    data_dir = prepare_data_dir(_settings(tmp_path / "watchout-data"))
    assert data_dir is not None
    key = load_or_create_secret(data_dir)
    result = _watchout("token", "--sub", "x", "--role", "admin", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), key, algorithms=["HS256"])
    assert claims["sub"] == "x" and claims["role"] == "admin"


def test_token_without_a_key_says_how_to_get_one(tmp_path):
    result = _watchout("token", "--sub", "x", "--role", "admin", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert str(tmp_path / "watchout-data" / "jwt-secret") in result.stderr
    assert "watchout serve" in result.stderr and "WATCHOUT_JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # token only reads: it creates no directory and no key


def test_token_refuses_a_kept_key_readable_by_others(tmp_path):
    key_file = tmp_path / "watchout-data" / "jwt-secret"
    key_file.parent.mkdir()
    key_file.write_text(SECRET)
    key_file.chmod(0o640)
    result = _watchout("token", "--sub", "x", cwd=tmp_path)
    assert result.returncode == 2 and f"chmod 600 {key_file}" in result.stderr and "Traceback" not in result.stderr


def test_token_prefers_the_configured_secret(tmp_path):
    data_dir = tmp_path / "watchout-data"
    data_dir.mkdir()
    load_or_create_secret(data_dir)
    result = _watchout("token", "--sub", "x", cwd=tmp_path, WATCHOUT_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "x"


# ----------------------------------------------------------------------------- watchout serve

def test_serve_refuses_a_data_dir_that_is_a_file(tmp_path):
    target = tmp_path / "data"
    target.write_text("")
    started = time.monotonic()
    result = _watchout("serve", "--port", "0", cwd=tmp_path, WATCHOUT_DATA_DIR=str(target))
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert f"watchout: config: data_dir: {target} is not a directory" in result.stderr
    assert "Traceback" not in result.stderr and "Watchout" not in result.stdout


def test_serve_refuses_a_kept_key_readable_by_others(tmp_path):
    key_file = tmp_path / "watchout-data" / "jwt-secret"
    key_file.parent.mkdir()
    key_file.write_text(SECRET)
    key_file.chmod(0o644)
    result = _watchout("serve", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2 and f"chmod 600 {key_file}" in result.stderr and "Traceback" not in result.stderr


async def _start(cwd: Path, *args: str, until: str = "Stats:",
                 **env: str) -> tuple[asyncio.subprocess.Process, str]:
    """`watchout ARGS` in cwd; returns the process and its output up to the line containing `until`
    (then the next two lines, the admin token's, for serve)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", *args, cwd=cwd, env=_env(**env),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    while not any(until in line for line in lines):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, f"watchout {args[0]} exited early:\n" + "".join(lines)
        lines.append(line)
    if until == "Stats:":
        for _ in range(2):
            lines.append((await asyncio.wait_for(proc.stdout.readline(), 5)).decode())
    return proc, "".join(lines)


async def _stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> int:
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        return await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _stats_status(port: str, token: str) -> int:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/stats", headers={"Authorization": f"Bearer {token}"}, raise_error=False)
    return response.code


async def test_serve_keeps_its_key_so_tokens_survive_a_restart_and_token_signs_with_it(tmp_path):
    proc, output = await _start(tmp_path, "serve", "--port", "0")
    try:
        data_dir = tmp_path / "watchout-data"
        assert f"Data:      {data_dir} (SQLite)" in output
        assert f"signed with the key kept in {data_dir / 'jwt-secret'}" in output
        assert "a new key is generated at each start" not in output
        assert _mode(data_dir) == 0o700 and _mode(data_dir / "jwt-secret") == 0o600
        port = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", output).group(1)
        admin = re.search(r"(eyJ[\w-]+\.[\w-]+\.[\w-]+)", output).group(1)
        minted = _watchout("token", "--sub", "ops", "--role", "admin", cwd=tmp_path)
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        assert await _stats_status(port, token) == 200
    finally:
        assert await _stop(proc) == 0
    proc, output = await _start(tmp_path, "serve", "--port", "0")
    try:
        port = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", output).group(1)
        assert await _stats_status(port, token) == 200 and await _stats_status(port, admin) == 200
    finally:
        assert await _stop(proc) == 0


# ----------------------------------------------------------------------------- the banner

def test_the_banner_names_the_data_directory_and_the_kept_key(tmp_path, capsys):
    _announce(_settings(tmp_path / "data", jwt_secret=SECRET), 3000, "the-admin-token")
    out = capsys.readouterr().out
    assert f"  Data:      {tmp_path / 'data'} (SQLite)\n" in out
    assert f"signed with the key kept in {tmp_path / 'data' / 'jwt-secret'}, reused at the next start" in out
    assert "    the-admin-token" in out and "a new key is generated" not in out


def test_the_banner_names_a_relative_data_directory_absolutely(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _announce(_settings("watchout-data", jwt_secret=SECRET), 3000, None)
    out = capsys.readouterr().out
    assert f"  Data:      {tmp_path / 'watchout-data'} (SQLite)\n" in out and "Admin token" not in out


def test_the_banner_says_nothing_is_kept_in_memory(capsys):
    _announce(_settings(":memory:", jwt_secret=SECRET), 3000, "the-admin-token")
    out = capsys.readouterr().out
    assert "  Data:      (in memory: nothing is kept)\n" in out
    assert "Admin token for this run (valid 24 h; a new key is generated at each start)" in out


def test_the_banner_never_prints_the_mongodb_url(capsys):
    _announce(_settings(":memory:", jwt_secret=SECRET, mongo_url="mongodb://watchout:s3cret-pw@db.example:27017/"),
              3000, None)
    out = capsys.readouterr().out
    assert "  Data:      MongoDB, database watchout\n" in out
    assert "s3cret-pw" not in out and "mongodb://" not in out and "db.example" not in out


# ----------------------------------------------------------------------------- watchout demo

async def test_demo_keeps_its_data_in_a_temporary_directory_removed_at_exit(tmp_path):
    pytest.importorskip("PIL.Image", reason="the demo's simulators need Pillow (watchout[sim])")
    proc, output = await _start(tmp_path, "demo", "--port", "0", until="Ctrl+C")
    try:
        data_dir = Path(re.search(r"Data: +(\S+) \(SQLite\)", output).group(1))
        assert data_dir.is_dir() and (data_dir / "jwt-secret").is_file()
        assert not data_dir.is_relative_to(tmp_path)
    finally:
        assert await _stop(proc, signal.SIGINT) == 0
    assert not data_dir.exists()
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory


async def test_demo_with_data_dir_keeps_it(tmp_path):
    pytest.importorskip("PIL.Image", reason="the demo's simulators need Pillow (watchout[sim])")
    data_dir = tmp_path / "demo-data"
    proc, output = await _start(tmp_path, "demo", "--port", "0", "--data-dir", str(data_dir), until="Ctrl+C")
    try:
        assert f"Data:      {data_dir} (SQLite)" in output
    finally:
        assert await _stop(proc, signal.SIGINT) == 0
    assert _mode(data_dir / "jwt-secret") == 0o600
