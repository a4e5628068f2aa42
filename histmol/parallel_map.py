"""Run independent jobs in this process, in a process pool, or on an existing Dask cluster.

For read-only corpus work that splits into independent pieces (e.g. ``histmol validate``'s
per-section checks): ``workers == 1`` and no address runs in order here; ``workers > 1`` uses a
``concurrent.futures.ProcessPoolExecutor`` (spawned processes, so no state leaks in); a
``dask_address`` (``tcp://host:8786``, a dask-jobqueue or Kubernetes scheduler) submits the jobs
there with ``distributed.Client.map``, and the files must be readable at the same paths on the
workers (a shared file system). Results come back in the order of `items`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from histmol.errors import ConfigError

T = TypeVar("T")


def parallel_map(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    *,
    workers: int = 1,
    dask_address: str | None = None,
) -> list[T]:
    """``[fn(item) for item in items]``, spread over `workers` processes or a Dask cluster.

    `fn` must be a module-level function and items and results picklable.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    if dask_address is not None:
        from distributed import Client

        with Client(dask_address) as client:
            futures = client.map(fn, list(items), pure=False)
            return client.gather(futures)
    if workers == 1 or len(items) < 2:
        return [fn(item) for item in items]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
        return list(pool.map(fn, items, chunksize=1))
