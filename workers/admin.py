"""The admin commands `watchout cleanup`, `report`, `jobs` and `backup`, against the configured database
(MongoDB, or the SQLite file under data_dir), whether or not `watchout serve` runs."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import sys
from pathlib import Path
from typing import Any, TextIO

from watchout.auth import parse_ttl
from watchout.errors import ConfigError, StoreUnavailable
from watchout.services import Services, open_services
from watchout.settings import IN_MEMORY, Settings, with_values
from watchout.store import open_store
from watchout.store.sqlite import SQLiteStore
from workers.cleanup import Cleanup, cleanup, cutoffs
from workers.clock import Instant
from workers.progress import Progress
from workers.reports import as_csv, as_json, as_table, build_report
from workers.scheduler import CLUSTER, Firing, job_specs, node_name, run_job
from workers.tables import render

UTC = dt.timezone.utc
STOPPED_NODE_AFTER = dt.timedelta(hours=1)  # a per-node job's last run older than this: its node has stopped


class UsageError(Exception):
    """A bad option value: the message is for the operator, and the exit code is 2."""


def run_command(settings: Settings, args: argparse.Namespace) -> int:
    """`watchout cleanup|report|jobs|backup`: 0 done, 1 the store failed or a job could not run, 2 bad usage."""
    try:
        if args.command == "backup":
            return asyncio.run(backup_command(settings, args.path, sys.stdout, force=args.force))
        missing = missing_database(settings)
        if missing is not None and args.command != "jobs":
            raise UsageError(missing)
        period = report_period(args, dt.datetime.now(UTC)) if args.command == "report" else None
        return asyncio.run(_run(settings, args, period, missing))
    except (UsageError, ConfigError) as exc:  # ConfigError: a database that cannot be opened
        print(f"watchout: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"watchout: store unavailable: {exc.message}", file=sys.stderr)
        return 1


def missing_database(settings: Settings) -> str | None:
    """Why there is no database to work on (None: there is one). The commands never create the SQLite
    file: in the wrong working directory, or with the wrong data_dir, they would work on an empty one."""
    if settings.mongo_url:
        return None
    if settings.data_dir == IN_MEMORY:
        return (f'data_dir is "{IN_MEMORY}": that database lives and dies with the process that holds it, so there '
                "is none to work on here; set data_dir (WATCHOUT_DATA_DIR) to the service's data directory")
    path = Path(settings.database_path).absolute()
    if not path.is_file():
        return (f"no database at {path}: set data_dir (WATCHOUT_DATA_DIR) to the service's data directory "
                "(`watchout serve` creates the database there when it first starts)")
    return None


async def _run(settings: Settings, args: argparse.Namespace, period: tuple[dt.datetime, dt.datetime] | None,
               missing: str | None) -> int:
    if missing is not None:  # `jobs` without a database
        print(f"watchout: {missing}; showing the schedule only", file=sys.stderr)
        return await jobs_command(None, settings, sys.stdout)
    # Services verify tokens, and these commands take none: a throwaway key of their own rather than the
    # service's (a key file or the key kept in data_dir may be unreadable to this user, or not made yet)
    settings = with_values(settings, jwt_secret=secrets.token_urlsafe(48), jwt_public_key_file="", jwt_algorithms=())
    async with open_services(settings) as services:
        if args.command == "cleanup":
            return await cleanup_command(services, sys.stdout, sys.stderr, dry_run=args.dry_run)
        if args.command == "report":
            assert period is not None
            return await report_command(services, sys.stdout, period, stream_id=args.stream, owner_id=args.owner,
                                        fmt=args.format, progress=Progress(sys.stderr))
        return await jobs_command(services, settings, sys.stdout)


# ---------------------------------------------------------------------- cleanup
async def cleanup_command(services: Services, out: TextIO, err: TextIO | None, *, dry_run: bool) -> int:
    """Run the prune job now, under its lease unless dry_run (which changes nothing), and print the result."""
    progress = Progress(err)
    at = Instant.now()
    if dry_run:
        result = await cleanup(services, at.wall, dry_run=True, progress=progress)
    else:
        outcome: list[Cleanup] = []

        async def body() -> dict[str, Any]:
            outcome.append(await cleanup(services, at.wall, progress=progress))
            return outcome[0].summary()

        node = f"{node_name(services.settings)}/cli:{os.getpid()}"
        run = await run_job(services, "prune", CLUSTER, node, Firing(at, at.wall, None), body)
        if run is None:
            print("watchout: prune is running on another node right now; try again in a moment", file=err)
            return 1
        if run.result != "ok":
            print(f"watchout: prune {run.result}: {run.error}", file=err)
            return 1
        result = outcome[0]
    out.write(describe_cleanup(services, result, at.wall))
    return 0


def describe_cleanup(services: Services, result: Cleanup, now: dt.datetime) -> str:
    never_seen_before, seen_before, received_before = cutoffs(services, now)
    verb = "Would remove" if result.dry_run else "Removed"
    lines = []
    if result.streams:
        lines.append(f"{verb} {len(result.streams)} stream(s), with their alerts and snapshots:")
        width = max(len(s.stream_id) for s in result.streams)
        for s in result.streams:
            why = (f"registered {_when(s.created_at)}, never seen" if s.last_seen_at is None
                   else f"offline, last seen {_when(s.last_seen_at)}")
            lines.append(f"  {s.stream_id:<{width}}  owner {s.owner_id}  {why}")
    if result.alerts:
        total = sum(result.alerts.values())
        lines.append(f"{verb} {total} alert(s) received before {_when(received_before)}:")
        width = max(len(sid) for sid in result.alerts)
        lines += [f"  {sid:<{width}}  {count}" for sid, count in sorted(result.alerts.items())]
    if result.usage_rows:
        lines.append(f"{verb} {result.usage_rows} hourly figure row(s) from before {_when(received_before)}.")
    if not lines:
        lines.append("Nothing to remove" + (" (dry run)." if result.dry_run else "."))
    rules = [f"never-seen streams created before {_when(never_seen_before)}" if never_seen_before else None,
             f"offline streams last seen before {_when(seen_before)}" if seen_before else None,
             f"alerts received before {_when(received_before)}" if received_before else None]
    kept = ", ".join(r for r in rules if r) or "nothing (every retention setting is 0)"
    lines.append(f"Rules: remove {kept}.")
    return "\n".join(lines) + "\n"


def _when(moment: dt.datetime | None) -> str:
    return "-" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


# ---------------------------------------------------------------------- report
def report_period(args: argparse.Namespace, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) from --since, or --from and --to (ISO dates or times; UTC unless they say otherwise)."""
    if args.since and args.start:
        raise UsageError("give --since or --from, not both")
    if args.end and not args.start:
        raise UsageError("--to needs --from")
    if args.start:
        start = parse_time(args.start, "--from")
        end = parse_time(args.end, "--to") if args.end else now
    else:
        try:
            seconds = parse_ttl(args.since or "24h")
        except ValueError:
            raise UsageError(f"--since {args.since!r} is not a duration like 90m, 24h or 7d") from None
        start, end = now - dt.timedelta(seconds=seconds), now
    if start >= end:
        raise UsageError("the period is empty: --from must be before --to")
    return start, end


def parse_time(text: str, option: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an ISO date or time (2026-11-25 or 2026-11-25T08:00)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def report_command(services: Services, out: TextIO, period: tuple[dt.datetime, dt.datetime], *,
                         stream_id: str | None = None, owner_id: str | None = None, fmt: str = "table",
                         progress: Progress | None = None) -> int:
    report = await build_report(services.store, *period, stream_id=stream_id, owner_id=owner_id, progress=progress)
    out.write({"csv": as_csv, "json": as_json}.get(fmt, as_table)(report))
    if fmt == "json":
        out.write("\n")
    return 0


# ---------------------------------------------------------------------- jobs
async def jobs_command(services: Services | None, settings: Settings, out: TextIO,
                       now: dt.datetime | None = None) -> int:
    """The jobs, their schedules and next runs (from the settings), and their last runs (from the store)."""
    now = now or dt.datetime.now(UTC)
    runs: dict[str, list[dict[str, Any]]] = {}
    leases: dict[str, dict[str, Any]] = {}
    if services is not None:
        for run in await services.store.job_runs():
            runs.setdefault(str(run["job"]), []).append(run)
        leases = {str(lease["job"]): lease for lease in await services.store.leases()}
    recent = now - STOPPED_NODE_AFTER
    header = ("JOB", "RUNS ON", "SCHEDULE", "NEXT RUN", "LAST RUN", "DURATION", "RESULT", "NODE")
    lines: list[tuple[str, ...]] = []
    for spec in job_specs(settings):
        scope = "one node" if spec.scope == CLUSTER else "every node"
        first = (spec.name, scope, spec.schedule, _when(spec.trigger.get_next_fire_time(None, now)))
        lease = leases.get(spec.name)
        if lease is not None and lease["until"] > now:
            lines.append((*first, f"running since {_when(lease.get('takenAt'))}", "-", "running", str(lease["owner"])))
            continue
        done = sorted((r for r in runs.get(spec.name, []) if spec.scope == CLUSTER or r["startedAt"] > recent),
                      key=lambda r: str(r.get("node")))
        if not done:
            lines.append((*first, "-" if services is not None else "unknown", "-", "-", "-"))
        for index, run in enumerate(done):
            result = str(run["result"]) + (f" ({run['error']})" if run.get("error") else "")
            lines.append((*(first if index == 0 else ("", "", "", "")), _when(run["startedAt"]),
                          f"{float(run['durationS']):.2f} s", result, str(run["node"])))
    out.write(render(header, lines) + "\n")
    return 0


# ---------------------------------------------------------------------- backup
async def backup_command(settings: Settings, path: str, out: TextIO, *, force: bool = False,
                         now: dt.datetime | None = None) -> int:
    """Write a consistent copy of the SQLite database to `path` while the service may run, and print it.

    `path` may be a directory: the copy is then `watchout-<UTC time>.db` in it. The copy is written to
    a temporary file next to it (mode 0600), then renamed into place, so `path` never holds part of a
    copy. Raises UsageError (nothing to copy, or where not to write) and StoreUnavailable.
    """
    if settings.mongo_url:
        raise UsageError("the data is in MongoDB (mongo_url), not in a SQLite file: back it up with mongodump")
    missing = missing_database(settings)
    if missing is not None:
        raise UsageError(missing)
    source = Path(settings.database_path).absolute()
    target = backup_target(source, path, force=force, now=now or dt.datetime.now(UTC))
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    store = open_store(settings)
    assert isinstance(store, SQLiteStore)  # mongo_url is refused above
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        os.fchmod(descriptor, 0o600)  # whatever the umask: the copy holds alerts and their snapshots
        os.close(descriptor)
        try:
            await store.start(settings.alert_retention_d)
            counts = await store.backup(str(temporary))
        finally:
            store.close()
        _sync(temporary)
        if target.exists() and not force:  # made meanwhile
            raise UsageError(f"{target} exists; pass --force to replace it")
        os.replace(temporary, target)
        _sync(target.parent)
    except OSError as exc:
        raise StoreUnavailable(f"could not write {target}: {exc.strerror or exc}") from None
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)
    out.write(f"Wrote {target} ({target.stat().st_size} bytes), a copy of {source} with "
              f"{counts['streams']} stream(s), {counts['alerts']} alert(s), {counts['snapshots']} snapshot(s).\n")
    return 0


def backup_target(source: Path, path: str, *, force: bool, now: dt.datetime) -> Path:
    """Where `watchout backup PATH` writes; raises UsageError when it must not."""
    if path.endswith(os.sep) and not Path(path).is_dir():  # meant as a directory: never a file of its name
        raise UsageError(f"{Path(path).absolute()} does not exist or is not a directory")
    target = Path(path)
    if target.is_dir():
        target = target / f"watchout-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}.db"
    target = target.absolute()
    if not target.parent.is_dir():
        raise UsageError(f"{target.parent} does not exist or is not a directory")
    live = {Path(f"{source}{suffix}").resolve() for suffix in ("", "-wal", "-shm", "-journal")}
    if target.resolve() in live:
        raise UsageError(f"{target} is the live database or one of its journal files: write the copy elsewhere")
    if target.is_dir():
        raise UsageError(f"{target} is a directory")
    if (target.exists() or target.is_symlink()) and not force:
        raise UsageError(f"{target} exists; pass --force to replace it")
    return target


def _sync(path: Path) -> None:
    """fsync a file or directory, so that the copy and its name survive a power cut."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
