"""PairDataset: a deterministic, resumable, elastic, mixable IterableDataset over histmol corpora.

Order: `histmol.data.order` (a pure function of seed, epoch, the manifests and the options),
split over ranks and workers by `histmol.data.partition`, resumed from `histmol.data.state`.
Reading: parts are opened lazily in the process that reads them (`histmol.data.fetch`,
`histmol.data.part`), at most `max_open_parts` at a time. Processes share nothing but files in
`cache_dir`: image check markers, fetched remote parts and decoded units
(`histmol.data.units_cache`, at most `units_cache_bytes`; 0 decodes in every process instead).
Design anchors: mosaicml/streaming's StreamingDataset (py1b shuffle, elastic resumption,
https://docs.mosaicml.com/projects/streaming/en/stable/), torchdata's StatefulDataLoader
(https://pytorch.org/data/beta/torchdata.stateful_dataloader.html).

Epochs: iteration yields epoch `epoch` (`set_epoch`, like DistributedSampler.set_epoch). A pass
that runs to the end in the same process (no workers, or persistent workers) moves that
process' copy on to the next epoch; with non-persistent workers call ``set_epoch`` each epoch.
The DataLoader's batch size must equal `batch_size`: it defines the partition over ranks.

Batched mode (``batched=True``): the dataset yields whole batches, exactly those the DataLoader
would have collated with `pair_collate`, so use ``DataLoader(ds, batch_size=None, ...)``. With
uint8 patches and no `patch_transform`, workers then decode JPEGs, and build the batch's other
arrays, straight into reusable shared memory (`histmol.data.batching`, `histmol.data.shm`): the
fast path for training. Inside a worker those arrays are `LeasedArray` objects (``.tensor()``
gives a tensor there); they arrive in the main process as tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from histmol.data.batching import iter_batches
from histmol.data.collate import to_float_chw
from histmol.data.fetch import VERIFY_MODES, PartFetcher, Verify
from histmol.data.genes import resolve_genes
from histmol.data.mixing import MIX_KEYS, assign_groups
from histmol.data.order import OrderSpec, epoch_order
from histmol.data.part import OpenPart, PartUnits, decode_units
from histmol.data.partition import assigned
from histmol.data.sections import live_section_facts
from histmol.data.shm import BufferPool
from histmol.data.source import PartRef, open_sources
from histmol.data.state import PARTITION_KEYS, STATE_FORMAT, STATE_VERSION, rank_progress
from histmol.data.units_cache import UnitsCache, entry_key
from histmol.errors import ConfigError, CorpusError

PatchFormat = Literal["uint8_hwc", "float_chw"]
PATCH_FORMATS = ("uint8_hwc", "float_chw")
ON_CORRUPT = ("raise", "skip")


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _section_filter(sections: Collection[str] | None,
                    sources: Sequence[Any]) -> frozenset[str] | None:
    """The sections to read (None: all); ConfigError naming any the corpora do not hold."""
    if sections is None:
        return None
    if isinstance(sections, str):
        raise ConfigError(f"sections must be a collection of section ids, got {sections!r}")
    wanted = frozenset(str(s) for s in sections)
    held = {sid for source in sources for sid in source.manifest.column("section_id").to_pylist()}
    missing = sorted(wanted - held)
    if missing:
        raise ConfigError(f"sections {missing[:5]} are not committed in "
                          f"{[s.url for s in sources]}")
    if not wanted:
        raise ConfigError("sections is empty: no pair to read")
    return wanted


class PairDataset(IterableDataset):
    """(patch, expression) pairs from one or more corpora; see the module docstring.

    Each sample is a dict: ``patch`` (uint8 (H, W, 3), or float32 (3, H, W) in [0, 1], then
    `patch_transform`), ``expression`` (float32 raw counts over `genes`: (n_units, G), or (G,)
    summed over the pair's units with ``aggregate_units``), ``positions`` ((n_units, 2) unit
    centres in patch px, x then y; absent when aggregated), ``n_units``, ``panel_mask`` (bool
    (G,): genes the section's assay measured), ``index`` (global sample id), ``part`` and
    ``pair_index`` (the part of the section and the pair in it, as stored), ``section_id``,
    ``platform``, ``tissue`` and ``corpus`` (index into `sources`). With ``batched=True`` it
    yields batches of `batch_size` samples laid out as `pair_collate` lays them out.
    `gene_space` ``"homolog"`` gives human and mouse one-to-one orthologs one column
    (`histmol.data.genes`).
    ``on_corrupt="raise"`` refuses a corrupt part, and at open a corpus whose tables its commit
    record (``commit.json``) does not accept; ``"skip"`` warns and leaves out that part or corpus.

    ``sections`` keeps only those section ids (a fold's training part, `histmol.split`): no
    other section's pair is ever read, and ``hvg:K`` ranks genes over those sections only.
    """

    def __init__(
        self,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        genes: str | Sequence[str] = "all",
        gene_space: str = "gene",
        seed: int = 0,
        batch_size: int = 1,
        batched: bool = False,
        shuffle: str = "block",
        block_size: int = 1 << 14,
        mix: Mapping[str, Mapping[str, float]] | None = None,
        epoch_size: int | None = None,
        patch_format: PatchFormat = "uint8_hwc",
        patch_transform: Callable[[Any], Any] | None = None,
        aggregate_units: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        on_corrupt: Literal["raise", "skip"] = "raise",
        verify: Verify = "sha256",
        cache_dir: str | os.PathLike[str] | None = None,
        max_open_parts: int = 64,
        units_cache_bytes: int = 4 << 30,
        storage_options: dict[str, Any] | None = None,
        sections: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = _positive("batch_size", batch_size)
        self.max_open_parts = _positive("max_open_parts", max_open_parts)
        if isinstance(units_cache_bytes, bool) or not isinstance(units_cache_bytes, int) or \
                units_cache_bytes < 0:
            raise ConfigError(f"units_cache_bytes must be an integer >= 0 (0: no cache), got "
                              f"{units_cache_bytes!r}")
        self.units_cache_bytes = units_cache_bytes
        for name, value, allowed in (("patch_format", patch_format, PATCH_FORMATS),
                                     ("on_corrupt", on_corrupt, ON_CORRUPT),
                                     ("verify", verify, VERIFY_MODES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither (torch.distributed)")
        if world_size is not None:
            _positive("world_size", world_size)
            if not isinstance(rank, int) or not 0 <= rank < world_size:
                raise ConfigError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        self.patch_format, self.patch_transform = patch_format, patch_transform
        self.aggregate_units, self.drop_last = bool(aggregate_units), bool(drop_last)
        self.batched = bool(batched)
        self.on_corrupt, self.verify = on_corrupt, verify
        self._rank, self._world_size = rank, world_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else (
            Path(tempfile.gettempdir()) / "histmol-cache")
        self.sources = open_sources(sources if isinstance(sources, str | os.PathLike)
                                    else list(sources), storage_options, on_corrupt=on_corrupt)
        self.section_filter = _section_filter(sections, self.sources)
        self.gene_set = resolve_genes(genes, self.sources, gene_space,
                                      sections=self.section_filter)
        self._setup_parts(mix, epoch_size, shuffle, block_size, seed)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, consumed), set by load_state_dict
        self._worker_state: dict[str, Any] | None = None  # a worker's own state (same layout)
        self._progress: dict[str, Any] | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._open: OrderedDict[int, OpenPart] = OrderedDict()
        self._bad: set[int] = set()
        self._fetcher: PartFetcher | None = None
        self._units_cache: UnitsCache | None = None
        self._pools: dict[str, BufferPool] | None = None  # a worker's shared batch buffers
        self.skipped_samples = 0

    # ------------------------------------------------------------------ set-up
    def _setup_parts(self, mix: Mapping[str, Mapping[str, float]] | None,
                     epoch_size: int | None, shuffle: str, block_size: int, seed: int) -> None:
        self.parts: list[PartRef] = [p for s in self.sources for p in s.parts()
                                     if self.section_filter is None
                                     or p.section_id in self.section_filter]
        if not self.parts:
            raise CorpusError(f"{[s.url for s in self.sources]}: no committed parts")
        facts = [live_section_facts(s) for s in self.sources]
        self._meta: list[tuple[str, str, str, int, np.ndarray]] = []
        masks: dict[tuple[int, int], np.ndarray] = {}  # one per distinct panel: shared
        for ref in self.parts:
            fact = facts[ref.corpus][ref.section_id]
            key = (ref.corpus, fact.panel_key)
            if key not in masks:
                masks[key] = self.gene_set.panel_mask(ref.corpus, fact.panel)
            self._meta.append((ref.section_id, fact.platform, fact.tissue, ref.corpus,
                               masks[key]))
        if mix is None:
            groups, weights = (0,) * len(self.parts), (1.0,)
        else:
            if not isinstance(mix, Mapping) or len(mix) != 1 or next(iter(mix)) not in MIX_KEYS:
                raise ConfigError(f"mix must be {{key: {{value: weight}}}} with one key of "
                                  f"{MIX_KEYS}, got {mix!r}")
            (key, weighting), = mix.items()
            if key == "tissue" and not all("tissue" in s.sections.column_names
                                           for s in self.sources):
                raise ConfigError("mix by 'tissue': a corpus' sections.parquet has no tissue")
            values = [self._mix_value(key, p, ref) for p, ref in enumerate(self.parts)]
            groups, weights = assign_groups(values, weighting, key)
        if epoch_size is not None:
            _positive("epoch_size", epoch_size)
        try:
            self.spec = OrderSpec(
                part_sizes=tuple(int(p.n_pairs) for p in self.parts), part_group=groups,
                weights=weights, epoch_size=epoch_size, shuffle=shuffle,
                block_size=_positive("block_size", block_size), seed=seed,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from error
        self.part_starts = self.spec.part_starts
        self.epoch_length = self.spec.epoch_length()
        identity: list[Any] = [
            [s.manifest_sha256 for s in self.sources], self.spec.part_group, self.spec.weights,
            self.spec.epoch_size, self.spec.shuffle, self.spec.block_size, self.spec.seed,
        ]
        if self.section_filter is not None:  # unfiltered: the same fingerprint as before
            identity.append(sorted(self.section_filter))
        self.fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()

    def _mix_value(self, key: str, part: int, ref: PartRef) -> str:
        section_id, platform, tissue, corpus, _ = self._meta[part]
        return {"platform": platform, "tissue": tissue, "section": section_id,
                "corpus": self.sources[corpus].url}[key]

    @property
    def genes(self) -> pd.DataFrame:
        """The emitted genes, in expression column order (gene_id, symbol, species)."""
        return self.gene_set.table()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_open=OrderedDict(), _fetcher=None, _units_cache=None, _order_cache=None,
                     _progress=None, _pools=None)
        return state

    # ------------------------------------------------------------------ epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch `epoch` next (a resume position loaded for it is kept)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def _layout(self) -> dict[str, Any]:
        if self._world_size is not None:
            rank, world = self._rank, self._world_size
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world = 0, 1
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return {"rank": rank, "world_size": world, "worker": worker, "num_workers": workers,
                "batch_size": self.batch_size, "drop_last": self.drop_last}

    def _plan(self) -> dict[str, Any]:
        """Where the next pass starts: epoch, start, position and the partition layout."""
        layout = self._layout()
        own = self._worker_state
        if own is not None and own["epoch"] == self.epoch:
            return {**layout, "epoch": own["epoch"], "start": own["start"],
                    "position": own["position"]}
        start = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        return {**layout, "epoch": self.epoch, "start": start, "position": 0}

    def state_dict(self) -> dict[str, Any]:
        """Return this process' position (see `histmol.data.state`): a few plain values."""
        progress = self._progress if self._progress is not None else self._plan()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint,
                "skipped": self.skipped_samples, **progress}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a PairDataset or StatefulDataLoader state.

        In the main process any world size and worker count may continue from it (elastic):
        call this before building the loader, and do not also pass the state to the loader.
        Inside a DataLoader worker (torchdata restoring its own state) the layout must match.
        """
        if get_worker_info() is not None:
            layout = self._layout()
            differing = [k for k in PARTITION_KEYS if state.get(k) != layout[k]]
            if differing or state.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"worker state differs in {differing or ['fingerprint']}: to resume on "
                    "another layout call PairDataset.load_state_dict(loader.state_dict()) in "
                    "the main process and build a fresh loader"
                )
            self.epoch = int(state["epoch"])
            self._worker_state = {k: int(state[k]) for k in ("epoch", "start", "position")}
            self.skipped_samples = int(state.get("skipped", 0))
            return
        epoch, done = rank_progress(state, self.epoch_length, self.fingerprint)
        self.epoch, self._resume, self._worker_state = epoch, (epoch, done), None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.spec, epoch))
        return self._order_cache[1]

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._plan()
        self._worker_state = None
        order = self._order(plan["epoch"])
        start = plan["start"]
        positions = assigned(
            len(order) - start, batch_size=plan["batch_size"], world_size=plan["world_size"],
            rank=plan["rank"], num_workers=plan["num_workers"], worker=plan["worker"],
            drop_last=plan["drop_last"],
        )
        self._progress = progress = dict(plan)
        indices = (int(order[start + position]) for position in positions[plan["position"]:])
        if self.batched:
            yield from iter_batches(self, indices, progress)
        else:
            for index in indices:
                sample = self._sample(index)
                progress["position"] += 1  # before the yield: a snapshot taken now counts it
                if sample is None:
                    self.skipped_samples += 1
                else:
                    yield sample
        if self._resume and self._resume[0] == plan["epoch"]:
            self._resume = None
        self.epoch = plan["epoch"] + 1

    def _part(self, part: int) -> OpenPart | None:
        open_part = self._open.get(part)
        if open_part is not None:
            self._open.move_to_end(part)
            return open_part
        if part in self._bad:
            return None
        if self._fetcher is None:
            self._fetcher = PartFetcher(self.sources, cache_dir=self.cache_dir, verify=self.verify)
            self._units_cache = UnitsCache(self.cache_dir / "units", self.units_cache_bytes)
        ref = self.parts[part]
        source = self.sources[ref.corpus]
        try:
            images = self._fetcher.images(ref)
            open_part = OpenPart(images, self._units(ref), ref.n_pairs,
                                 source.describe(ref.images_path))
        except CorpusError as error:
            self._corrupt(part, error)
            return None
        self._open[part] = open_part
        if len(self._open) > self.max_open_parts:
            self._open.popitem(last=False)[1].close()
        return open_part

    def _units(self, ref: PartRef) -> PartUnits:
        """A part's checked units, decoded once per machine (`histmol.data.units_cache`)."""
        assert self._fetcher is not None and self._units_cache is not None
        fetcher, lookup = self._fetcher, self.gene_set.lookups[ref.corpus]
        source = self.sources[ref.corpus]

        def decode() -> pa.Table:
            where = source.describe(ref.units_path)
            return decode_units(fetcher.units(ref), ref.n_pairs, source.gene_index, where)

        if not self.units_cache_bytes:
            return PartUnits(decode(), ref.n_pairs, lookup)
        # decoded gene rows depend on genes.parquet (a new unresolved key shifts later rows)
        key = entry_key(fetcher.units_version(ref), ref.n_pairs, source.genes_sha256)
        return PartUnits(self._units_cache.table(key, decode), ref.n_pairs, lookup)

    def _corrupt(self, part: int, error: CorpusError) -> None:
        if self.on_corrupt == "raise":
            raise error
        self._bad.add(part)
        warnings.warn(f"skipping corrupt part: {error}", stacklevel=3)

    def _locate(self, index: int) -> tuple[int, OpenPart, int] | None:
        """(part, its open reader, pair in the part) of a global sample id; None: part skipped."""
        part = int(np.searchsorted(self.part_starts, index, side="right")) - 1
        open_part = self._part(part)
        return None if open_part is None else (part, open_part, index - int(self.part_starts[part]))

    def _read_failed(self, part: int, error: CorpusError) -> None:
        self._open.pop(part).close()
        self._corrupt(part, error)

    def _sample(self, index: int) -> dict[str, Any] | None:
        located = self._locate(index)
        if located is None:
            return None
        part, open_part, pair = located
        try:
            patch = open_part.reader.read_patch(pair)
        except CorpusError as error:
            self._read_failed(part, error)
            return None
        if self.patch_format == "float_chw":
            patch = to_float_chw(torch.from_numpy(patch))
        if self.patch_transform is not None:
            patch = self.patch_transform(patch)
        return {"patch": patch, **self._fields(part, open_part, pair, index)}

    def _fields(self, part: int, open_part: OpenPart, pair: int, index: int) -> dict[str, Any]:
        """Return a sample's content other than its patch."""
        units = open_part.units
        section_id, platform, tissue, corpus, mask = self._meta[part]
        fields = {
            "expression": units.expression(pair, len(self.gene_set), self.aggregate_units),
            "n_units": int(units.pair_units[pair + 1] - units.pair_units[pair]),
            "panel_mask": mask,
            "index": index,
            "pair_index": pair,
            "part": self.parts[part].part,
            "section_id": section_id,
            "platform": platform,
            "tissue": tissue,
            "corpus": corpus,
        }
        if not self.aggregate_units:
            fields["positions"] = units.unit_positions(pair)
        return fields
