"""HDST adapter (high-definition spatial transcriptomics; Vickovic et al. 2019, Nat Methods).

Reads the processed files of the HDST study on the Single Cell Portal (SCP420), as described in
broadinstitute/hdst `README.md` ("File Structure Overview";
github.com/klarman-cell-observatory/hdst, the code the paper cites):

- counts, `*red_ut*.tsv[.gz]`: long format, tab-separated with a header; `bc` (bead `XxY`),
  `spot_px_x` / `spot_px_y` (the bead's pixel column / row in the H&E image), `gene` (name),
  `count` (UMI-filtered counts). One row per (bead, gene).
- bead positions, `*barcodes_under_tissue*.tsv[.gz]` (optional): `bc`, `spot_px_x`,
  `spot_px_y`[, `annotation_region`]: the beads under the tissue. With it, count rows of beads
  it does not list are dropped (and counted; `min_match_rate` applies) and the pixels the two
  files give for one bead must agree.

The pixels come from the repository's `alignment/` code: a staggered (hexagonal) grid of
1918 x 783 beads, `spot_x`/`spot_y` labels from 1 (the `X`, `Y` of `bc`), positions rounded to
whole pixels. So `X` grows with `spot_px_x` and `Y` with `spot_px_y`; a bead table whose
indices run against its pixels (a mirrored fit) has its pixel columns swapped and is refused.

Units: square bins of `bin_um` (default 8 um) on the H&E pixel frame from its origin: a bead is
2 um, below a patch's resolution. No bead pitch is assumed (we found none documented): the bin
side in pixels comes from the H&E's pixel size, `um_per_px` or the WSI's embedded mpp.
Native frame: H&E level-0 pixels, so no transform is needed when `wsi` is that H&E.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from histmol.binning import BinAccumulator, BinnedCounts
from histmol.errors import BundleError, RegistrationError
from histmol.landmarks import fit_affine
from histmol.section import Section
from platform_adapters._binned import binned_units, check_bin_um, image_um_per_px
from platform_adapters._common import (
    EXAMPLES,
    build_gene_panel,
    bundle_folder,
    check_min_match_rate,
    check_native_to_wsi,
    explicit_file,
    first_line,
    panel_section,
)
from platform_adapters._counts import check_counts

PLATFORM = "hdst"
ADAPTER_VERSION = "1"

DEFAULT_BIN_UM = 8.0
ROW_CHUNK = 2_000_000  # count rows parsed at a time
# Genes get indices as they appear while streaming; this bounds the vocabulary (any
# transcriptome has far fewer genes) so bin keys can be fixed before the first chunk.
GENE_CAPACITY = 1 << 17
FIT_SAMPLE = 20_000  # beads used to check the orientation of the pixel columns


class HdstFiles(StrEnum):
    """File name patterns (glob) in an HDST bundle."""

    COUNTS = "*red_ut*.tsv"
    COUNTS_GZ = "*red_ut*.tsv.gz"
    POSITIONS = "*barcodes_under_tissue*.tsv"
    POSITIONS_GZ = "*barcodes_under_tissue*.tsv.gz"


class HdstKeys(StrEnum):
    """Column names of the counts and bead position tables."""

    BC = "bc"
    PX_X = "spot_px_x"
    PX_Y = "spot_px_y"
    GENE = "gene"
    COUNT = "count"


def read(
    bundle: str | os.PathLike[str],
    *,
    wsi: str | os.PathLike[str],
    section_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    min_match_rate: float = 0.9,
    native_to_wsi: np.ndarray | None = None,
    counts: str | os.PathLike[str] | None = None,
    positions: str | os.PathLike[str] | None = None,
    bin_um: float = DEFAULT_BIN_UM,
    um_per_px: float | None = None,
) -> Section:
    """Read an HDST bundle into a Section of `bin_um` square bins in H&E pixel coordinates.

    Args:
        bundle: folder holding the `*red_ut*` counts and, usually, `*barcodes_under_tissue*`.
        wsi: the H&E image the pixel positions refer to; opened only for its pixel size when
            `um_per_px` is not given.
        section_id: defaults to the slug of the bundle folder name.
        metadata: free-form strings stored on the section.
        min_match_rate: minimum fraction of the counted beads listed in the positions table.
        native_to_wsi: explicit 3x3 affine, H&E pixels -> WSI level-0 pixels (when the WSI is
            not the image the positions refer to).
        counts: the counts table, overriding autodetection.
        positions: the bead positions table, overriding autodetection.
        bin_um: bin side in micrometres.
        um_per_px: the H&E's micrometres per pixel; default: the WSI's embedded value.

    Raises:
        BundleError: a missing, ambiguous or malformed file, pixels that disagree between the
            files, swapped pixel columns, or a bead match rate under the threshold.

    """
    min_match_rate = check_min_match_rate(min_match_rate)
    explicit = check_native_to_wsi(native_to_wsi)
    bin_um = check_bin_um(bin_um)
    folder = bundle_folder(bundle)
    counts_file = (
        explicit_file(counts, "counts table")
        if counts
        else _find(folder, (HdstFiles.COUNTS, HdstFiles.COUNTS_GZ), "counts table", True)
    )
    positions_file = (
        explicit_file(positions, "bead positions table")
        if positions
        else _find(folder, (HdstFiles.POSITIONS, HdstFiles.POSITIONS_GZ), "positions", False)
    )
    has_pixels = _check_counts_header(counts_file, need_pixels=positions_file is None)
    scale, scale_source = image_um_per_px(wsi, um_per_px)
    beads = _read_positions(positions_file) if positions_file is not None else None
    streamed = _Streamer(counts_file, positions_file, beads, has_pixels, bin_um, scale)
    binned = streamed.run()
    n_beads = len(streamed.matched) + len(streamed.unmatched)
    if len(streamed.matched) < min_match_rate * n_beads:
        raise BundleError(
            counts_file,
            f"only {len(streamed.matched)} of its {n_beads} beads have a row in {positions_file}"
            f"; min_match_rate is {min_match_rate:.2%}. Unmatched examples: "
            f"{sorted(streamed.unmatched)[:EXAMPLES]}",
        )
    if binned.n_bins == 0:
        raise BundleError(counts_file, "holds no counts for any located bead")
    located = beads if beads is not None else streamed.pixels()
    steps = _check_orientation(located, positions_file or counts_file)
    panel = build_gene_panel(streamed.genes, streamed.genes, binned.counts)
    files = [counts_file] + ([positions_file] if positions_file is not None else [])
    qc: dict[str, float | int | str | bool] = {
        "n_count_rows": streamed.n_rows,
        "n_beads": n_beads,
        "bead_match_rate": len(streamed.matched) / max(n_beads, 1),
        "um_per_px": scale,
        "um_per_px_source": scale_source,
        "bead_step_x_um": steps[0] * scale,
        "bead_step_y_um": steps[1] * scale,
        "n_bins": binned.n_bins,
        "bin_um": bin_um,
        "n_control_probes": panel.n_controls,
    }
    return panel_section(
        PLATFORM,
        ADAPTER_VERSION,
        folder,
        section_id=section_id,
        wsi=wsi,
        units=binned_units(binned, scale),
        panel=panel,
        files=files,
        layout="scp420_red_ut" + ("+barcodes_under_tissue" if positions_file else ""),
        metadata=metadata,
        unit_shape="square",
        unit_size_um=bin_um,
        pitch_um=bin_um,
        default_mode="grid",
        native_to_wsi=explicit,
        native_um_per_unit=scale,
        qc=qc,
    )


def _find(folder: Path, patterns: tuple[str, ...], what: str, required: bool) -> Path | None:
    found = sorted({p for pattern in patterns for p in folder.glob(str(pattern)) if p.is_file()})
    if len(found) > 1:
        raise BundleError(
            folder,
            f"ambiguous {what}: several candidates {[p.name for p in found]}; pass the "
            "file explicitly",
        )
    if not found and required:
        raise BundleError(folder, f"no {what} found; looked for {', '.join(patterns)}")
    return found[0] if found else None


def _check_counts_header(path: Path, *, need_pixels: bool) -> bool:
    """Check the counts table's columns; return whether it carries spot_px_x / spot_px_y."""
    header = [c.strip() for c in first_line(path).split("\t")]
    needed = [HdstKeys.BC.value, HdstKeys.GENE.value, HdstKeys.COUNT.value]
    pixels = [HdstKeys.PX_X.value, HdstKeys.PX_Y.value]
    if need_pixels:
        needed += pixels
    missing = [c for c in needed if c not in header]
    if missing:
        why = " (there is no bead positions table, so the counts must carry pixels)"
        raise BundleError(
            path,
            f"counts table lacks columns {missing}; found columns {header}, expected "
            f"{needed}{why if need_pixels else ''}",
        )
    return all(c in header for c in pixels)


def _read_positions(path: Path) -> pd.DataFrame:
    """Bead positions indexed by `bc`, pixel columns as float64."""
    try:
        frame = pd.read_csv(path, sep="\t", dtype={HdstKeys.BC.value: str})
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise BundleError(path, f"cannot read as a tab-separated table: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    expected = [HdstKeys.BC.value, HdstKeys.PX_X.value, HdstKeys.PX_Y.value]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise BundleError(
            path,
            f"bead positions table lacks columns {missing}; found columns "
            f"{list(frame.columns)}, expected {expected}",
        )
    pixels = frame[[HdstKeys.PX_X, HdstKeys.PX_Y]].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(pixels.to_numpy(np.float64)).all():
        raise BundleError(path, "spot_px_x / spot_px_y hold non-numeric or missing values")
    table = pd.DataFrame(
        pixels.to_numpy(np.float64),
        columns=["x", "y"],
        index=pd.Index(frame[HdstKeys.BC].astype(str).str.strip(), name="bc"),
    )
    if table.index.has_duplicates:
        dupes = table.index[table.index.duplicated()][:EXAMPLES].tolist()
        raise BundleError(path, f"duplicate beads {dupes}")
    return table


class _Streamer:
    """Streams the counts table into bins, joining pixels by bead."""

    def __init__(
        self,
        path: Path,
        positions_file: Path | None,
        beads: pd.DataFrame | None,
        has_pixels: bool,
        bin_um: float,
        um_per_px: float,
    ) -> None:
        self.path, self.positions_file, self.beads = path, positions_file, beads
        self.has_pixels, self.um_per_px = has_pixels, um_per_px
        self.accumulator = BinAccumulator(GENE_CAPACITY, bin_um)
        self.gene_codes: dict[str, int] = {}
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()
        self.own_pixels: list[pd.DataFrame] = []
        self.n_rows = 0

    @property
    def genes(self) -> np.ndarray:
        """Gene names in index order."""
        return np.array(list(self.gene_codes), dtype=object)

    def _chunks(self) -> Iterator[pd.DataFrame]:
        columns = [HdstKeys.BC.value, HdstKeys.GENE.value, HdstKeys.COUNT.value]
        if self.has_pixels:
            columns += [HdstKeys.PX_X.value, HdstKeys.PX_Y.value]
        dtypes = {HdstKeys.BC.value: str, HdstKeys.GENE.value: str}
        try:
            with pd.read_csv(
                self.path,
                sep="\t",
                usecols=columns,
                dtype=dtypes,
                chunksize=ROW_CHUNK,
                keep_default_na=False,
            ) as reader:
                yield from reader
        except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
            raise BundleError(self.path, f"cannot read the counts table: {err}") from err

    def _gene_index(self, genes: pd.Series) -> np.ndarray:
        codes, uniques = pd.factorize(genes.str.strip())
        mapping = np.array(
            [self.gene_codes.setdefault(g, len(self.gene_codes)) for g in uniques], dtype=np.int64
        )
        if len(self.gene_codes) > GENE_CAPACITY:
            raise BundleError(self.path, f"names more than {GENE_CAPACITY} distinct genes")
        return mapping[codes]

    def _numbers(self, chunk: pd.DataFrame, columns: list[str]) -> np.ndarray:
        values = chunk[columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        if not np.isfinite(values).all():
            raise BundleError(self.path, f"columns {columns} hold non-numeric or missing values")
        return values

    def run(self) -> BinnedCounts:
        """Bin every located count row; track matched and unmatched beads."""
        for chunk in self._chunks():
            self.n_rows += len(chunk)
            bc = chunk[HdstKeys.BC].str.strip()
            first_line = self.n_rows - len(chunk) + 2  # the header is line 1
            count = check_counts(self._numbers(chunk, [HdstKeys.COUNT.value])[:, 0], self.path,
                                 lambda i, at=first_line: f"line {at + i} (count)")
            gene = self._gene_index(chunk[HdstKeys.GENE])
            own = self._numbers(chunk, [HdstKeys.PX_X, HdstKeys.PX_Y]) if self.has_pixels else None
            if self.beads is None and own is not None:  # the header check made sure of `own`
                xy, found = own, np.ones(len(chunk), dtype=bool)
                self.matched.update(bc.unique())
                self.own_pixels.append(pd.DataFrame(own, columns=["x", "y"], index=bc.to_numpy()))
            elif self.beads is not None:
                rows = self.beads.index.get_indexer(bc)
                found = rows >= 0
                xy = self.beads.to_numpy()[np.maximum(rows, 0)]
                self.matched.update(bc[found].unique())
                self.unmatched.update(bc[~found].unique())
                if own is not None:
                    self._check_agreement(bc, own, xy, found)
            keep = found & (count > 0)
            self.accumulator.add_points(
                xy[keep, 0] * self.um_per_px,
                xy[keep, 1] * self.um_per_px,
                gene[keep],
                count[keep].astype(np.int64),
            )
        binned = self.accumulator.result()
        n_genes = max(len(self.gene_codes), 1)
        counts = binned.counts[:, :n_genes]
        return BinnedCounts(binned.col, binned.row, counts, binned.bin_um, binned.origin_um)

    def _check_agreement(
        self, bc: pd.Series, own: np.ndarray, xy: np.ndarray, found: np.ndarray
    ) -> None:
        differs = found & (np.abs(own - xy) > 0.5).any(axis=1)
        if differs.any():
            first = np.flatnonzero(differs)[:EXAMPLES]
            examples = [f"{bc.iloc[i]}: {own[i].tolist()} vs {xy[i].tolist()}" for i in first]
            raise BundleError(
                self.path,
                f"{int(differs.sum())} rows give a bead other pixels than "
                f"{self.positions_file} does (bead ids mismatched?), e.g. {examples}",
            )

    def pixels(self) -> pd.DataFrame:
        """Return the beads' pixels as the counts table gives them (no positions table)."""
        table = pd.concat(self.own_pixels)
        return table[~table.index.duplicated()]


def _check_orientation(beads: pd.DataFrame, path: Path) -> tuple[float, float]:
    """Fit bead `XxY` -> pixels; refuse a mirror; return the pixel step per X and per Y."""
    xy_ids = beads.index.to_series().str.extract(r"^(\d+)x(\d+)$").astype(np.float64)
    usable = xy_ids.notna().all(axis=1).to_numpy()
    if not usable.all():
        bad = beads.index[~usable][:EXAMPLES].tolist()
        raise BundleError(path, f"bead ids must be XxY array indices (e.g. '512x301'), found {bad}")
    step = max(1, len(beads) // FIT_SAMPLE)
    src, dst = xy_ids.to_numpy()[::step], beads.to_numpy()[::step]
    try:
        fit = fit_affine(src, dst, allow_mirror=True)
    except RegistrationError as err:
        raise BundleError(path, f"cannot relate bead XxY indices to pixels: {err}") from err
    if fit.determinant < 0:
        raise BundleError(
            path,
            "spot_px_x / spot_px_y run against the bead XxY indices (the index -> pixel fit "
            "mirrors): the pixel columns look swapped; spot_px_x must grow with X, spot_px_y "
            "with Y",
        )
    linear = fit.matrix[:2, :2]
    return float(np.hypot(*linear[:, 0])), float(np.hypot(*linear[:, 1]))
