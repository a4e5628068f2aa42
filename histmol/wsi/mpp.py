"""Pixel size (um/px at level 0) read from slide metadata, with placeholder values rejected.

Scanners record a real pixel size; image libraries write defaults that look like one (JFIF's
72 dpi, Windows' 96 dpi, "1 pixel per unit", a TIFF resolution with no unit). Treating those as
an mpp would scale every patch wrongly by orders of magnitude, so they are reported as absent
with a reason, and registration falls back to the platform's unit pitch (DESIGN.md,
"Coordinate frames").

Sources: OpenSlide properties (`openslide.mpp-x/-y`, then `tiff.XResolution` and
`tiff.ResolutionUnit`), TIFF tags (XResolution, YResolution, ResolutionUnit; TIFF 6.0 p. 38),
OME-XML `Pixels/@PhysicalSizeX` with its unit (https://docs.openmicroscopy.org/ome-model/),
and Pillow's `info['dpi']` (JFIF density, EXIF resolution or PNG pHYs in metres).
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MPP_MIN_UM = 0.05
MPP_MAX_UM = 20.0
MPP_AXIS_TOLERANCE = 0.01
UM_PER_INCH = 25400.0
UM_PER_CM = 10000.0
PLACEHOLDER_DPI = (72.0, 96.0)
DPI_MATCH = 0.5

# TIFF ResolutionUnit codes (TIFF 6.0; 4 and 5 are tifffile's extensions) and OpenSlide's spelling.
TIFF_UNIT_UM = {2: UM_PER_INCH, 3: UM_PER_CM, 4: 1000.0, 5: 1.0}
TIFF_UNIT_NAMES = {1: "NONE", 2: "INCH", 3: "CENTIMETER", 4: "MILLIMETER", 5: "MICROMETER"}
OPENSLIDE_UNIT_CODES = {"none": 1, "inch": 2, "centimeter": 3, "millimeter": 4, "micrometer": 5}
OME_UNIT_UM = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,  # micro sign U+00B5, what the OME schema uses
    "μm": 1.0,  # Greek mu U+03BC, seen in the wild
    "um": 1.0,
    "micron": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


@dataclass(frozen=True)
class MppResult:
    """An embedded mpp, or why there is none.

    `reason` is set only when the file carried a value that was rejected (a placeholder, out of
    range, an unknown unit); a file with no resolution metadata at all gives (None, None).
    """

    mpp: float | None
    reason: str | None = None
    source: str | None = None


NO_MPP = MppResult(None)


def _discard(source: str, reason: str) -> MppResult:
    logger.debug("discarding embedded mpp from %s: %s", source, reason)
    return MppResult(None, reason, source)


def check_mpp(value: float | None, source: str) -> MppResult:
    """Accept `value` (um/px) if it is a plausible scan resolution, else say why not."""
    if value is None:
        return NO_MPP
    if not math.isfinite(value) or value <= 0:
        return _discard(source, f"{source} gives {value!r} um/px, not a positive number")
    if not MPP_MIN_UM <= value <= MPP_MAX_UM:
        return _discard(
            source,
            f"{source} gives {value:.6g} um/px, outside the plausible "
            f"{MPP_MIN_UM:g}-{MPP_MAX_UM:g} um/px range (a placeholder, not a scan resolution)",
        )
    return MppResult(float(value), None, source)


def validate_mpp(value: float | None) -> float | None:
    """Return `value` if it is a plausible mpp (0.05-20 um/px), else None (logged at debug)."""
    return check_mpp(None if value is None else float(value), "value").mpp


def _combine_xy(mpp_x: float, mpp_y: float | None, source: str) -> float:
    """Average x and y; when they disagree by more than 1 % keep x (non-square pixels)."""
    if mpp_y is None or not math.isfinite(mpp_y) or mpp_y <= 0:
        return mpp_x
    if abs(mpp_x - mpp_y) > MPP_AXIS_TOLERANCE * max(mpp_x, mpp_y):
        logger.debug("%s: x %.6g and y %.6g um/px differ by > 1 %%; using x", source, mpp_x, mpp_y)
        return mpp_x
    return (mpp_x + mpp_y) / 2.0


def _float(value: Any) -> float | None:
    """A float from a number, a numeric string or a TIFF rational (numerator, denominator)."""
    try:
        if isinstance(value, tuple | list):
            if len(value) != 2 or float(value[1]) == 0:
                return None
            return float(value[0]) / float(value[1])
        return float(value)
    except (TypeError, ValueError):
        return None


def mpp_from_tiff_resolution(x_res: Any, y_res: Any, unit: Any) -> MppResult:
    """Mpp from TIFF XResolution/YResolution (pixels per unit) and ResolutionUnit.

    A missing ResolutionUnit means INCH (the TIFF 6.0 default); NONE means the numbers are only
    an aspect ratio, so there is no mpp. 72 and 96 dpi and 1 pixel per unit are placeholders.
    """
    x = _float(x_res)
    if x is None:
        return NO_MPP
    y = _float(y_res)
    source = "TIFF XResolution"
    if isinstance(unit, str):
        code = OPENSLIDE_UNIT_CODES.get(unit.strip().lower())
    else:
        code = 2 if unit is None else _int_or_none(unit)
    if code == 1:
        return _discard(source, f"TIFF resolution {x:g} has no unit (ResolutionUnit NONE)")
    if code not in TIFF_UNIT_UM:
        return _discard(source, f"TIFF ResolutionUnit {unit!r} is not a length unit")
    name = TIFF_UNIT_NAMES[code]
    if x <= 0:
        return _discard(source, f"TIFF resolution {x:g} pixels per {name.lower()} is not positive")
    if math.isclose(x, 1.0):
        return _discard(source, f"TIFF resolution of 1 pixel per {name.lower()} is a placeholder")
    if code == 2 and any(abs(x - dpi) < DPI_MATCH for dpi in PLACEHOLDER_DPI):
        return _discard(source, f"TIFF resolution {x:g} dpi is a software default placeholder")
    um = TIFF_UNIT_UM[code]
    mpp_y = um / y if y is not None and y > 0 else None
    return check_mpp(_combine_xy(um / x, mpp_y, source), f"{source} ({x:g} per {name})")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def mpp_from_tiff_tags(tags: Any) -> MppResult:
    """Mpp from a tifffile page's tags (`page.tags`)."""

    def value(name: str) -> Any:
        tag = tags.get(name)
        return None if tag is None else tag.value

    x_res, y_res = value("XResolution"), value("YResolution")
    return mpp_from_tiff_resolution(x_res, y_res, value("ResolutionUnit"))


def mpp_from_openslide(properties: Mapping[str, str]) -> MppResult:
    """Mpp from OpenSlide properties: `openslide.mpp-x/-y`, else the TIFF resolution tags."""
    mpp_x = _float(properties.get("openslide.mpp-x"))
    if mpp_x is not None:
        mpp_y = _float(properties.get("openslide.mpp-y"))
        return check_mpp(_combine_xy(mpp_x, mpp_y, "openslide.mpp-x"), "openslide.mpp-x/y")
    if "openslide.mpp-x" in properties:
        raw = properties["openslide.mpp-x"]
        return _discard("openslide.mpp-x", f"openslide.mpp-x {raw!r} is not a number")
    return mpp_from_tiff_resolution(
        properties.get("tiff.XResolution"),
        properties.get("tiff.YResolution"),
        properties.get("tiff.ResolutionUnit"),
    )


def mpp_from_ome(ome_xml: str) -> MppResult:
    """Mpp from the first OME Image's `Pixels/@PhysicalSizeX` (+Y), in its unit (default um)."""
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError as exc:
        return _discard("OME-XML", f"OME-XML does not parse: {exc}")
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return NO_MPP
    source = "OME PhysicalSizeX"
    sizes: list[float | None] = []
    for axis in ("X", "Y"):
        raw = pixels.attrib.get(f"PhysicalSize{axis}")
        unit = pixels.attrib.get(f"PhysicalSize{axis}Unit", "µm")
        if raw is None:
            sizes.append(None)
            continue
        if unit not in OME_UNIT_UM:
            problem = f"OME PhysicalSize{axis}Unit {unit!r} is not a known length unit"
            return _discard(source, problem)
        number = _float(raw)
        if number is None:
            return _discard(source, f"OME PhysicalSize{axis} {raw!r} is not a number")
        sizes.append(number * OME_UNIT_UM[unit])
    mpp_x = sizes[0]
    if mpp_x is None:
        return NO_MPP
    return check_mpp(_combine_xy(mpp_x, sizes[1], source), source)


def mpp_from_pillow_info(info: Mapping[str, Any], image_format: str | None) -> MppResult:
    """Mpp from Pillow's `info` of a JPEG or PNG: `dpi` (JFIF, EXIF or PNG pHYs in metres)."""
    source = f"{image_format or 'image'} dpi"
    dpi = info.get("dpi")
    if dpi is None:
        if "aspect" in info or info.get("jfif_unit") == 0:
            return _discard(source, f"{image_format} density has no unit (an aspect ratio only)")
        return NO_MPP
    x = _float(dpi[0]) if isinstance(dpi, tuple | list) else _float(dpi)
    y = _float(dpi[1]) if isinstance(dpi, tuple | list) and len(dpi) > 1 else None
    if x is None or x <= 0:
        return _discard(source, f"{image_format} resolution {dpi!r} is not a positive number")
    if math.isclose(x, 1.0, abs_tol=0.01):
        return _discard(source, f"{image_format} resolution of 1 pixel per unit is a placeholder")
    for placeholder in PLACEHOLDER_DPI:
        if abs(x - placeholder) < DPI_MATCH:
            return _discard(
                source, f"{image_format} resolution {x:g} dpi is a software default placeholder"
            )
    mpp_y = UM_PER_INCH / y if y is not None and y > 0 else None
    return check_mpp(_combine_xy(UM_PER_INCH / x, mpp_y, source), f"{source} ({x:g} dpi)")


def first_mpp(*results: MppResult) -> MppResult:
    """The first result with an mpp; else the first with a discard reason; else none."""
    for result in results:
        if result.mpp is not None:
            return result
    discarded = [r for r in results if r.reason]
    if discarded:
        return MppResult(None, "; ".join(str(r.reason) for r in discarded), discarded[0].source)
    return NO_MPP
