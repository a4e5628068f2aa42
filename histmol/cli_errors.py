"""Expected failures reach a user as one or two lines, never as a traceback.

The `histmol` app is a `GuardedTyper`: whatever a command raises is turned into a message that
names the thing and what to do (bad input, busy machine, unreachable or slow Prefect server, disk
full, permission denied, interrupt). `histmol --debug ...` or HISTMOL_DEBUG=1 re-raises instead,
so the traceback is one flag away. Unknown exceptions are bugs: they get one line too, plus the
hint to re-run with --debug and report it.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import typer

__all__ = ["DEBUG_ENV", "GuardedTyper", "debug_enabled", "describe_failure"]

DEBUG_ENV = "HISTMOL_DEBUG"
INTERRUPTED = 130
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def debug_enabled(argv: list[str] | None = None) -> bool:
    """True when HISTMOL_DEBUG is set to a true value or `--debug` is on the command line."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts, outermost first (a wrapped cause is still found)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _os_error(err: OSError) -> str:
    target = " ".join(str(p) for p in (err.filename, err.filename2) if p) or "a file"
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {target}: free space or write elsewhere"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {target}: free space or write elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {target}: check its owner and mode, or choose another path"
    if err.errno == errno.EROFS:
        return f"read-only file system: {target}: write somewhere else"
    if err.errno == errno.ENOENT:
        return f"not found: {target}"
    reason = err.strerror or str(err)
    return f"{reason}: {target}"


def describe_failure(exc: BaseException) -> str | None:
    """One or two lines for an expected failure; None for what is not expected (a bug)."""
    from histmol.errors import HistmolError

    chain = _chain(exc)
    for item in chain:
        if isinstance(item, HistmolError):
            return str(item)
    for item in chain:
        text = str(item)
        name = type(item).__name__
        module = type(item).__module__
        if "ephemeral Prefect API server" in text or (
            module.startswith("prefect") and "Timeout" in name
        ):
            return (
                "the local Prefect server did not start in time (a busy machine?).\n"
                f"Re-run, or give it longer: export {STARTUP_TIMEOUT_ENV}=180 "
                "(or point PREFECT_API_URL at a running server)."
            )
        if module.startswith(("httpx", "httpcore")) and ("Connect" in name or "Timeout" in name):
            url = os.environ.get("PREFECT_API_URL", "the Prefect API")
            return (
                f"cannot reach {url} ({name}: {text}).\n"
                "Start that server, or unset PREFECT_API_URL to run without one."
            )
    for item in chain:
        if isinstance(item, OSError) and item.errno is not None:
            return _os_error(item)
        if isinstance(item, MemoryError):
            return "out of memory: build fewer sections at once (--max-parallel) or use more RAM"
    return None


def _report(exc: BaseException) -> int:
    message = describe_failure(exc)
    if message is None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        message = (
            f"unexpected {type(exc).__name__}: {first}\n"
            "This is a histmol bug: re-run with --debug (or HISTMOL_DEBUG=1) for the traceback "
            "and report it."
        )
    head, *rest = message.splitlines()
    print(f"error: {head}", file=sys.stderr)
    for line in rest:
        print(f"  {line}", file=sys.stderr)
    return 1


class GuardedTyper(typer.Typer):
    """A Typer app whose run turns expected failures into short messages (see module doc)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the app; on failure print one or two lines and exit 1 (130 when interrupted)."""
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as stop:
            if stop.code == INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130)
                print(
                    "interrupted: nothing half-written is kept; run the same command again to "
                    "resume (committed sections are skipped)",
                    file=sys.stderr,
                )
            raise
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - the one place every failure is turned into text
            if debug_enabled():
                raise
            sys.exit(_report(exc))
