"""Ship a protocol's fsspec options to Dask workers in memory (never as a task parameter).

Storage credentials must not reach Prefect's database, which stores flow parameters; a worker
plugin travels over Dask's own connections and only sets each worker's fsspec configuration,
which every file system of that protocol then applies (`fsspec.config.apply_config`).
"""

from __future__ import annotations

from typing import Any

import fsspec
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin


class FsspecConfig(WorkerPlugin):
    """Merge one protocol's options into the fsspec configuration of each worker."""

    name = "histmol-fsspec-config"

    def __init__(self, protocol: str, options: dict[str, Any]) -> None:
        self.protocol, self.options = protocol, options

    def setup(self, worker: object) -> None:
        """Run on each worker as it joins."""
        fsspec.config.conf[self.protocol] = {**fsspec.config.conf.get(self.protocol, {}),
                                             **self.options}


def ship_fsspec_config(client: Client, url: str) -> None:
    """Give the workers this process' fsspec options for the protocol of `url`, if it has any."""
    protocol = str(fsspec.core.split_protocol(url)[0])
    options = fsspec.config.conf.get(protocol)
    if options:
        client.register_plugin(FsspecConfig(protocol, dict(options)))
