"""Settings: the documented file, environment overrides, and start-up errors that name the key."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from watchout.errors import ConfigError
from watchout.settings import Settings, load_settings

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
