"""Logging set-up: one line per event, text or JSON, with tokens redacted from every record."""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# JWTs, bearer credentials, and token values in query strings or JSON bodies.
_SECRETS = re.compile(
    r"(eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*)"
    r"|((?:[Bb]earer)\s+)[^\s\"',]+"
    r"|((?:token|access_token|jwt)=)[^&\s\"']+"
    r"|(\"token\"\s*:\s*\")[^\"]*"
)
CONTEXT_FIELDS = ("conn", "user", "stream", "node")
_node: str | None = None  # set in each worker of `watchout serve --workers N`: its lines say which it is


def name_node(node: str | None) -> None:
    """Put `node=<node>` on every log line of this process from now on (None: no node field)."""
    global _node
    _node = node


def redact(text: str) -> str:
    """Replace anything that looks like a credential with [redacted]."""
    def sub(m: re.Match[str]) -> str:
        prefix = m.group(2) or m.group(3) or m.group(4) or ""
        return prefix + "[redacted]"
    return _SECRETS.sub(sub, text)


class RedactingFilter(logging.Filter):
    """Renders each record's message once, redacted, so no formatter can print a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _node is not None:
            record.node = _node
        message = record.getMessage()
        cleaned = redact(message)
        record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class TextFormatter(logging.Formatter):
    """One line per record (line breaks in it are escaped); only a traceback continues on more lines."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if hasattr(record, k))
        line = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {record.levelname:<7} {record.name}: " \
               f"{record.getMessage()}{' ' + context if context else ''}"
        line = line.replace("\r", "\\r").replace("\n", "\\n")
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                                 "logger": record.name, "msg": record.getMessage()}
        for key in CONTEXT_FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


def setup_logging(log_format: str, level: str) -> None:
    """Configure the root logger once for the process (the CLI calls this)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One access-log line per request is plenty at info; the relay logs its own events.
    logging.getLogger("tornado.access").setLevel(logging.WARNING if level == "info" else level.upper())
