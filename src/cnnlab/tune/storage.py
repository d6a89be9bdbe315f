"""Where a tune keeps its trials: Optuna storages by URL.

    journal:PATH                  the default (TUNE_DIR/optuna.journal): Optuna's journal file, an append-only
                                  log every worker of this machine can share (file locks), that survives a
                                  crash at any moment; Optuna advises it over SQLite for parallel workers
    postgresql://USER@HOST/DB     many processes on many machines share one tune (psycopg2; `pip install
                                  cnnlab[tune]`); mysql:// works the same through SQLAlchemy
    sqlite:///PATH                accepted for one process at a time (SQLite locks the whole file)
"""

from __future__ import annotations

import re
from pathlib import Path

JOURNAL = "journal:"
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")


class StorageError(ValueError):
    """A storage URL that cannot be used; the message names it (password hidden) and the choices."""


def shown(url: str) -> str:
    """The URL with any password hidden, for messages and files."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def journal_url(path: str | Path) -> str:
    return JOURNAL + str(Path(path).resolve())


def check_url(url: str) -> str:
    """The storage URL, checked for its form (nothing is opened); raises StorageError."""
    if not isinstance(url, str) or not url:
        raise StorageError(f"--storage: expected a URL; got {url!r}")
    if url.startswith(JOURNAL):
        if not url[len(JOURNAL):]:
            raise StorageError("--storage journal:PATH needs a file path")
        return url
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise StorageError(f"--storage {shown(url)!r}: use journal:PATH (a file, the default), "
                           "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (many machines) or sqlite:///PATH")
    return url


def open_storage(url: str):
    """An Optuna storage for the URL. Connection problems raise StorageError naming the URL."""
    import optuna

    url = check_url(url)
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    import time

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except ModuleNotFoundError as e:
            raise StorageError(f"--storage {shown(url)}: the database driver is missing ({e.name}); "
                               "install it with: pip install 'cnnlab[tune]'") from None
        except Exception as e:  # sqlalchemy.exc.OperationalError and kin: say which server, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            # workers started together race to create Optuna's tables: the loser tries again
            if attempt < 5 and any(w in first for w in ("duplicate key", "already exists", "UniqueViolation")):
                time.sleep(0.3 * (attempt + 1))
                continue
            raise StorageError(f"--storage {shown(url)}: cannot open it: {first}") from None
