"""Settings: the documented file, environment overrides, and start-up errors that name the key."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from watchout.errors import ConfigError
from watchout.settings import OTHER_VARIABLES, Settings, load_settings, unknown_variables

CONFIG = Path(__file__).resolve().parent.parent / "config" / "watchout.toml"


def test_config_file_documents_every_setting_with_its_default():
    document = tomllib.loads(CONFIG.read_text())
    documented = {key: value for table in document.values() for key, value in table.items()}
    defaults = Settings()
    assert set(documented) == {f.name for f in dataclasses.fields(Settings)}
    for key, value in documented.items():
        expected = getattr(defaults, key)
        assert (tuple(value) if isinstance(value, list) else value) == expected, key


def test_config_file_loads_to_the_defaults():
    assert load_settings(CONFIG, {}) == Settings()


def test_environment_overrides_file_and_cli_overrides_environment():
    s = load_settings(CONFIG, {"WATCHOUT_PORT": "8080", "WATCHOUT_WS_COMPRESSION": "true",
                               "WATCHOUT_TRUSTED_ORIGINS": "https://a.example, https://b.example"},
                      {"host": "0.0.0.0"})
    assert (s.port, s.ws_compression, s.host) == (8080, True, "0.0.0.0")
    assert s.trusted_origins == ("https://a.example", "https://b.example")
    assert load_settings(None, {"WATCHOUT_PORT": "8080"}, {"port": 9000}).port == 9000


@pytest.mark.parametrize("environ, key", [
    ({"WATCHOUT_PORT": "eighty"}, "port"),
    ({"WATCHOUT_PORT": "70000"}, "port"),
    ({"WATCHOUT_LOG_FORMAT": "xml"}, "log_format"),
    ({"WATCHOUT_JWT_SECRET": "short"}, "jwt_secret"),
    ({"WATCHOUT_JWT_LEEWAY_S": "120"}, "jwt_leeway_s"),
    ({"WATCHOUT_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"}, "jwt_public_key_file"),
    ({"WATCHOUT_JWT_ALGORITHMS": "none"}, "jwt_algorithms"),
    ({"WATCHOUT_AUTH_TIMEOUT_S": "0"}, "auth_timeout_s"),
    ({"WATCHOUT_MONGO_URL": "postgres://x"}, "mongo_url"),
    ({"WATCHOUT_OUTBOX_HARD_BYTES": "10"}, "outbox_hard_bytes"),
    ({"WATCHOUT_WS_COMPRESSION": "maybe"}, "ws_compression"),
])
def test_bad_values_raise_config_error_naming_the_key(environ, key):
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ)
    assert info.value.key == key
    assert key in str(info.value)


def test_unknown_key_in_file_is_refused(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text('[server]\nprot = 3000\n')
    with pytest.raises(ConfigError, match="server.prot"):
        load_settings(path, {})


def test_serve_with_bad_config_exits_2_naming_the_key():
    result = subprocess.run([sys.executable, "-m", "watchout", "serve"], env={"WATCHOUT_PORT": "x", "PATH": ""},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "port" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_variable_is_reported_with_the_closest_setting():
    environ = {"WATCHOUT_JWT_SECRT": "x" * 40, "WATCHOUT_PORT": "8080", "HOME": "/root"}
    assert unknown_variables(environ) == [
        "WATCHOUT_JWT_SECRT is not a setting (did you mean WATCHOUT_JWT_SECRET?); it is ignored"]
    assert load_settings(None, environ).jwt_secret == ""  # ignored, as reported
    assert unknown_variables({"WATCHOUT_ZZZZZZZZ": "1"}) == ["WATCHOUT_ZZZZZZZZ is not a setting; it is ignored"]


def test_variables_that_are_not_settings_but_are_used_give_no_warning():
    used = {"WATCHOUT_CONFIG", "WATCHOUT_PUBLIC_PORT", "WATCHOUT_REQUIRE_SERVICES", "WATCHOUT_TEST_MONGO_URI",
            "WATCHOUT_TEST_ARTIFACTS"}
    assert used <= OTHER_VARIABLES
    assert unknown_variables({name: "1" for name in OTHER_VARIABLES}) == []
    assert unknown_variables({"WATCHOUT_" + key.upper(): "" for key in Settings.__dataclass_fields__}) == []


def test_port_comes_from_port_below_watchout_port_and_the_flag(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text("[server]\nport = 4000\n")
    assert load_settings(path, {}).port == 4000
    assert load_settings(path, {"PORT": "5000"}).port == 5000
    assert load_settings(path, {"PORT": "5000", "WATCHOUT_PORT": "6000"}).port == 6000
    assert load_settings(path, {"PORT": "5000", "WATCHOUT_PORT": "6000"}, {"port": 7000}).port == 7000


@pytest.mark.parametrize("value", ["eighty", "70000", "-1"])
def test_a_bad_port_variable_is_refused_naming_port(value):
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"PORT": value})
    assert info.value.key == "PORT"
    assert "config: PORT: " in str(info.value)


def test_serve_logs_a_warning_for_a_misspelt_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHOUT_") and k != "PORT"}
    env.update({"WATCHOUT_DATA_DIR": ":memory:", "WATCHOUT_JWT_SECRET": "s" * 40, "WATCHOUT_LOG_LEVL": "debug"})
    proc = subprocess.Popen([sys.executable, "-m", "watchout", "serve", "--port", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = threading.Timer(20, proc.kill)  # then readline() gets EOF instead of blocking
    deadline.start()
    try:
        assert proc.stderr is not None
        while not any("LOG_LEVL" in line or "listening on" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "watchout serve exited early:\n" + "".join(lines)
            lines.append(line)
    finally:
        deadline.cancel()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert any("WARNING" in line and "WATCHOUT_LOG_LEVL is not a setting (did you mean WATCHOUT_LOG_LEVEL?); "
               "it is ignored" in line for line in lines), "".join(lines)
