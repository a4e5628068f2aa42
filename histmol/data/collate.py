"""pair_collate: a batch of PairDataset samples as tensors.

Patches stack to (B, H, W, 3) uint8 or (B, 3, H, W) float32. Per-unit expression rows of all pairs
are concatenated (a ragged batch, as in PyTorch Geometric): ``expression`` (U, G), ``positions``
(U, 2) and ``unit_batch`` (U,), the batch row of each unit; aggregated samples stack to (B, G).
``n_units``, ``index``, ``part``, ``pair_index`` and ``corpus`` are int64 (B,), ``panel_mask``
bool (B, G); ``section_id``, ``platform`` and ``tissue`` stay lists of strings. Any other key
goes through torch's ``default_collate``. A batch a ``batched=True`` PairDataset made already
(a mapping) passes through unchanged, so ``collate_fn=pair_collate`` suits both modes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

_INTS = ("n_units", "index", "part", "pair_index", "corpus")
_STRINGS = ("section_id", "platform", "tissue")


def _stack(values: list[Any]) -> torch.Tensor:
    """Stack arrays or tensors; in a DataLoader worker, straight into shared memory.

    A worker's batch travels to the main process in shared memory: stacking into a shared
    storage saves the copy torch would make when sending (as ``default_collate`` does).
    """
    first = values[0]
    is_array = isinstance(first, np.ndarray)
    if get_worker_info() is None:
        return torch.from_numpy(np.stack(values)) if is_array else torch.stack(values)
    dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype if is_array else first.dtype
    shape = (len(values), *first.shape)
    item = torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * item)
    out = torch.empty(0, dtype=dtype).set_(storage).view(shape)
    if is_array:
        np.stack(values, out=out.numpy())
    else:
        torch.stack(values, out=out)
    return out


def to_float_chw(patches: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) patches as float32 (..., 3, H, W) in [0, 1] (``float_chw``).

    The one conversion for both paths: per sample in the dataset, or per batch on the device
    after a uint8 batch was moved there (a quarter of the bytes), as `histmol train` does.
    """
    return patches.movedim(-1, -3).float().div_(255.0)


def pair_collate(samples: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """Collate PairDataset samples (see the module docstring for the layout)."""
    if isinstance(samples, Mapping):
        return dict(samples)
    if not samples:
        raise ValueError("pair_collate needs at least one sample")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "patch" or key == "panel_mask":
            batch[key] = _stack(values)
        elif key == "expression":
            if values[0].ndim == 1:
                batch[key] = _stack(values)
            else:
                batch[key] = torch.from_numpy(np.concatenate(values))
        elif key == "positions":
            batch[key] = torch.from_numpy(np.concatenate(values))
        elif key in _INTS:
            batch[key] = torch.tensor(values, dtype=torch.int64)
        elif key in _STRINGS:
            batch[key] = list(values)
        else:
            batch[key] = default_collate(values)
    if "positions" in batch:
        batch["unit_batch"] = torch.from_numpy(
            np.repeat(np.arange(len(samples), dtype=np.int64), batch["n_units"].numpy())
        )
    return batch
