"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl from the server package, data in
a temporary directory, listening on 127.0.0.1 on a free port, password auth over TCP.

As root, the server runs as the ``postgres`` OS user (initdb refuses root). Where the server
binaries are missing the tests fail with the command that installs them: a skipped PostgreSQL
half of the matrix would look green and prove nothing.
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from service.jobs.worker import pid_alive

INSTALL_HINT = ("install the PostgreSQL server (Debian/Ubuntu: `make postgres`, which runs "
                "`apt-get install -y postgresql`), or point SDB_TEST_DATABASE_URL at a server where "
                "that user may CREATE DATABASE")


class PostgresMissing(RuntimeError):
    pass


def server_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<v>/bin`` (Debian's layout), else initdb on PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("/")[3])] or [0])
        return Path(newest).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PostgresMissing(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFIX = "sdb-pg-"
OWNER = "owner.pid"  # the pid of the test process that started the cluster


class Cluster:
    """``start()`` a cluster, ``database()`` a fresh empty database per test, ``stop()``."""

    USER = "sdb"

    def __init__(self, base: Path | None = None) -> None:
        """A new cluster in a fresh temporary directory, or (``base``) the one an earlier session left there."""
        self.bindir = server_bindir()
        self.password = secrets.token_hex(8)
        self.port = _free_port()
        fresh = base is None
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX)) if fresh else base
        self.data, self.sock, self.log = self.base / "data", self.base / "sock", self.base / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresMissing(f"no `postgres` OS user to run the server as: {INSTALL_HINT}") from None
            if fresh:
                os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 120) -> None:
        r = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if r.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stderr or r.stdout}\n{log}")

    def start(self) -> Cluster:
        self.reap_orphans()
        (self.base / OWNER).write_text(str(os.getpid()))
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres")
        # trust on the Unix socket (only the cluster's owner reaches it), a password over TCP,
        # which is how the tests (and the service) connect. No fsync: the data is thrown away.
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.USER, f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        pwfile.unlink()
        self.sock.mkdir()
        if self.as_user:
            shutil.chown(self.sock, "postgres")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again, after :meth:`pause`: its data as it was)."""
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.sock} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                  "-w", "-t", "60", "start")

    def pause(self) -> None:
        """Stop the server as a restart or a failover does (its clients' connections cut), keeping its data (a fast
        shutdown: with synchronous_commit off, an immediate one would lose the last commits)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def freeze(self, thaw: bool = False) -> None:
        """Stop (SIGSTOP) the server and its backends as a frozen host or a partition does: connections stay open
        and nothing answers; ``thaw`` continues them."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        pids = [postmaster]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == postmaster:  # its parent
                pids.append(int(stat.split("/")[2]))
        for pid in pids:
            os.kill(pid, signal.SIGCONT if thaw else signal.SIGSTOP)

    def reap_orphans(self) -> None:
        """Stop and delete the clusters of test sessions that were killed before their teardown
        (a SIGKILLed pytest never runs ``stop``): their server would otherwise run on forever."""
        for base in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
            owner = base / OWNER
            try:
                pid = int(owner.read_text())
            except (OSError, ValueError):
                continue  # being set up right now, or not ours
            if base == self.base or pid_alive(pid):
                continue
            try:
                Cluster(base).stop()
            except (RuntimeError, subprocess.TimeoutExpired):
                shutil.rmtree(base, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{self.USER}:{self.password}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class Databases:
    """Fresh databases on a server reached by ``admin_url``: one per test, dropped after it."""

    def __init__(self, admin_url: str):
        from sqlalchemy.engine import make_url

        self.admin = make_url(admin_url).set(drivername="postgresql+psycopg")

    def _execute(self, sql: str) -> None:
        import psycopg

        conninfo = self.admin.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql)

    def create(self) -> str:
        name = f"sdb_test_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}"')
        return self.admin.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        # FORCE: a worker the test killed may still hold a connection.
        self._execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
