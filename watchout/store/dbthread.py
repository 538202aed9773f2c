"""SQLite off the event loop: a writer thread that commits each loop turn's writes in one transaction,
and a reader thread with a connection of its own.

A write's future resolves only after its transaction has committed, so a caller that answers a
client after `await write(...)` never answers for data a crash could take back. Each write runs
inside a savepoint: one that raises is undone alone, and the others of its transaction still
commit. Reads see every write whose future has resolved (WAL: a reader never waits for the writer).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("watchout.store")
T = TypeVar("T")
Work = Callable[[sqlite3.Connection], Any]
_Job = tuple[Work, "asyncio.Future[Any]"]
_Result = tuple["asyncio.Future[Any]", Any, BaseException | None]
_STOP: list[_Job] = []  # the sentinel batch


class DatabaseThread:
    """One connection, one thread, a queue of batches; `connect()` opens the connection on the thread first."""

    def __init__(self, name: str, connect: Callable[[], sqlite3.Connection], *, transactions: bool) -> None:
        self._connect = connect
        self._transactions = transactions
        self._queue: queue.SimpleQueue[list[_Job]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Open the connection on the thread; raises what connecting raised."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread.start()
        await self._ready

    def submit(self, batch: list[_Job]) -> None:
        self._queue.put(batch)

    def stop(self) -> None:
        """Finish the queued work, close the connection and end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        assert self._loop is not None and self._ready is not None
        try:
            connection = self._connect()
        except BaseException as exc:  # reported to start(), which raises it
            self._loop.call_soon_threadsafe(_settle, self._ready, None, exc)
            return
        self._loop.call_soon_threadsafe(_settle, self._ready, None, None)
        try:
            while True:
                batch = self._queue.get()
                stopping = batch is _STOP
                while not stopping:  # group commit: take every batch queued meanwhile
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stopping = True
                    else:
                        batch = batch + more
                if batch and batch is not _STOP:
                    results = self._transaction(connection, batch) if self._transactions else _each(connection, batch)
                    try:
                        self._loop.call_soon_threadsafe(_settle_all, results)
                    except RuntimeError:  # the loop is closed: nobody is waiting any more
                        log.warning("%s: event loop closed with store calls pending", self._thread.name)
                        break
                if stopping:
                    break
        finally:
            connection.close()

    @staticmethod
    def _transaction(connection: sqlite3.Connection, batch: list[_Job]) -> list[_Result]:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(future, None, exc) for _, future in batch]
        results: list[_Result] = []
        for work, future in batch:
            try:
                connection.execute("SAVEPOINT work")
                value = work(connection)
                connection.execute("RELEASE work")
            except Exception as exc:
                if not _undo_savepoint(connection):
                    # SQLite rolled the whole transaction back (disk full, I/O error): nothing of this batch
                    # is kept, and every caller hears the cause
                    return [(f, None, exc) for _, f in batch]
                results.append((future, None, exc))
            else:
                results.append((future, value, None))
        try:
            connection.execute("COMMIT")
        except sqlite3.Error as exc:  # nothing of this transaction was kept: every caller hears so
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            return [(future, None, exc) for _, future in batch]
        return results


def _undo_savepoint(connection: sqlite3.Connection) -> bool:
    """Undo the failed write alone; False when the whole transaction is gone (rolled back by SQLite)."""
    if not connection.in_transaction:
        return False
    try:
        connection.execute("ROLLBACK TO work")
        connection.execute("RELEASE work")
    except sqlite3.Error:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        return False
    return True


def _each(connection: sqlite3.Connection, batch: list[_Job]) -> list[_Result]:
    results: list[_Result] = []
    for work, future in batch:
        try:
            results.append((future, work(connection), None))
        except Exception as exc:
            results.append((future, None, exc))
        finally:
            if connection.in_transaction:  # a read that began one and failed midway
                connection.execute("ROLLBACK")
    return results


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _settle_all(results: list[_Result]) -> None:
    for future, result, exc in results:
        _settle(future, result, exc)


class Database:
    """The writer thread, and for a file the reader and checkpointer threads, used from one event loop.

    `write(work)` joins the writes of the current loop turn; they are handed to the writer as one batch
    at the start of the next turn and committed together. `read(work)` runs on the reader's connection
    (on the writer's, for an in-memory database, which a second connection cannot see).

    With a checkpointer, the writer's connection must not checkpoint by itself (wal_autocheckpoint 0):
    CHECKPOINT_AFTER_S after a write, the checkpointer copies the WAL into the database file on its own
    connection, so no COMMIT ever waits for a checkpoint (they took ~100 ms during a large prune).
    """

    CHECKPOINT_AFTER_S = 1.0

    def __init__(self, connect_writer: Callable[[], sqlite3.Connection],
                 connect_reader: Callable[[], sqlite3.Connection] | None = None,
                 connect_checkpointer: Callable[[], sqlite3.Connection] | None = None) -> None:
        self._writer = DatabaseThread("watchout-sqlite-writer", connect_writer, transactions=True)
        self._reader = DatabaseThread("watchout-sqlite-reader", connect_reader, transactions=False) \
            if connect_reader is not None else None
        self._checkpointer = DatabaseThread("watchout-sqlite-checkpoint", connect_checkpointer, transactions=False) \
            if connect_checkpointer is not None else None
        self._pending: list[_Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkpoint_due: asyncio.TimerHandle | None = None
        self._checkpointing: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._writer.start()  # the writer creates or migrates the schema first
        started = [self._writer]
        try:
            for thread in (self._reader, self._checkpointer):
                if thread is not None:
                    await thread.start()
                    started.append(thread)
        except BaseException:
            for thread in started:
                thread.stop()
            raise

    def write(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = self._loop
        assert loop is not None, "Database.start() first"
        future: asyncio.Future[T] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((work, future))
        return future

    def read(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._reader is None:
            return self.write(work)
        assert self._loop is not None, "Database.start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._reader.submit([(work, future)])
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._writer.submit(batch)
        if self._checkpointer is not None and self._checkpoint_due is None and self._loop is not None:
            self._checkpoint_due = self._loop.call_later(self.CHECKPOINT_AFTER_S, self._checkpoint)

    def _checkpoint(self) -> None:
        self._checkpoint_due = None
        if self._checkpointer is None or self._loop is None:
            return
        if self._checkpointing is not None and not self._checkpointing.done():  # the last one is still going
            self._checkpoint_due = self._loop.call_later(self.CHECKPOINT_AFTER_S, self._checkpoint)
            return
        self._checkpointing = self._loop.create_future()
        self._checkpointing.add_done_callback(_checkpointed)
        self._checkpointer.submit([(_passive_checkpoint, self._checkpointing)])

    def close(self) -> None:
        if self._pending:
            self._flush()
        if self._checkpoint_due is not None:
            self._checkpoint_due.cancel()
            self._checkpoint_due = None
        self._writer.stop()  # the last connection to close checkpoints what is left
        for thread in (self._reader, self._checkpointer):
            if thread is not None:
                thread.stop()


def _passive_checkpoint(connection: sqlite3.Connection) -> Any:
    """Copy what it can of the WAL into the database without waiting for readers or the writer."""
    return connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


def _checkpointed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("WAL checkpoint failed: %s", future.exception())
