"""A throwaway PostgreSQL server for tests (Optuna's RDB storage shared by several processes).

    with postgres_server() as url:      # postgresql+psycopg2://postgres@127.0.0.1:PORT/cnnlab
        ...

or `server = start_postgres(); ...; server.stop()`.

What it does: finds `initdb` / `pg_ctl` (the newest /usr/lib/postgresql/*/bin, else PATH), runs
initdb into a fresh `tempfile.mkdtemp()` folder, lets the server listen on 127.0.0.1 only (a free
port; its Unix socket inside that folder; trust auth for the socket and 127.0.0.1/32 only, no
password; fsync off), starts it with `pg_ctl -w`, creates the database, and at the end stops it
(`pg_ctl stop -m fast`, then SIGQUIT / SIGKILL if that fails) and removes the folder.

PostgreSQL refuses to run as root: when euid is 0 every server command (initdb, pg_ctl) runs as
the `postgres` system user (created by Debian's `postgresql` package) through `runuser -u postgres
--` (or `setpriv`), in a folder chowned to that user. The folder is made under the system temp dir
(/tmp, 1777), never under pytest's tmp_path, which is 0700 root and unreadable to `postgres`.

Standard library only, so that conftest.py can import it without psycopg2 / SQLAlchemy.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"  # the system user the Debian package creates; also the database superuser
_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_TOOLS = ("initdb", "pg_ctl", "createdb")


class PostgresError(RuntimeError):
    """A step of starting / stopping the test server failed (the message says which, and why)."""


class PostgresMissing(PostgresError):
    """PostgreSQL (or the `postgres` user it must run as under root) is not on this machine."""


def find_bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and createdb: the newest /usr/lib/postgresql/<ver>/bin
    (Debian keeps them off PATH), else the folder of `initdb` on PATH; None if there is none."""
    def version(d: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(d).parent.name)) or (0,)

    for d in sorted(glob.glob(_BIN_GLOB), key=version, reverse=True):
        if all(os.access(Path(d, t), os.X_OK) for t in _TOOLS):
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb and all(shutil.which(t) for t in _TOOLS):
        return Path(initdb).resolve().parent
    return None


def missing_reason() -> str | None:
    """Why this machine cannot run the server (None when it can): what a fixture skips on."""
    if find_bin_dir() is None:
        return (f"PostgreSQL server binaries not found (no {_BIN_GLOB}/initdb, none on PATH): "
                "apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root, and there is no {SERVER_USER!r} system user to run PostgreSQL as"
        if not (shutil.which("runuser") or shutil.which("setpriv")):
            return "running as root, and neither runuser nor setpriv is available to drop privileges"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return f"(no server log: {e})"
    return "\n".join(text[-lines:]) or "(server log is empty)"


class PostgresServer:
    """One running test server; `url` is its SQLAlchemy URL, `stop()` (idempotent) ends it."""

    def __init__(self, parent: str | os.PathLike | None = None, dbname: str = "cnnlab",
                 start_timeout: float = 60):
        why = missing_reason()
        if why:
            raise PostgresMissing(why)
        self.bin = find_bin_dir()
        self.dbname = dbname
        self.port: int | None = None
        self._stopped = False
        self.as_root = os.geteuid() == 0
        self._prefix: list[str] = []
        if self.as_root:
            pw = pwd.getpwnam(SERVER_USER)
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            if shutil.which("runuser"):
                self._prefix = [shutil.which("runuser"), "-u", SERVER_USER, "--"]
            else:
                self._prefix = [shutil.which("setpriv"), f"--reuid={pw.pw_uid}",
                                f"--regid={pw.pw_gid}", "--init-groups"]
        self.base = Path(tempfile.mkdtemp(prefix="cnnlab-pg-", dir=parent))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        # Keep the server's environment free of the caller's PG* settings and locale oddities.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._env.update(LC_ALL="C", LANG="C")
        atexit.register(self.stop)
        try:
            self._init()
            self._start(start_timeout)
            self._createdb()
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------ steps

    def _run(self, what: str, args: list[str], as_server: bool, timeout: float = 120,
             log: bool = False) -> subprocess.CompletedProcess:
        cmd = (self._prefix if as_server else []) + args
        try:
            p = subprocess.run(cmd, cwd=self.base, env=self._env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise PostgresError(self._message(f"{what} timed out after {timeout:.0f} s", cmd, out, log)) from None
        except OSError as e:
            raise PostgresError(self._message(f"{what} could not be run: {e}", cmd, "", log)) from None
        if p.returncode != 0:
            raise PostgresError(self._message(f"{what} failed (exit {p.returncode})", cmd, p.stdout, log))
        return p

    def _message(self, head: str, cmd: list[str], out: str, log: bool) -> str:
        msg = [f"PostgreSQL test server: {head}", f"  command: {' '.join(map(str, cmd))}"]
        if out.strip():
            msg += ["  output:", *("    " + ln for ln in out.strip().splitlines()[-30:])]
        if log:
            msg += [f"  server log ({self.log}), last lines:",
                    *("    " + ln for ln in _tail(self.log).splitlines())]
        return "\n".join(msg)

    def _init(self) -> None:
        if self.as_root:  # mkdtemp made it 0700 root: hand it to the server's user
            os.chown(self.base, self._uid, self._gid)
            probe = [*self._prefix, "test", "-w", str(self.base)]
            if subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
                raise PostgresError(
                    f"PostgreSQL test server: the {SERVER_USER!r} user cannot write to {self.base} "
                    "(a folder above it is not searchable to that user; set TMPDIR or pass a "
                    "parent folder such as /tmp)")
        self._run("initdb", [str(self.bin / "initdb"), "-D", str(self.data), "-U", SERVER_USER,
                             "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
                  as_server=True)
        # Trust, without a password, only over our own socket and 127.0.0.1 (no ::1, nothing else).
        (self.data / "pg_hba.conf").write_text(
            "# cnnlab test server: trust for the local socket and 127.0.0.1 only\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n", encoding="utf-8")
        if len(str(self.base)) > 80:  # sun_path is 108 bytes: .../.s.PGSQL.PORT must fit
            raise PostgresError(f"PostgreSQL test server: socket folder path too long: {self.base}")

    def _configure(self, port: int) -> None:
        conf = self.data / "postgresql.auto.conf"  # read after postgresql.conf; rewritten per try
        conf.write_text(
            "# cnnlab test server (written by tests/pgserver.py)\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{self.base}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "max_connections = 40\n"
            "shared_buffers = 32MB\n"
            "logging_collector = off\n", encoding="utf-8")
        if self.as_root:
            os.chown(conf, self._uid, self._gid)

    def _start(self, timeout: float) -> None:
        # The free port can be taken between our probe and the server's bind: retry on a new one.
        for attempt in range(3):
            port = _free_port()
            self._configure(port)
            try:
                self._run("pg_ctl start", [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                                           str(self.log), "-w", "-t", str(int(timeout)), "start"],
                          as_server=True, timeout=timeout + 30, log=True)
            except PostgresError:
                if attempt == 2 or "already in use" not in _tail(self.log, 10):
                    raise
                continue
            self.port = port
            return

    def _createdb(self) -> None:
        self._run(f"createdb {self.dbname}",
                  [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                   "-U", SERVER_USER, self.dbname], as_server=False, timeout=60, log=True)

    # ------------------------------------------------------------------ public

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{SERVER_USER}@127.0.0.1:{self.port}/{self.dbname}"

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut) and remove its folder."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        pidfile = self.data / "postmaster.pid"
        try:
            if pidfile.exists():
                try:
                    self._run("pg_ctl stop", [str(self.bin / "pg_ctl"), "-D", str(self.data),
                                              "-m", "fast", "-w", "-t", "30", "stop"],
                              as_server=True, timeout=60, log=True)
                except PostgresError:
                    self._kill(pidfile)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _kill(self, pidfile: Path) -> None:
        """Last resort when pg_ctl cannot stop it: immediate shutdown, then SIGKILL."""
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        for sig, wait in ((signal.SIGQUIT, 10), (signal.SIGKILL, 5)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)


def start_postgres(parent: str | os.PathLike | None = None, dbname: str = "cnnlab") -> PostgresServer:
    """Start a server (see the module docstring); `parent` is where its folder goes (default:
    the system temp dir). Raises PostgresMissing / PostgresError with the reason and log tail."""
    return PostgresServer(parent, dbname)


@contextlib.contextmanager
def postgres_server(parent: str | os.PathLike | None = None, dbname: str = "cnnlab"):
    """Yield the SQLAlchemy URL of a fresh server; stopped and deleted on exit, even on errors."""
    server = start_postgres(parent, dbname)
    try:
        yield server.url
    finally:
        server.stop()
