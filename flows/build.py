"""The Prefect flow behind `histmol build` and `histmol demo`: build sections into one corpus.

Thin on purpose (STYLE.md): the task calls `histmol.build.build_section`; the flow passes
parameters. It runs in-process on Prefect's ephemeral API, so no server has to be started.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from histmol.build import BuildResult, SectionRequest, build_section
from histmol.config import BuildConfig


def retry_on_io_error(task_: object, task_run: object, state: State) -> bool:
    """Retry only transient I/O failures; a bad bundle stays bad however often it is read."""
    try:
        state.result()
    except (TimeoutError, ConnectionError, BlockingIOError, InterruptedError):
        return True
    except Exception:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(
    name="build-section",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io_error,
    cache_policy=NO_CACHE,
    task_run_name="build-{request.platform}",
)
def build_section_task(
    request: SectionRequest, out: str, config: BuildConfig, force: bool, threads: int
) -> BuildResult:
    """Build one section (read, register, tile, write, commit)."""
    return build_section(request, Path(out), config, force=force, threads=threads)


@flow(name="build-sections", log_prints=False)
def build_sections(
    requests: list[SectionRequest],
    out: str,
    config: BuildConfig | None = None,
    force: bool = False,
    threads: int = 2,
) -> list[BuildResult]:
    """Build the given sections one after another into the corpus at `out`; first failure raises."""
    config = config or BuildConfig()
    return [build_section_task(request, out, config, force, threads) for request in requests]
