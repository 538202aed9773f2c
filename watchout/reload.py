"""SIGHUP: read the configuration again and apply what can change while connections stay open."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from watchout.errors import ConfigError
from watchout.logs import setup_logging
from watchout.services import Services
from watchout.settings import Settings, with_values

log = logging.getLogger("watchout.reload")

# Applied by a reload. Everything else (host, port, mongo_url, limits, ...) needs a restart.
RELOADABLE = ("log_format", "log_level", "jwt_secret", "jwt_public_key_file", "jwt_algorithms", "jwt_issuer",
              "jwt_audience", "jwt_leeway_s")
_KEY_FIELDS = ("jwt_secret", "jwt_public_key_file", "jwt_algorithms")


def reload_settings(services: Services, load: Callable[[], Settings]) -> bool:
    """Apply log level and format and the JWT verification settings from `load()`; False if refused.

    The key is read again even when its setting did not change (a rewritten public key file).
    New tokens are checked with the new key at once; connections already authenticated keep their
    principals until their own tokens expire. Invalid settings, or a key file that cannot be read,
    keep everything as it was and are logged naming the key. Changes to settings that need a
    restart are listed in a warning and otherwise ignored.
    """
    current = services.settings
    try:
        fresh = load()
        if not fresh.jwt_secret and not fresh.jwt_public_key_file:
            # The embedded run's generated key, or a key deleted from the file: dropping it would
            # lock every client out, so the key in use stays.
            fresh = with_values(fresh, **{k: getattr(current, k) for k in _KEY_FIELDS})
            log.info("reload: no JWT key configured; keeping the key in use")
        applied = with_values(current, **{k: getattr(fresh, k) for k in RELOADABLE})
        services.replace_verifier(applied)
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return False
    except OSError as exc:
        log.error("reload refused, the running configuration stays: config: jwt_public_key_file: cannot read %s: %s",
                  exc.filename, exc.strerror)
        return False
    setup_logging(applied.log_format, applied.log_level)
    changed = [k for k in RELOADABLE if getattr(applied, k) != getattr(current, k)]
    log.info("reloaded: JWT verification key re-read%s; log_level %s, log_format %s",
             f", changed: {', '.join(changed)}" if changed else ", no setting changed",
             applied.log_level, applied.log_format)
    restart = [f.name for f in dataclasses.fields(Settings)
               if f.name not in RELOADABLE and getattr(fresh, f.name) != getattr(current, f.name)]
    if restart:
        log.warning("reload: changed settings that take effect only after a restart: %s", ", ".join(restart))
    return True
