"""The data directory on disk: created private, checked writable, and home of the generated signing key."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from watchout.errors import ConfigError
from watchout.settings import IN_MEMORY, MIN_SECRET_BYTES, Settings

SECRET_FILE = "jwt-secret"
DIR_MODE = 0o700
SECRET_MODE = 0o600


def prepare_data_dir(settings: Settings) -> Path | None:
    """Make sure `data_dir` is a directory this process can write in; its absolute path (None for ":memory:").

    A missing directory is created with mode 0700, its missing parents too; an existing one keeps its mode.
    Raises ConfigError (key data_dir) naming the path when it is not a directory, cannot be created or
    is not writable.
    """
    if settings.data_dir == IN_MEMORY:
        return None
    path = Path(settings.data_dir).absolute()
    fix = f'; set data_dir (WATCHOUT_DATA_DIR) to a directory this user can write in, or "{IN_MEMORY}" to keep nothing'
    if path.exists() and not path.is_dir():
        raise ConfigError("data_dir", f"{path} is not a directory{fix}")
    if not path.is_dir():
        try:
            path.mkdir(mode=DIR_MODE, parents=True)
            path.chmod(DIR_MODE)  # whatever the umask
        except FileExistsError:
            if not path.is_dir():  # another process made a file there meanwhile
                raise ConfigError("data_dir", f"{path} is not a directory{fix}") from None
        except OSError as exc:
            raise ConfigError("data_dir", f"cannot create {path}: {exc.strerror}{fix}") from None
    # A real write: root passes os.access() even where no file can be made (/proc, a read-only file system).
    probe = path / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot write in {path}: {exc.strerror}{fix}") from None
    return path


def secret_path(data_dir: Path) -> Path:
    """Where the generated HS256 signing key is kept: `<data_dir>/jwt-secret`."""
    return data_dir / SECRET_FILE


def read_secret(data_dir: Path) -> str | None:
    """The signing key kept in `<data_dir>/jwt-secret`, or None when there is no such file.

    Raises ConfigError, saying how to fix it, when the file is readable by group or others (it must be
    0600), is empty or too short, or cannot be read.
    """
    path = secret_path(data_dir)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot read the signing key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError("data_dir", f"the signing key {path} is not a regular file")
    if mode & 0o077:
        raise ConfigError("data_dir", f"the signing key {path} is open to group or others "
                          f"(mode {stat.S_IMODE(mode):04o}); allow only its owner: chmod 600 {path}")
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("data_dir", f"cannot read the signing key {path}: {exc}") from None
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError("data_dir", f"the signing key {path} is {'empty' if not secret else 'too short'}; "
                          f"delete it to have `watchout serve` generate a new one (tokens signed with the old "
                          f"key stop working), or write a key of at least {MIN_SECRET_BYTES} bytes into it")
    return secret


def load_or_create_secret(data_dir: Path) -> str:
    """The HS256 signing key kept in `<data_dir>/jwt-secret`, created (mode 0600) on first use.

    The key is `secrets.token_urlsafe(48)`, written whole to a private temporary file and then linked into
    place, so no reader ever sees half a key and a key already there is never replaced: of two processes
    starting at once, the second reads the first one's key. Raises ConfigError as `read_secret` does,
    and when the file cannot be written.
    """
    existing = read_secret(data_dir)
    if existing is not None:
        return existing
    path = secret_path(data_dir)
    temporary = data_dir / f".{SECRET_FILE}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(secrets.token_urlsafe(48) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            # os.link, unlike os.replace, fails when the name exists: a key another process published first wins.
            os.link(temporary, path)
            _sync_directory(data_dir)
        finally:
            temporary.unlink(missing_ok=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot write the signing key {path}: {exc.strerror}") from None
    secret = read_secret(data_dir)
    if secret is None:  # pragma: no cover - deleted between our link and our read
        raise ConfigError("data_dir", f"the signing key {path} disappeared as it was created")
    return secret


def _sync_directory(path: Path) -> None:
    """Flush a directory's entries, so that a file just linked into it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
