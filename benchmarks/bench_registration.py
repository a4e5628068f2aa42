"""Automatic registration: error distribution over random transforms, refusals, time per section.

Three measurements, written as one JSON file (default benchmarks/results/registration.json):

1. accuracy: `histmol.autoregister` on synthetic pairs (`histmol.synth.registration_pairs`) with
   random rotation, handedness, scale, shift, 80 % crop, stain, blur and noise (H&E against
   H&E), and DAPI-like against the H&E's hematoxylin (cross-modal); the pixel size is given for
   half the cases and searched for the others. Error = distance between true and found
   positions of a 12 x 12 grid over the platform image, in WSI px at 0.5 um/px.
2. refusal: each fixed image against another slide's platform image; the confidence must stay
   under the build's threshold.
3. time per section: `histmol.auto_placement.place_automatically` (platform PNG -> WSI, two
   passes, no figure) on a virtual 40,000 x 40,000 px slide at 0.5 um/px whose pyramid levels
   (4x, 16x, 64x) are in memory: the decode time of a real file's levels is not counted (reading
   a 1024 px thumbnail and a ~2000 px crop from a tiled pyramid adds about a second).

Run on one core (the thread pools are pinned to 1 before numpy loads), e.g.:

    .venv/bin/python benchmarks/bench_registration.py --cases 10 --timing-runs 3
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WSI_SIDE, WSI_MPP = 40_000, 0.5
FIELD_UM, FIELD_MPP = 7_000.0, 2.0  # the tissue field, rendered at the 4x level's pixel size
HIRES_UM_PER_PX, FULLRES_UM_PER_PX = 3.25, 0.65  # a Visium hires PNG and its full-res frame


def summary(values: list[float]) -> dict[str, float]:
    """Median, 90th and 99th percentile and maximum."""
    array = np.asarray(values, float)
    return {
        "median": float(np.median(array)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
    }


def accuracy(n_cases: int, seed: int) -> dict[str, object]:
    """Error distribution per modality over `n_cases` random transforms, and the refusals."""
    from histmol.autoregister import DEFAULT_MIN_CONFIDENCE, autoregister
    from histmol.synth.morphology import TissueModel
    from histmol.synth.registration_pairs import make_case, unrelated_case

    side = 1500  # a 1.5 mm field at 1 um/px
    models = [TissueModel(side, side, mpp=1.0, seed=s, n_regions=4, label_um=16.0) for s in (3, 7)]
    sources = [m.render(0, 0, side, side) for m in models]
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {}
    for modality in ("he", "nuclei"):
        pixel = (3.0, 6.0) if modality == "he" else (1.0, 3.0)
        rows = []
        for index in range(n_cases):
            k = index % 2
            case = make_case(models[k], sources[k], rng, modality=modality, moving_um_per_px=pixel)
            truth = np.linalg.inv(case.fixed_to_wsi) @ case.true_native_to_wsi
            truth = truth @ case.moving_to_native
            scale = float(np.sqrt(abs(np.linalg.det(truth[:2, :2])))) if index % 4 < 2 else None
            started = time.process_time()
            found = autoregister(case.moving, case.moving_to_native, case.fixed,
                                 case.fixed_to_wsi, modality=modality, scale=scale)
            cpu = time.process_time() - started
            error = case.unit_error_wsi_px(found.native_to_wsi)
            rows.append({"max_error_wsi_px": float(error.max()),
                         "median_error_wsi_px": float(np.median(error)),
                         "confidence": found.confidence, "scale_given": scale is not None,
                         "cpu_s": cpu})
            print(modality, index, json.dumps(rows[-1]), flush=True)
        refused = []
        for index in range(max(2, n_cases // 4)):
            case = make_case(models[0], sources[0], rng, modality=modality, moving_um_per_px=pixel)
            stranger = make_case(models[1], sources[1], rng, modality=modality,
                                 moving_um_per_px=pixel)
            pair = unrelated_case(case, stranger)
            found = autoregister(pair.moving, pair.moving_to_native, pair.fixed,
                                 pair.fixed_to_wsi, modality=modality)
            refused.append(found.confidence)
            print(modality, "unrelated", index, found.confidence, flush=True)
        out[modality] = {
            "cases": rows,
            "max_error_wsi_px": summary([r["max_error_wsi_px"] for r in rows]),
            "max_error_um": summary([r["max_error_wsi_px"] * WSI_MPP for r in rows]),
            "confidence": summary([r["confidence"] for r in rows]),
            "cpu_s": summary([r["cpu_s"] for r in rows]),
            "within_1_wsi_px": sum(r["max_error_wsi_px"] < 1.0 for r in rows),
            "unrelated_confidence": refused,
            "unrelated_refused": sum(c < DEFAULT_MIN_CONFIDENCE for c in refused),
            "threshold": DEFAULT_MIN_CONFIDENCE,
        }
    return out


def timing(runs: int, seed: int) -> dict[str, object]:
    """CPU and wall seconds of the whole stage on a virtual 40,000 px slide, and its error."""
    from histmol.auto_placement import place_automatically
    from histmol.synth.morphology import TissueModel
    from histmol.synth.registration_pairs import similarity, warp_image

    field_px = int(FIELD_UM / FIELD_MPP) // 16 * 16
    model = TissueModel(field_px, field_px, mpp=FIELD_MPP, seed=seed, n_regions=4, label_um=16.0)
    field = model.render(0, 0, field_px, field_px)
    rng = np.random.default_rng(seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="histmol-bench-registration-") as scratch:
        for run in range(runs):
            offset = rng.uniform(2_000, WSI_SIDE / 4 - field_px - 2_000, 2).astype(int) // 16 * 16
            slide = virtual_slide(field, offset)
            scale = HIRES_UM_PER_PX / FIELD_MPP  # field px per hires px
            shape = (int(field_px * 0.8 / scale),) * 2
            turn = similarity(rng.uniform(0, 2 * np.pi), scale, bool(rng.random() < 0.5), 0, 0)
            centre = np.array([field_px, field_px]) / 2.0
            moving_to_field = np.eye(3)
            moving_to_field[:2, :2] = turn[:2, :2]
            moving_to_field[:2, 2] = centre - turn[:2, :2] @ np.array(shape[::-1]) / 2.0
            hires = warp_image(field, moving_to_field, shape, 242.0).astype(np.uint8)
            section, image_to_native = visium_section(Path(scratch) / f"run{run}", hires)
            field_to_wsi = np.array([[4.0, 0, 4.0 * offset[0]], [0, 4.0, 4.0 * offset[1]],
                                     [0, 0, 1]])
            truth = field_to_wsi @ moving_to_field @ np.linalg.inv(image_to_native)
            wall, cpu = time.perf_counter(), time.process_time()
            placement = place_automatically(section, slide, wsi_mpp=WSI_MPP, min_confidence=0.3)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            w = shape[1] * image_to_native[0, 0]  # the image's width in native units
            grid = np.meshgrid(np.linspace(0, w, 12), np.linspace(0, w, 12))
            points = np.vstack([grid[0].ravel(), grid[1].ravel(), np.ones(144)])
            error = np.hypot(*((placement.native_to_wsi - truth) @ points)[:2])
            rows.append({"cpu_s": cpu, "wall_s": wall, "max_error_wsi_px": float(error.max()),
                         "confidence": placement.found.confidence,
                         "passes": placement.qc["register_passes"]})
            print("timing", run, json.dumps(rows[-1]), flush=True)
    return {"runs": rows, "cpu_s": summary([r["cpu_s"] for r in rows]),
            "wall_s": summary([r["wall_s"] for r in rows]),
            "max_error_wsi_px": summary([r["max_error_wsi_px"] for r in rows]),
            "wsi_side_px": WSI_SIDE, "wsi_mpp": WSI_MPP, "platform_image_um_per_px":
            HIRES_UM_PER_PX}


def visium_section(folder: Path, hires: np.ndarray):  # noqa: ANN201 - Section, imported late
    """A Visium-like Section whose bundle holds only the scale factors and the hires PNG."""
    import pandas as pd
    import scipy.sparse as sp
    from PIL import Image

    from histmol.section import Provenance, Section

    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    scalef = FULLRES_UM_PER_PX / HIRES_UM_PER_PX
    (spatial / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": scalef}))
    Image.fromarray(hires).save(spatial / "tissue_hires_image.png")
    section = Section(
        section_id="bench", platform="visium",
        units=pd.DataFrame({"unit_id": ["u"], "x_native": [0.0], "y_native": [0.0]}),
        counts=sp.csr_matrix(np.ones((1, 1), np.int32)),
        genes=pd.DataFrame({"gene_id": ["g"], "symbol": ["g"], "ensembl_id": [None]}),
        wsi_path=folder / "virtual.tif", unit_shape="circle", unit_size_um=55.0, pitch_um=100.0,
        default_mode="spot",
        provenance=Provenance("visium", "1", str(folder),
                              (str(spatial / "scalefactors_json.json"),)),
        native_um_per_unit=FULLRES_UM_PER_PX,
    )
    return section, np.diag([1 / scalef, 1 / scalef, 1.0])


def virtual_slide(field: np.ndarray, offset: np.ndarray):  # noqa: ANN201 - a SlideReader
    """A 40,000 px slide at 0.5 um/px: glass, with the tissue field at `offset` (4x-level px).

    Levels 4x, 16x and 64x are in memory (glass plus the field); level 0 is never read by
    registration, and reading it raises.
    """
    from histmol.wsi.base import SlideReader
    from histmol.wsi.mpp import MppResult

    class _Reader(SlideReader):
        backend = "virtual"

        def __init__(self) -> None:
            self.levels = {}
            part = field
            for index, down in ((1, 1), (2, 4), (3, 16)):  # level px per 4x-level px
                if down > 1:  # block means of the field alone (the glass is uniform)
                    n = part.shape[0] // 4
                    part = part[: n * 4, : n * 4].reshape(n, 4, n, 4, 3).mean(axis=(1, 3))
                    part = part.astype(np.uint8)
                level = np.full((WSI_SIDE // (4 * down),) * 2 + (3,), 242, np.uint8)
                x, y = offset[0] // down, offset[1] // down
                level[y : y + part.shape[0], x : x + part.shape[1]] = part
                self.levels[index] = level
            dims = [(WSI_SIDE, WSI_SIDE)] + [
                (self.levels[i].shape[1], self.levels[i].shape[0]) for i in (1, 2, 3)]
            super().__init__(Path("virtual-40000px.tif"), dims, (1.0, 4.0, 16.0, 64.0),
                             MppResult(WSI_MPP, None, "virtual"))

        def _read_inside(self, level: int, x: int, y: int, width: int,
                         height: int) -> np.ndarray:
            if level == 0:
                raise AssertionError("registration read level 0")
            return self.levels[level][y : y + height, x : x + width].copy()

        def _close(self) -> None:
            self.levels.clear()

    return _Reader()


def main() -> None:
    """Parse the arguments, measure, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="random transforms per modality")
    parser.add_argument("--timing-runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "registration.json")
    args = parser.parse_args()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "threads": os.environ.get("OMP_NUM_THREADS")},
        "accuracy": accuracy(args.cases, args.seed),
        "time_per_section": timing(args.timing_runs, args.seed),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
