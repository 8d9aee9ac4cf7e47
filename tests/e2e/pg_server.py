"""A real PostgreSQL server for tests, started from the machine's binaries (Debian's
``postgresql`` package, which ``make venv`` installs) in a temporary folder on a free loopback
port, and removed afterwards.

PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user
(created by the Debian package) and its commands run through ``runuser``. Without the binaries
the tests that need the server are skipped with the reason; nothing is mocked.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

_ids = itertools.count(1)


def _bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres (the newest installed version)."""
    for exe in ("pg_config",):
        if shutil.which(exe):
            try:
                out = subprocess.run([exe, "--bindir"], capture_output=True, text=True,
                                     timeout=10, check=True).stdout.strip()
                if out and (Path(out) / "initdb").exists():
                    return Path(out)
            except (OSError, subprocess.SubprocessError):
                pass
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                   key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for c in reversed(cands):
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    w = shutil.which("initdb")
    if w:
        return Path(os.path.realpath(w)).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()`` initdb + pg_ctl start; ``new_database()`` a fresh database URL;
    ``stop()`` stops the server and removes its folder."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.dir: Path | None = None
        self.port = 0
        self._as: list[str] = []

    def unavailable(self) -> str | None:
        """Why the server cannot be started here, or None."""
        if self.bindir is None:
            return ("PostgreSQL server binaries not found (install Debian's 'postgresql' "
                    "package: make venv does)")
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run PostgreSQL"
            if shutil.which("runuser") is None:
                return "running as root and 'runuser' is missing"
        return None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qlm-pg-"))
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        r = self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres",
                      "-A", "trust", "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
        for _ in range(5):
            self.port = _free_port()
            opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                    "-c fsync=off -c max_connections=50")
            r = self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                          "-l", str(self.dir / "log"), "-w", "-t", "60", "start")
            if r.returncode == 0:
                return
        log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()} {log[-2000:]}")

    def new_database(self) -> str:
        """A new empty database; its URL (postgresql://, the store adds the driver)."""
        name = f"qlm_test_{os.getpid()}_{next(_ids)}"
        r = self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                      "-U", "postgres", name)
        if r.returncode != 0:
            raise RuntimeError(f"createdb failed: {r.stderr.strip()}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.dir is None:
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate",
                  "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
