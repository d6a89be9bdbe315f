"""Tracking settings: the track.mlflow URI checked (and made absolute), a URI shown without its password, and
the trackers' packages required; TrackingError for a folder or tracker that cannot be used."""

from __future__ import annotations

import importlib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..configio import ConfigError

DEFAULT_DB = "mlflow.db"
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class TrackingError(ValueError):
    """A folder that cannot be tracked, or a tracker that is not installed."""


def check_mlflow_uri(uri: str, key: str = "track.mlflow") -> str:
    """A valid track.mlflow value: 'default', or a tracking URI (sqlite:///relative made absolute)."""
    text = str(uri).strip()
    if text in ("default", "true"):
        return "default"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    base = scheme.split("+")[0]
    hint = ("use 'default' (sqlite:///<parent folder>/mlflow.db), sqlite:///PATH.db, http(s)://HOST:PORT "
            "(an MLflow server), postgresql://…, mysql://… or databricks")
    if not text:
        raise ConfigError(f"{key}: empty; {hint}")
    if scheme in ("", "file") or (len(scheme) == 1 and text[1:2] == ":"):  # a path (or C:\…)
        where = parts.path if scheme == "file" else text
        raise ConfigError(f"{key}: {text!r} is a file path; MLflow's file store is deprecated and not used here: "
                          f"write sqlite:///{Path(where).expanduser() / DEFAULT_DB} (a SQLite store) or 'default'")
    if base == "sqlite":
        path = text.split(":///", 1)[1] if ":///" in text else ""
        if not path or path == ":memory:":
            raise ConfigError(f"{key}: {text!r}: a SQLite store needs a file, as sqlite:///PATH.db "
                              "(relative to the current folder) or sqlite:////ABSOLUTE/PATH.db")
        return f"{scheme}:///{Path(path).expanduser().resolve()}"
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError(f"{key}: {text!r} names no host; e.g. http://127.0.0.1:5000")
        return text
    if base in SQL_SCHEMES or scheme in ("databricks", "databricks-uc", "uc"):
        return text
    raise ConfigError(f"{key}: unknown tracking URI scheme {scheme!r} in {text!r}; {hint}")


def shown(uri: str) -> str:
    """A URI without its password (kept out of tracking.json and messages)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def require(mlflow: bool = False, tensorboard: bool = False) -> None:
    """TrackingError naming the extra to install when a tracker's package is missing (or cannot be imported)."""
    for wanted, module, extra in ((mlflow, "mlflow", "mlflow"), (tensorboard, "tensorboard", "tensorboard")):
        if wanted:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise TrackingError(f"{module} cannot be imported ({e}): pip install 'cnnlab[{extra}]'") from None
