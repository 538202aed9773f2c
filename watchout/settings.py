"""Settings: one frozen object built once from watchout.toml, PORT, WATCHOUT_* variables and CLI flags."""
from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchout.errors import ConfigError

ENV_PREFIX = "WATCHOUT_"
# The WATCHOUT_* variables that are not settings, so that unknown_variables() does not report them.
OTHER_VARIABLES = frozenset({
    ENV_PREFIX + "CONFIG",             # the TOML file, when there is no --config (load_settings)
    ENV_PREFIX + "PUBLIC_PORT",        # docker/compose.yaml: the proxy's port on the host
    ENV_PREFIX + "REQUIRE_SERVICES",   # tests: a missing Redis or MongoDB fails instead of skipping
    ENV_PREFIX + "TEST_MONGO_URI",     # tests: the MongoDB to run the store tests on
    ENV_PREFIX + "TEST_ARTIFACTS",     # tests: where the browser tests keep screenshots
})
PLATFORM_PORT = "PORT"  # the port a PaaS (and the seed) gives the service: below WATCHOUT_PORT, above the file
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
MIN_SECRET_BYTES = 32
IN_MEMORY = ":memory:"  # data_dir: keep nothing on disk (tests, trying it out)
DATABASE_FILE = "watchout.db"
SQLITE_SYNCHRONOUS = ("normal", "full")  # PRAGMA synchronous of the embedded store (docs/configuration.md)
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every key; `config/watchout.toml` documents each one (a test keeps the two equal).

    Names are unique across the file's sections; each has the variable WATCHOUT_<NAME>.
    """

    # [server]
    host: str = "127.0.0.1"
    port: int = 3000
    log_format: str = "text"
    log_level: str = "info"
    trusted_origins: tuple[str, ...] = ()
    idle_connection_timeout_s: float = 60.0
    metrics_port: int = 0
    shutdown_timeout_s: float = 5.0
    # [auth]
    jwt_secret: str = field(default="", repr=False)
    jwt_public_key_file: str = ""
    jwt_algorithms: tuple[str, ...] = ()
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = 10.0
    auth_timeout_s: float = 10.0
    token_expiry_grace_s: float = 5.0
    # [store]
    data_dir: str = "watchout-data"
    sqlite_synchronous: str = "normal"
    mongo_url: str = field(default="", repr=False)
    mongo_db: str = "watchout"
    # [broker]
    broker_url: str = field(default="", repr=False)
    broker_prefix: str = "watchout:"
    broker_heartbeat_s: float = 2.0
    # [websocket]
    ws_ping_interval_s: float = 20.0
    ws_ping_timeout_s: float = 10.0
    ws_compression: bool = False
    max_message_bytes: int = 16 * 1024 * 1024
    max_control_message_bytes: int = 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    max_snapshot_bytes: int = 512 * 1024
    outbox_soft_bytes: int = 2 * 1024 * 1024
    outbox_hard_bytes: int = 16 * 1024 * 1024
    rate_limit_msgs_per_s: float = 20000.0
    rate_limit_burst: int = 40000
    max_bad_messages: int = 10
    # [jobs]
    offline_after_s: float = 30.0
    offline_check_s: float = 15.0
    stale_after_h: float = 24.0
    stream_retention_d: float = 30.0
    alert_retention_d: float = 90.0
    report_schedule: str = "00:00"
    job_lease_s: float = 60.0
    node_id: str = ""
    # [notifications]
    public_url: str = ""
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 5.0
    delivery_retry_base_s: float = 2.0
    delivery_retry_cap_s: float = 600.0
    delivery_max_age_s: float = 86400.0
    delivery_concurrency: int = 32
    escalate_after_s: float = 300.0
    mqtt_url: str = field(default="", repr=False)
    mqtt_prefix: str = "watchout"
    mqtt_discovery_prefix: str = "homeassistant"
    push_subject: str = ""

    @property
    def is_embedded_store(self) -> bool:
        return not self.mongo_url

    @property
    def database_path(self) -> str:
        """The embedded store's SQLite file, `<data_dir>/watchout.db` (relative to the working directory when
        data_dir is), or ":memory:"."""
        if self.data_dir == IN_MEMORY:
            return IN_MEMORY
        return str(Path(self.data_dir) / DATABASE_FILE)

    @property
    def base_url(self) -> str:
        """Where receivers of notifications reach this service (links to snapshots): public_url, or this
        server's own address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def node_name(self) -> str:
        """node_id, or `<hostname>:<pid>` when it is empty."""
        return self.node_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted JWT algorithms: configured, or the family of the configured key."""
        if self.jwt_algorithms:
            return self.jwt_algorithms
        return ("RS256",) if self.jwt_public_key_file else ("HS256",)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(key: str, raw: Any, from_text: bool) -> Any:
    """Coerce one value to the field's type; raise ConfigError naming the key."""
    kind = FIELDS[key].type
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if from_text and str(raw).strip().lower() in ("1", "true", "yes", "on"):
                return True
            if from_text and str(raw).strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(raw, bool) or (not from_text and not isinstance(raw, int)):
                raise ValueError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool) or (not from_text and not isinstance(raw, (int, float))):
                raise ValueError
            return float(raw)
        if kind == "str":
            if not from_text and not isinstance(raw, str):
                raise ValueError
            return str(raw)
        if kind == "tuple[str, ...]":
            if from_text:
                return tuple(p.strip() for p in str(raw).split(",") if p.strip())
            if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
                raise ValueError
            return tuple(raw)
    except ValueError:
        raise ConfigError(key, f"expected {kind}, got {raw!r}") from None
    raise ConfigError(key, f"unsupported type {kind}")  # pragma: no cover - a Settings field of a new type


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            document = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            raise ConfigError(section, "top-level keys belong in a [section]")
        for key, value in table.items():
            if key not in FIELDS:
                raise ConfigError(f"{section}.{key}", "unknown setting")
            values[key] = _convert(key, value, from_text=False)
    return values


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """File, then PORT (port only), then WATCHOUT_* variables, then CLI overrides (already typed); validated.

    Raises ConfigError naming the offending key (or PORT). WATCHOUT_* variables that name no setting are
    ignored here; unknown_variables() reports them.
    """
    values: dict[str, Any] = {}
    env = dict(environ or {})
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    if path is not None:
        values.update(_read_file(Path(path)))
    if PLATFORM_PORT in env:
        values["port"] = _platform_port(env[PLATFORM_PORT])
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_VARIABLES:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in FIELDS:
            values[key] = _convert(key, raw, from_text=True)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    settings = Settings(**values)
    validate(settings)
    return settings


def _platform_port(raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(PLATFORM_PORT, f"expected int, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(PLATFORM_PORT, f"must be 0..65535, got {port}")
    return port


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message for each WATCHOUT_* variable that names no setting (load_settings ignores it), naming
    the closest setting's variable, e.g. "WATCHOUT_JWT_SECRT is not a setting (did you mean
    WATCHOUT_JWT_SECRET?); it is ignored"."""
    messages = []
    for name in sorted(environ):
        key = name[len(ENV_PREFIX):].lower()
        if not name.startswith(ENV_PREFIX) or name in OTHER_VARIABLES or key in FIELDS:
            continue
        closest = difflib.get_close_matches(key, FIELDS, n=1)  # without the prefix every name shares
        hint = f" (did you mean {ENV_PREFIX}{closest[0].upper()}?)" if closest else ""
        messages.append(f"{name} is not a setting{hint}; it is ignored")
    return messages


def validate(s: Settings) -> None:
    """Raise ConfigError for the first key whose value cannot work."""
    if not 0 <= s.port <= 65535:
        raise ConfigError("port", f"must be 0..65535, got {s.port}")
    if not 0 <= s.metrics_port <= 65535 or (s.metrics_port and s.metrics_port == s.port):
        raise ConfigError("metrics_port", "must be 0 (serve /metrics on port) or another port 1..65535")
    if s.log_format not in LOG_FORMATS:
        raise ConfigError("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
    if s.log_level not in LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    positive = ("auth_timeout_s", "max_message_bytes", "max_control_message_bytes", "outbox_soft_bytes",
                "outbox_hard_bytes", "rate_limit_msgs_per_s", "rate_limit_burst", "max_bad_messages",
                "shutdown_timeout_s", "max_metadata_bytes",
                "max_snapshot_bytes", "idle_connection_timeout_s")
    for key in positive:
        if getattr(s, key) <= 0:
            raise ConfigError(key, "must be greater than 0")
    for key in ("ws_ping_interval_s", "ws_ping_timeout_s", "token_expiry_grace_s"):
        if getattr(s, key) < 0:
            raise ConfigError(key, "must be 0 or more")
    if s.ws_ping_interval_s and s.ws_ping_timeout_s > s.ws_ping_interval_s:
        raise ConfigError("ws_ping_timeout_s", "must not exceed ws_ping_interval_s")
    if not 0 <= s.jwt_leeway_s <= 30:
        raise ConfigError("jwt_leeway_s", "must be between 0 and 30 seconds")
    if s.outbox_hard_bytes < s.outbox_soft_bytes:
        raise ConfigError("outbox_hard_bytes", "must be at least outbox_soft_bytes")
    if s.max_control_message_bytes > s.max_message_bytes:
        raise ConfigError("max_control_message_bytes", "must not exceed max_message_bytes")
    _validate_jwt(s)
    if not s.data_dir.strip() or "\0" in s.data_dir:
        raise ConfigError("data_dir", f'must be a directory path, or "{IN_MEMORY}" to keep nothing')
    if s.sqlite_synchronous not in SQLITE_SYNCHRONOUS:
        raise ConfigError("sqlite_synchronous", f"must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
    if s.mongo_url and not s.mongo_url.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError("mongo_url", "must start with mongodb:// or mongodb+srv://")
    if s.broker_url and not s.broker_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("broker_url", "must start with redis://, rediss:// or unix://")
    if len(s.node_id.encode()) > 100:
        raise ConfigError("node_id", "must be at most 100 bytes")
    if s.broker_heartbeat_s <= 0:
        raise ConfigError("broker_heartbeat_s", "must be greater than 0")
    _validate_jobs(s)
    _validate_notifications(s)


def _validate_notifications(s: Settings) -> None:
    for key in ("webhook_timeout_s", "delivery_retry_base_s", "delivery_retry_cap_s", "delivery_max_age_s",
                "delivery_concurrency", "escalate_after_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(key, "must be greater than 0")
    if s.public_url and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", s.public_url):
        raise ConfigError("public_url", "must be an http:// or https:// URL without query or fragment, "
                          "e.g. https://watchout.example.com")
    if s.mqtt_url and not s.mqtt_url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError("mqtt_url", "must start with mqtt:// or mqtts://")
    if s.push_subject and not re.fullmatch(r"mailto:[^@\s]+@[^@\s]+|https://[^/\s]+(/\S*)?", s.push_subject):
        raise ConfigError("push_subject", "must be a mailto: address or an https:// URL (the contact push "
                          "services see)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", s.mqtt_prefix):
        raise ConfigError("mqtt_prefix", "must be topic levels of A-Z a-z 0-9 _ - separated by /")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", s.mqtt_discovery_prefix):
        raise ConfigError("mqtt_discovery_prefix", "must be topic levels of A-Z a-z 0-9 _ - separated by /")


def _validate_jobs(s: Settings) -> None:
    for key in ("offline_after_s", "offline_check_s", "job_lease_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(key, "must be greater than 0")
    for key in ("stale_after_h", "stream_retention_d", "alert_retention_d"):
        if getattr(s, key) < 0:
            raise ConfigError(key, "must be 0 (never remove) or more")
    if s.ws_ping_interval_s and s.offline_after_s <= s.ws_ping_interval_s:
        # a producer that sends no frames is heard from only when it answers a ping
        raise ConfigError("offline_after_s", f"must exceed ws_ping_interval_s ({s.ws_ping_interval_s:g}), or "
                          "idle producers would be marked offline between pings")
    try:
        schedule_fields(s.report_schedule)
    except ValueError as exc:
        raise ConfigError("report_schedule", str(exc)) from None


def _weekday_name(match: re.Match[str]) -> str:
    number = int(match.group())
    if number > 7:
        raise ValueError(f"weekday {number} is not 0-7 (0 and 7 are Sunday)")
    return WEEKDAYS[number % 7]


def schedule_fields(schedule: str) -> dict[str, str]:
    """The cron fields (minute, hour, day, month, day_of_week; UTC) of `report_schedule`.

    "HH:MM" is every day at that time; otherwise five crontab fields, e.g. "0 6 * * 1" (Mondays 06:00).
    Raises ValueError naming what is wrong.
    """
    text = schedule.strip()
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if clock:
        hour, minute = int(clock.group(1)), int(clock.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"{schedule!r} is not a time of day (HH:MM, 00:00 to 23:59)")
        return {"minute": str(minute), "hour": str(hour), "day": "*", "month": "*", "day_of_week": "*"}
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"{schedule!r} is neither HH:MM nor five crontab fields (minute hour day month weekday)")
    fields = dict(zip(("minute", "hour", "day", "month", "day_of_week"), parts))
    # crontab numbers weekdays from Sunday = 0 (or 7); APScheduler from Monday = 0: use names
    fields["day_of_week"] = re.sub(r"(?<![/\d])\d+", _weekday_name, fields["day_of_week"])
    from apscheduler.triggers.cron import CronTrigger  # checks each field's syntax and range

    try:
        CronTrigger(**fields, timezone=dt.timezone.utc)
    except ValueError as exc:
        raise ValueError(f"{schedule!r}: {exc}") from None
    return fields


def _validate_jwt(s: Settings) -> None:
    if s.jwt_secret and s.jwt_public_key_file:
        raise ConfigError("jwt_public_key_file", "set either jwt_secret or jwt_public_key_file, not both")
    if s.jwt_secret and len(s.jwt_secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError("jwt_secret", f"must be at least {MIN_SECRET_BYTES} bytes")
    if s.jwt_public_key_file and not Path(s.jwt_public_key_file).is_file():
        raise ConfigError("jwt_public_key_file", f"file not found: {s.jwt_public_key_file}")
    family = PUBLIC_KEY_ALGORITHMS if s.jwt_public_key_file else HMAC_ALGORITHMS
    for alg in s.algorithms:
        if alg not in family:
            raise ConfigError("jwt_algorithms", f"{alg} does not fit the configured key "
                              f"(allowed: {', '.join(family)})")


def with_values(settings: Settings, **changes: Any) -> Settings:
    """A validated copy with some values changed (used for the embedded run's generated secret)."""
    updated = dataclasses.replace(settings, **changes)
    validate(updated)
    return updated
