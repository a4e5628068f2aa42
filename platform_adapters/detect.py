"""Recognise a bundle's platform from its file names alone (no file is opened).

`histmol build --platform auto` and `platform: auto` in manifests use `detect_platform`; an
explicit platform is checked with `check_platform` so that a Visium bundle given as `xenium`
is named as a Visium bundle before any reader runs. Only names are listed, a few folders deep
and a bounded number of entries, so an answer comes in milliseconds even on a large bundle.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from histmol.errors import BundleError

__all__ = ["SIGNATURES", "Detection", "check_platform", "detect_platform", "list_names"]

MAX_DEPTH = 4
MAX_ENTRIES = 20_000

# Per platform: glob patterns matched against paths relative to the bundle (with "/"), each with a
# weight. A pattern is matched against every listed path's tail, so "spatial/x.json" also matches
# "outs/spatial/x.json"; a pattern starting with "/" matches at the bundle's top level only.
# Weights reflect how specific a name is to one vendor.
SIGNATURES: dict[str, tuple[tuple[str, int], ...]] = {
    "visium-hd": (
        ("binned_outputs/square_*um", 10),
        ("segmented_outputs/filtered_feature_cell_matrix.h5", 10),
        ("segmented_outputs/cell_segmentations.geojson", 10),
    ),
    "visium": (
        ("spatial/scalefactors_json.json", 5),
        ("spatial/tissue_positions.csv", 5),
        ("spatial/tissue_positions_list.csv", 5),
        ("filtered_feature_bc_matrix.h5", 2),
        ("filtered_feature_bc_matrix", 2),
        ("raw_feature_bc_matrix.h5", 2),
        ("raw_feature_bc_matrix", 2),
    ),
    "xenium": (
        ("experiment.xenium", 10),
        ("cell_feature_matrix.h5", 6),
        ("cell_feature_matrix", 6),
        ("cells.parquet", 3),
        ("cells.csv.gz", 3),
        ("transcripts.parquet", 3),
        ("transcripts.csv.gz", 3),
        ("*he_imagealignment.csv", 6),
    ),
    "st": (
        ("*selection*.tsv", 6),
        ("alignment_table*.tsv", 8),
        ("*stdata*.tsv", 2),
        ("*stdata*.tsv.gz", 2),
    ),
    "stereo-seq": (
        ("*.gef", 10),
        ("*.gem", 10),
        ("*.gem.gz", 10),
        ("*_regist.tif", 6),
    ),
    "slide-seq": (
        ("*BeadLocationsForR.csv", 10),
        ("*MappedDGEForR.csv", 10),
        ("*.digital_expression.txt", 8),
        ("*.digital_expression.txt.gz", 8),
        ("*_anndata.h5ad", 6),
    ),
    "cosmx": (
        ("*_exprMat_file.csv", 10),
        ("*_exprMat_file.csv.gz", 10),
        ("*_metadata_file.csv", 8),
        ("*_metadata_file.csv.gz", 8),
        ("*_tx_file.csv", 10),
        ("*_tx_file.csv.gz", 10),
        ("*_fov_positions_file.csv", 6),
        ("*_fov_positions_file.csv.gz", 6),
    ),
    "merscope": (
        ("*cell_by_gene.csv", 10),
        ("*cell_metadata.csv", 8),
        ("*detected_transcripts.csv", 10),
        ("*vizgen_transcripts*", 6),
        ("images/micron_to_mosaic_pixel_transform.csv", 10),
    ),
    "dbit-seq": (
        ("barcode_list*", 8),
        ("corners.csv", 6),
        ("position*.txt", 2),
    ),
    "seq-scope": (
        ("sge/barcodes.tsv.gz", 8),
        ("sge/features.tsv.gz", 8),
        ("sge/matrix.mtx.gz", 8),
        ("/barcodes.tsv.gz", 4),
        ("/features.tsv.gz", 4),
        ("/matrix.mtx.gz", 4),
    ),
    "hdst": (
        ("*red_ut*.tsv", 10),
        ("*red_ut*.tsv.gz", 10),
        ("*barcodes_under_tissue*.tsv", 10),
        ("*barcodes_under_tissue*.tsv.gz", 10),
    ),
    "open-st": (("*.h5ad", 1),),
}

# Display names for messages ("this looks like a Visium HD bundle").
VENDOR_NAMES = {
    "visium": "Visium",
    "visium-hd": "Visium HD",
    "xenium": "Xenium",
    "st": "legacy Spatial Transcriptomics (st)",
    "stereo-seq": "Stereo-seq",
    "slide-seq": "Slide-seq",
    "cosmx": "CosMx",
    "merscope": "MERSCOPE",
    "dbit-seq": "DBiT-seq",
    "seq-scope": "Seq-Scope",
    "hdst": "HDST",
    "open-st": "Open-ST",
}


@dataclass(frozen=True)
class Detection:
    """Scores of every platform whose signature files a bundle holds, best first."""

    bundle: Path
    scores: tuple[tuple[str, int], ...]

    @property
    def best(self) -> str | None:
        """The single best-scoring platform, or None when none matched or two tie."""
        if not self.scores:
            return None
        if len(self.scores) > 1 and self.scores[1][1] == self.scores[0][1]:
            return None
        return self.scores[0][0]

    def candidates(self) -> list[str]:
        """Platforms sharing the top score."""
        if not self.scores:
            return []
        top = self.scores[0][1]
        return [name for name, score in self.scores if score == top]


def list_names(bundle: Path) -> list[str]:
    """Relative paths (with "/") of files and folders under `bundle`, breadth-bounded."""
    names: list[str] = []
    stack: list[tuple[Path, str, int]] = [(bundle, "", 0)]
    while stack and len(names) < MAX_ENTRIES:
        folder, prefix, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            names.append(rel)
            if depth + 1 < MAX_DEPTH and entry.is_dir(follow_symlinks=True):
                stack.append((Path(entry.path), rel + "/", depth + 1))
    return names


def _matches(names: list[str], pattern: str) -> bool:
    if pattern.startswith("/"):
        return any(fnmatch.fnmatchcase(name, pattern[1:]) for name in names)
    depth = pattern.count("/") + 1
    for name in names:
        tail = "/".join(name.split("/")[-depth:])
        if fnmatch.fnmatchcase(tail, pattern):
            return True
    return False


def score_bundle(bundle: str | os.PathLike[str]) -> Detection:
    """Score every platform's signature against the bundle's file names."""
    root = Path(bundle)
    names = [root.name] if root.is_file() else list_names(root)
    scores: list[tuple[str, int]] = []
    for platform, signature in SIGNATURES.items():
        score = sum(weight for pattern, weight in signature if _matches(names, pattern))
        if score:
            scores.append((platform, score))
    # Visium HD bundles hold Visium-like spatial/ folders under binned_outputs/: HD wins.
    if any(name == "visium-hd" for name, _ in scores):
        scores = [(n, s) for n, s in scores if n != "visium"]
    # Open-ST is "an h5ad nobody else claims": drop it when a specific platform matched.
    if any(name != "open-st" for name, _ in scores):
        scores = [(n, s) for n, s in scores if n != "open-st"]
    scores.sort(key=lambda item: (-item[1], list(SIGNATURES).index(item[0])))
    return Detection(root, tuple(scores))


def detect_platform(bundle: str | os.PathLike[str]) -> str:
    """The platform a bundle's file names point to; BundleError naming the bundle otherwise."""
    detection = score_bundle(bundle)
    if detection.best is not None:
        return detection.best
    if not detection.scores:
        raise BundleError(
            bundle,
            "no platform's files found here (see `histmol platforms` for what each expects); "
            "give --platform explicitly",
        )
    raise BundleError(
        bundle,
        f"files of several platforms found ({', '.join(detection.candidates())}); "
        "give --platform explicitly",
    )


def check_platform(platform: str, bundle: str | os.PathLike[str]) -> None:
    """Refuse a bundle that is recognisably another platform's (names the one it looks like).

    A bundle with no recognisable file, or one that matches `platform` at all, passes: the reader
    then reports exactly which file is missing.
    """
    detection = score_bundle(bundle)
    matched = dict(detection.scores)
    if not detection.scores or platform in matched:
        return
    best = detection.best
    if best is None:
        return
    raise BundleError(
        bundle,
        f"this looks like a {VENDOR_NAMES.get(best, best)} bundle, not "
        f"{VENDOR_NAMES.get(platform, platform)}; use --platform {best} (or --platform auto)",
    )
