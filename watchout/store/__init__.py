"""The store: one interface (base.Store), two implementations: SQLite (embedded default) and MongoDB (several nodes)."""
from __future__ import annotations

from watchout.settings import Settings
from watchout.store.base import AlertFilter, Store, new_alert_id, new_epoch, utcnow

__all__ = ["AlertFilter", "Store", "new_alert_id", "new_epoch", "open_store", "utcnow"]


def open_store(settings: Settings) -> Store:
    """The configured store, not yet started (`await store.start(...)` inside the running loop): MongoDB
    when mongo_url is set, else the SQLite database under data_dir."""
    if settings.mongo_url:
        from watchout.store.mongo import MongoStore  # motor is imported only when MongoDB is used
        return MongoStore.connect(settings.mongo_url, settings.mongo_db)
    from watchout.store.sqlite import SQLiteStore
    return SQLiteStore(settings.database_path, synchronous=settings.sqlite_synchronous)
