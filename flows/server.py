"""A private Prefect API server for `histmol ingest`/`serve` that never outlives its process.

Why not Prefect's own temporary server: it starts with a 20 s default limit (too short on a busy
2-core machine), keeps its SQLite database in ``~/.prefect`` (two commands at once then share
and lock one database) and survives a ``kill -9`` of the process that started it.

`prefect_api()` gives this process an API for the duration of a block:

- ``PREFECT_API_URL`` set (environment or Prefect profile): that server is used, nothing starts.
- otherwise a server is started here: ``uvicorn`` on a loopback socket bound by this process
  (no port race), with its own ``PREFECT_HOME`` (a fresh folder under
  ``<temp dir>/histmol-prefect/``, removed afterwards; a user-set ``PREFECT_HOME`` is kept), as a
  child that the kernel kills when this process dies (``PR_SET_PDEATHSIG``, Linux), however it
  dies. Folders left by killed processes are removed by the next start (owner-locked, as
  staging folders). It must answer within ``HISTMOL_PREFECT_START_TIMEOUT`` seconds
  (default 300); the error says what to set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histmol.errors import ConfigError
from histmol.shards.atomic import remove_path
from histmol.shards.staging import (
    LOCK_SUFFIX,
    STAGING_PREFIX,
    create_staging,
    release_staging,
    remove_if_stale,
)

TIMEOUT_ENV = "HISTMOL_PREFECT_START_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
HOMES_DIR = "histmol-prefect"
DEFAULT_HOME_ENV = "HISTMOL_DEFAULT_PREFECT_HOME"  # PREFECT_HOME as histmol.cli defaulted it
PR_SET_PDEATHSIG = 1


def start_timeout() -> float:
    """Seconds a private server may take to answer (``$HISTMOL_PREFECT_START_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0 seconds, got {value:g}")
    return value


def _die_with_parent(parent: int) -> None:
    """In the child before exec: ask the kernel for SIGKILL when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@contextmanager
def private_home() -> Iterator[Path]:
    """A fresh owner-locked folder under ``<temp dir>/histmol-prefect/``, removed when done."""
    parent = Path(tempfile.gettempdir()) / HOMES_DIR
    parent.mkdir(exist_ok=True)
    for entry in parent.iterdir():  # homes (or lone lock files) of killed processes
        if entry.name.startswith(STAGING_PREFIX):
            remove_if_stale(entry.with_name(entry.name.removesuffix(LOCK_SUFFIX)))
    folder, fd = create_staging(parent, "home")
    try:
        yield folder
    finally:
        remove_path(folder)
        release_staging(folder, fd)


def _wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ConfigError(f"the Prefect server exited with code {server.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            raise ConfigError(
                f"the Prefect server did not answer within {timeout:g} s (a busy machine?): "
                f"set {TIMEOUT_ENV} to more seconds, or start one yourself (`prefect server "
                "start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
        time.sleep(0.25)


def start_server(home: Path, *, ephemeral: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Prefect API server on a loopback socket bound here; return it and its API URL.

    `ephemeral`: without Prefect's background services (scheduling, late runs), which an
    in-process ingest does not need; `histmol serve` wants them.
    """
    import prefect

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if ephemeral:
        env["PREFECT__SERVER_EPHEMERAL"] = "1"
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parents[1]),
               "--factory", "prefect.server.api.server:create_app", "--fd", str(sock.fileno()),
               "--log-level", "error", "--lifespan", "on"]
    parent = os.getpid()
    log = home / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
                                  start_new_session=True,
                                  preexec_fn=lambda: _die_with_parent(parent))
    sock.close()
    try:
        _wait_healthy(url, server, log, start_timeout())
    except BaseException:
        stop_server(server)
        raise
    return server, url


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    server.wait()


@contextmanager
def prefect_api(*, ephemeral: bool = True) -> Iterator[str | None]:
    """Run the block against the user's Prefect API, or a private server started here.

    Yields the private server's API URL, or None when the user's API is used.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        get_current_settings,
        temporary_settings,
    )

    if get_current_settings().api.url:
        yield None
        return
    with _home() as home:
        server, url = start_server(home, ephemeral=ephemeral)
        try:
            with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: home}):
                yield url
        finally:
            _drain_services()
            stop_server(server)


@contextmanager
def _home() -> Iterator[Path]:
    """The user's ``PREFECT_HOME`` if they set one, else a private one.

    A home the CLI defaulted (``$DEFAULT_HOME_ENV``, histmol's state folder for Prefect's client
    files) is not the user's: each server still gets its own database.
    """
    home = os.environ.get("PREFECT_HOME")
    if home and home != os.environ.get(DEFAULT_HOME_ENV):
        yield Path(home).expanduser()
        return
    with private_home() as home:
        yield home


def _drain_services() -> None:
    """Send queued logs and events before the server stops (else Prefect retries at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=30, at_exit=False)
        except Exception:  # noqa: BLE001, S110 - nothing queued, or the services never ran
            pass
