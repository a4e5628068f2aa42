"""Every option histmol takes, declared once: name, type, default, bounds, help text and scope.

Why: the build options were written three times (BuildConfig, the manifest's pydantic models,
the `histmol build` options) and the copies drifted. Now a config dataclass declares each of its
fields with `option(...)` (BuildConfig in histmol.config, TrainConfig in histmol.model.config),
the section fields that are not build options are declared here (`SECTION_FIELDS`), and
everything else is derived: the configs' range checks (`check_fields`), the manifest's models
and JSON Schema (histmol.manifest) and the CLI options with their help (histmol.cli_options).

Stdlib only: the CLI reads these specs to answer `--help` and typos without heavy imports.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from histmol.errors import ConfigError

# Scopes: where an option lives and who may set it.
CORPUS = "corpus"  # patch geometry and codec every section of one corpus shares
SECTION = "section"  # a build option of one section (BuildConfig, not corpus-level)
INPUT = "input"  # what to build: platform, bundle, H&E, section id, placement files
ADAPTER = "adapter"  # adapter options with a field of their own (bin_um, units, alignment)
EXTRA = "extra"  # any other adapter option, passed through to the adapter verbatim
METADATA = "metadata"  # recorded with the section: tissue, species, patient, licence
TRAIN = "train"  # the trainer's options (TrainConfig)
RUN = "run"  # how a command runs, never what it writes (so not in BuildConfig)
REQUIRED = dataclasses.MISSING  # the default of an option that must be given


@dataclass(frozen=True)
class OptionSpec:
    """One option. `type` is the Python type of its value (a Literal lists the choices).

    `default_text` says what an empty default (None, "") means, for help and schema; `path`
    marks a file or folder (a Path on the command line, a string in a manifest: relative to the
    manifest's folder, or a URL); `manifest_required` marks a field a manifest must give even
    though the command line can work it out (the section id).
    """

    name: str
    type: Any
    default: Any
    help: str
    scope: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    default_text: str | None = None
    path: bool = False
    manifest_required: bool = False
    flag: str = ""  # the command-line flag when it is not --name-with-dashes

    @property
    def cli_flag(self) -> str:
        """The command-line flag, e.g. ``--patch-px``."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        """Whether the option has no default (the command line must give it)."""
        return self.default is REQUIRED

    @property
    def value_type(self) -> Any:
        """The type without its None: ``float | None`` -> float."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        is_union = typing.get_origin(self.type) in (typing.Union, types.UnionType)
        return args[0] if is_union and len(args) == 1 else self.type

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed values of a Literal option, else ()."""
        kind = self.value_type
        return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()

    @property
    def default_label(self) -> str:
        """The default as help and schema show it: a value, or what leaving it empty means."""
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, bool):
            return "yes" if self.default else "no"
        return "" if self.required or self.default is None else str(self.default)

    def bounds_text(self) -> str:
        """The allowed range, e.g. ``16..4096``, ``(0, 1]`` or ``> 0``; "" when unbounded."""
        low = f"[{_number(self.ge)}" if self.ge is not None else (
            f"({_number(self.gt)}" if self.gt is not None else "")
        high = f"{_number(self.le)}]" if self.le is not None else (
            f"{_number(self.lt)})" if self.lt is not None else "")
        if low and high:
            closed = low[0] == "[" and high[-1] == "]"
            return f"{low[1:]}..{high[:-1]}" if closed else f"{low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return ""

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None. None passes when the default is None."""
        if value is None:
            return None if self.default is None else f"{self.name} must be given"
        if self.choices:
            if value not in self.choices:
                listed = ", ".join(repr(c) for c in self.choices)
                return f"{self.name} must be one of {listed}, got {value!r}"
            return None
        if self.bounds_text():
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{self.name} must be a number, got {value!r}"
            inside = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                      and (self.le is None or value <= self.le)
                      and (self.lt is None or value < self.lt))
            if not inside:
                bounds = self.bounds_text()
                where = "in " if bounds[0] not in "<>" else ""
                return f"{self.name} must be {where}{bounds}, got {_number(value)}"
        return None


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(default: Any, scope: str, help: str, *, ge: float | None = None,  # noqa: A002
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           default_text: str | None = None) -> Any:
    """Declare a config dataclass field and its option spec in one place.

    Use as ``patch_px: int = option(224, CORPUS, "Patch side in pixels.", ge=16, le=4096)``;
    `specs_of(cls)` reads the specs back (name and type from the field itself).
    """
    spec = {"scope": scope, "help": help, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "default_text": default_text}
    return dataclasses.field(default=default, metadata={"option": spec})


@functools.cache
def specs_of(config: type) -> tuple[OptionSpec, ...]:
    """The option specs of a dataclass declared with `option(...)`, in field order."""
    hints = typing.get_type_hints(config)
    specs = []
    for f in dataclasses.fields(config):
        if "option" not in f.metadata:
            raise TypeError(f"{config.__name__}.{f.name} is not declared with option(...)")
        specs.append(OptionSpec(f.name, hints[f.name], f.default, **f.metadata["option"]))
    return tuple(specs)


def check_fields(config: Any) -> None:
    """Raise ConfigError naming the first field of `config` outside its declared range."""
    for spec in specs_of(type(config)):
        message = spec.problem(getattr(config, spec.name))
        if message:
            raise ConfigError(message)


def scoped(specs: tuple[OptionSpec, ...], *scopes: str) -> tuple[OptionSpec, ...]:
    """The specs of the given scopes, in order."""
    return tuple(s for s in specs if s.scope in scopes)


# The section fields that are not build options: inputs, adapter options, metadata.
SECTION_FIELDS: tuple[OptionSpec, ...] = (
    OptionSpec("section_id", str | None, None, "Section id, unique in the corpus: letters, "
               "digits, '.', '_', '-' (lower-cased; the name as given is kept as section_name).",
               INPUT,
               default_text="the bundle folder's name", manifest_required=True),
    OptionSpec("platform", str, REQUIRED, "Platform name (see `histmol platforms`), or auto: "
               "recognised from the bundle.", INPUT),
    OptionSpec("bundle", Path, REQUIRED,
               "The platform's output folder (e.g. Space Ranger outs/).", INPUT, path=True),
    OptionSpec("wsi", Path, REQUIRED, "The paired H&E image (svs, ndpi, tiff, ome.tif, jpg, "
               "png...).", INPUT, path=True),
    OptionSpec("transform", Path | None, None, "3x3 native->WSI affine CSV.", INPUT, path=True),
    OptionSpec("landmarks", Path | None, None, "CSV of point pairs native_x,native_y,wsi_x,"
               "wsi_y; an affine is fitted (instead of transform).", INPUT, path=True),
    OptionSpec("tissue", str, "", "Tissue type, e.g. colon.", METADATA),
    OptionSpec("species", str, "", "Species.", METADATA,
               default_text="inferred from Ensembl gene ids"),
    OptionSpec("patient_id", str, "", "Patient or donor id (evaluation splits by it); a "
               "manifest also accepts donor_id.", METADATA),
    OptionSpec("licence", str, "", "Licence of the source data.", METADATA),
    OptionSpec("bin_um", float | None, None, "Bin size in um for binned platforms.", ADAPTER,
               gt=0, default_text="the platform's"),
    OptionSpec("units", str | None, None, "Unit kind for platforms offering several: bins or "
               "cells.", ADAPTER, default_text="the platform's"),
    OptionSpec("alignment", Path | None, None, "Platform alignment file (e.g. Xenium "
               "*_he_imagealignment.csv).", ADAPTER, path=True),
    OptionSpec("options", dict[str, Any], None, "Other adapter options, e.g. positions=spots.tsv.",
               EXTRA, flag="--option"),
)

THREADS = OptionSpec("threads", int, 2, "Tile-reading threads per section.", RUN, ge=1)


def named(specs: tuple[OptionSpec, ...], name: str) -> OptionSpec:
    """The spec called `name` among `specs` (KeyError if none is)."""
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(name)
