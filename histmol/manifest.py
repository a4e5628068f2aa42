"""Ingest manifests: one entry per section, in YAML or CSV, validated with pydantic.

Why a manifest: `histmol ingest` builds a whole cohort resumably, so the cohort has to be data
(what to build from which files, with which options), not a shell loop of `histmol build` calls.

YAML layout (paths relative to the manifest's folder, or fsspec URLs such as
``s3://bucket/bundles/crc-01/outs``: see "URL inputs" below)::

    version: 1         # optional; a manifest without it is read as version 1, others refused
    corpus:            # corpus-level options: one patch geometry and codec per corpus
      patch_px: 224
      target_mpp: 0.5
    defaults:          # per-section build options every entry inherits unless it sets them
      min_tissue_fraction: 0.1
    sections:
      - section_id: crc-01
        platform: visium
        bundle: bundles/crc-01/outs
        wsi: slides/crc-01.svs
        transform: bundles/crc-01/native_to_wsi.csv
        tissue: colon
        species: human
        patient_id: p1
        licence: CC-BY-4.0
        mpp: 0.2527          # per-section override of the WSI's um/px
        bin_um: 8            # platform options: bin size, unit kind, alignment file
        options: {positions: spots.tsv}   # any other adapter option, passed through verbatim

CSV: one row per section with the entry fields as columns (empty cell = unset); adapter options
as `option.<name>` columns; corpus-level columns (`patch_px`, ...) may appear but must hold the
same value on every row. Every error names the file and the line and entry it concerns.
Documents are bounded (`histmol.manifest_limits`: size, nesting depth, string length, and YAML
aliases by the size they expand to), so a hostile manifest fails at once.
The JSON Schema (`manifests/schema.json`, from `python -m histmol.manifest`) lets editors check
YAML manifests as they are typed.

URL inputs (bundle, wsi, transform, landmarks, alignment; histmol/remote_inputs.py):
`load_manifest` only lists them (names, sizes, versions), never downloads. Such an entry's
request is a `RemoteInputRequest`: its fingerprint comes from those listings, and
`with_local_inputs`, called by each stage that reads inputs, fetches them into the cache of the
process running that stage (a Dask worker's own, on a cluster that shares no disk).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from histmol.build import SectionRequest
from histmol.config import BUILD_OPTIONS, CORPUS_LEVEL_FIELDS, BuildConfig
from histmol.errors import ConfigError, HistmolError
from histmol.fingerprint import input_fingerprint
from histmol.manifest_limits import (
    LimitError,
    check_string,
    compose_bounded,
    construct,
    read_bounded_text,
)
from histmol.options import (
    ADAPTER,
    CORPUS,
    EXTRA,
    INPUT,
    METADATA,
    SECTION,
    SECTION_FIELDS,
    OptionSpec,
    scoped,
)
from histmol.preflight import resolve_platform
from histmol.remote_inputs import RemoteInput, check_url, describe_input, is_url
from histmol.section import normalise_section_id
from platform_adapters import get_platform

SECTION_OPTIONS = scoped(BUILD_OPTIONS, SECTION)
PATH_FIELDS = tuple(spec.name for spec in SECTION_FIELDS if spec.path)
REQUEST_PATH_FIELDS = tuple(s.name for s in scoped(SECTION_FIELDS, INPUT) if s.path)  # the rest
PLATFORM_OPTION_FIELDS = tuple(spec.name for spec in scoped(SECTION_FIELDS, ADAPTER))  # options
METADATA_FIELDS = tuple(spec.name for spec in scoped(SECTION_FIELDS, METADATA))
CSV_OPTION_PREFIX = "option."


class ManifestError(ConfigError):
    """A manifest that cannot be read or validated; the message names file, line and entry."""


def attribute(spec: OptionSpec) -> str:
    """The model attribute of `spec`: its name, unless pydantic's BaseModel already uses it.

    `register` is one (written `register:` in a manifest, the attribute is `register_mode`).
    """
    return f"{spec.name}_mode" if hasattr(BaseModel, spec.name) else spec.name


def model_field(spec: OptionSpec, *, inherit: bool = False) -> tuple[Any, Any]:
    """`(annotation, FieldInfo)` of `spec` in a manifest model, its bounds and help included.

    `inherit`: unset means "take the manifest's defaults, then BuildConfig's" (None).
    """
    kind: Any = str if spec.path else spec.value_type
    if spec.scope == EXTRA:
        return kind, Field(default_factory=dict, description=spec.help)
    description = spec.help + (" Relative to the manifest's folder, or a URL." if spec.path else "")
    bounds = {k: getattr(spec, k) for k in ("ge", "gt", "le", "lt") if getattr(spec, k) is not None}
    alias = spec.name if attribute(spec) != spec.name else None
    if spec.required or spec.manifest_required:
        return kind, Field(description=description, alias=alias, **bounds)
    if spec.default_label and (inherit or spec.default_text):  # else the schema's default says it
        description += f" [default: {spec.default_label}]"
    if inherit or spec.default is None:
        return kind | None, Field(None, description=description, alias=alias, **bounds)
    return kind, Field(spec.default, description=description, alias=alias, **bounds)


def fields_of(specs: Sequence[OptionSpec], *, inherit: bool = False) -> dict[str, Any]:
    """Keyword arguments of `pydantic.create_model`: one field per spec."""
    return {attribute(spec): model_field(spec, inherit=inherit) for spec in specs}


CorpusOptions = create_model(
    "CorpusOptions", __config__=ConfigDict(extra="forbid"),
    __doc__="Options every section of one corpus shares (BuildConfig's corpus-level fields).",
    **fields_of(scoped(BUILD_OPTIONS, CORPUS)),
)
SectionOptions = create_model(
    "SectionOptions", __config__=ConfigDict(extra="forbid", populate_by_name=True),
    __doc__="Per-section build options; None inherits the manifest's `defaults`, then "
            "BuildConfig's.",
    **fields_of(SECTION_OPTIONS, inherit=True),
)


class _EntryChecks(SectionOptions):  # type: ignore[misc, valid-type]
    """The checks of a manifest entry's fields, which `ManifestEntry` adds from their specs."""

    @model_validator(mode="before")
    @classmethod
    def _donor_id(cls, data: Any) -> Any:
        """Accept `donor_id` as the name of `patient_id` (evaluation splits by either)."""
        if isinstance(data, dict) and "donor_id" in data:
            data = dict(data)
            donor = data.pop("donor_id")
            if data.get("patient_id") not in (None, "", donor):
                raise ValueError("give patient_id or donor_id, not both")
            data["patient_id"] = donor
        return data

    @field_validator("section_id", check_fields=False)
    @classmethod
    def _slug(cls, value: str) -> str:
        try:
            normalise_section_id(value)  # kept as given: the build records it as section_name
            return value
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator("platform", check_fields=False)
    @classmethod
    def _known_platform(cls, value: str) -> str:
        if value.strip().lower() == "auto":
            return "auto"  # recognised from the bundle's files once its path is resolved
        try:
            return get_platform(value).name
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @field_validator(*PATH_FIELDS, check_fields=False)
    @classmethod
    def _local_path(cls, value: str | None) -> str | None:
        if value is not None and is_url(value):
            return check_url(value)  # listed when the plan is made, fetched where it is read
        if value is not None and not value.strip():
            raise ValueError("empty path")
        return value


ManifestEntry = create_model(
    "ManifestEntry", __base__=_EntryChecks,
    __doc__="One section: which adapter reads which bundle, paired with which H&E, and its "
            "metadata.",
    **fields_of(SECTION_FIELDS),
)


class Manifest(BaseModel):
    """A whole ingest: corpus-level options, per-section defaults and the sections."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    corpus: CorpusOptions = Field(default_factory=CorpusOptions)  # type: ignore[valid-type]
    defaults: SectionOptions = Field(default_factory=SectionOptions)  # type: ignore[valid-type]
    sections: list[ManifestEntry] = Field(min_length=1)  # type: ignore[valid-type]


@dataclass(frozen=True)
class RemoteInputRequest(SectionRequest):
    """A section request some of whose inputs are URLs: `sources` maps field -> listed input.

    Its path fields (and an `alignment` option) name where THIS process' cache keeps each copy,
    which need not exist yet: read them only through `with_local_inputs`, which fetches them.
    """

    sources: Mapping[str, RemoteInput] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Like `SectionRequest.fingerprint`, a URL input's listing standing in for its stat.

        Needs no copy, so the flow process decides what to skip without downloading anything.
        """
        parts = [self.sources[f].fingerprint if f in self.sources else
                 input_fingerprint(getattr(self, f)) for f in REQUEST_PATH_FIELDS]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def name_urls(self, text: str) -> str:
        """`text` (an error message) with this process' copies of the inputs named by URL."""
        for source in self.sources.values():
            text = text.replace(str(source.local_path()), source.url.rstrip("/"))
        return text

    def local(self, *fields: str) -> SectionRequest:
        """This request with its URL inputs among `fields` (default all) fetched here."""
        return with_local_inputs(self, *fields)


def with_local_inputs(request: SectionRequest, *fields: str) -> SectionRequest:
    """`request` with its URL inputs among `fields` (default: all) fetched to this process' cache.

    A request without URL inputs comes back as it is. Other URL inputs keep their (maybe
    missing) cache paths: a stage fetches only what it reads.
    """
    if not isinstance(request, RemoteInputRequest):
        return request
    wanted = [f for f in request.sources if not fields or f in fields]
    paths = {f: request.sources[f].fetch() for f in wanted}
    options = dict(request.options)
    if "alignment" in paths:
        options["alignment"] = str(paths.pop("alignment"))
    return replace(request, options=options, **paths)


@dataclass(frozen=True)
class IngestPlan:
    """A loaded manifest: its path, the corpus-level fields and one (request, config) per entry.

    An entry with URL inputs gives a `RemoteInputRequest`: pass it through `with_local_inputs`
    before reading its files. An entry in `problems` could not be planned (an input URL that
    cannot be listed): the ingest records it failed with that reason and builds the others.
    """

    path: Path
    corpus_fields: dict[str, Any]
    requests: list[SectionRequest]
    configs: list[BuildConfig]
    lines: list[int]
    problems: dict[int, str] = field(default_factory=dict)  # entry index -> why planning failed

    def where(self, index: int) -> str:
        """`file:line` of entry `index`, for messages."""
        return f"{self.path}:{self.lines[index]}"


def load_manifest(path: str | Path) -> IngestPlan:
    """Read and validate a YAML (.yaml/.yml) or CSV manifest; paths resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        data, lines = _read_yaml(path)
    elif suffix == ".csv":
        data, lines = _read_csv(path)
    else:
        raise ManifestError(
            f"{path}: a manifest is .yaml, .yml or .csv, not {suffix or 'no suffix'!r}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_describe(path, err, data, lines)) from None
    seen: dict[str, int] = {}
    for index, entry in enumerate(manifest.sections):
        key = normalise_section_id(entry.section_id)  # B4 and b4 are one section
        if key in seen:
            raise ManifestError(
                f"{path}:{lines[index]}: sections[{index}]: section_id {entry.section_id!r} "
                f"repeats sections[{seen[key]}] (line {lines[seen[key]]})"
            )
        seen[key] = index
    return _plan(path, manifest, lines)


def _plan(path: Path, manifest: Manifest, lines: list[int]) -> IngestPlan:
    base = path.resolve().parent
    corpus = manifest.corpus.model_dump()
    defaults = manifest.defaults.model_dump(exclude_none=True, by_alias=True)
    requests, configs = [], []
    problems: dict[int, str] = {}
    for index, entry in enumerate(manifest.sections):
        per_section = {field.alias or k: getattr(entry, k)
                       for k, field in SectionOptions.model_fields.items()}
        overrides = {**defaults, **{k: v for k, v in per_section.items() if v is not None}}
        try:
            configs.append(BuildConfig(**corpus, **overrides))
        except ConfigError as err:
            raise ManifestError(f"{path}:{lines[index]}: sections[{index}] "
                                f"({entry.section_id}): {err}") from None
        try:
            sources = {f: describe_input(getattr(entry, f))
                       for f in PATH_FIELDS if getattr(entry, f) and is_url(getattr(entry, f))}
        except (HistmolError, OSError, ImportError, ValueError) as err:
            # planning one entry failed (an input URL cannot be listed): that entry is recorded
            # failed with the reason, the others build (its paths below are never read)
            problems[index] = str(err)
            sources = {}
        resolved = {f: str(sources[f].local_path()) if f in sources else getattr(entry, f)
                    if is_url(getattr(entry, f)) else os.path.normpath(base / getattr(entry, f))
                    for f in PATH_FIELDS if getattr(entry, f)}
        options: dict[str, Any] = {f: resolved.get(f, getattr(entry, f))
                                   for f in PLATFORM_OPTION_FIELDS if getattr(entry, f) is not None}
        clash = sorted(set(options) & set(entry.options))
        if clash:
            raise ManifestError(f"{path}:{lines[index]}: sections[{index}] ({entry.section_id}): "
                                f"{clash} given both as a field and in options")
        options.update(entry.options)
        metadata = {k: getattr(entry, k) for k in METADATA_FIELDS if getattr(entry, k)}
        optional = {f: Path(resolved[f]) if f in resolved else None
                    for f in ("transform", "landmarks")}
        platform = entry.platform
        if platform == "auto":
            try:
                platform = resolve_platform(platform, Path(resolved["bundle"]))
            except HistmolError as err:
                raise ManifestError(f"{path}:{lines[index]}: sections[{index}] "
                                    f"({entry.section_id}): platform auto: {err}") from None
        fields = (platform, Path(resolved["bundle"]), Path(resolved["wsi"]),
                  entry.section_id, optional["transform"], metadata, options,
                  optional["landmarks"])
        requests.append(RemoteInputRequest(*fields, sources=sources) if sources else
                        SectionRequest(*fields))
    return IngestPlan(path, corpus, requests, configs, lines, problems)


def _read_yaml(path: Path) -> tuple[Any, list[int]]:
    """Parse the document; return it and the 1-based line of each `sections` item."""
    try:
        node = compose_bounded(read_bounded_text(path))
        data = construct(node) if node is not None else None
    except LimitError as err:
        raise ManifestError(f"{path}:{err.line}: {err}" if err.line else f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ManifestError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ManifestError(f"{path}: a manifest is a mapping with a 'sections' list")
    lines: list[int] = []
    for key, value in node.value:
        if key.value == "sections" and isinstance(value, yaml.SequenceNode):
            lines = [item.start_mark.line + 1 for item in value.value]
    return data, lines


def _read_csv(path: Path) -> tuple[dict[str, Any], list[int]]:
    """CSV rows -> the YAML-shaped document, and each row's 1-based line number."""
    try:
        text = read_bounded_text(path)
    except LimitError as err:
        raise ManifestError(f"{path}: {err}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    try:
        for row in reader:
            if None in row:
                raise ManifestError(f"{path}:{reader.line_num}: more cells than header columns")
            for cell in (*row, *row.values()):
                check_string(cell or "", reader.line_num)
            rows.append(row)
            lines.append(reader.line_num)
    except (LimitError, csv.Error) as err:
        raise ManifestError(f"{path}:{reader.line_num}: {err}") from None
    if not rows:
        raise ManifestError(f"{path}: no sections (a header line and one row per section)")
    corpus: dict[str, str] = {}
    sections = []
    for row, line in zip(rows, lines, strict=True):
        entry: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for column, cell in row.items():
            cell = (cell or "").strip()
            if not cell:
                continue
            if column in CORPUS_LEVEL_FIELDS:
                if corpus.setdefault(column, cell) != cell:
                    raise ManifestError(
                        f"{path}:{line}: {column}={cell} differs from {corpus[column]} on an "
                        "earlier row; a corpus has one patch geometry and codec"
                    )
            elif column.startswith(CSV_OPTION_PREFIX):
                options[column[len(CSV_OPTION_PREFIX):]] = _cell_value(cell)
            else:
                entry[column] = cell
        if options:
            entry["options"] = options
        sections.append(entry)
    return {"corpus": corpus, "sections": sections}, lines


def _cell_value(cell: str) -> Any:
    """Parse a CSV option cell: JSON numbers, booleans and lists; anything else a string."""
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def _describe(path: Path, err: ValidationError, data: Any, lines: Sequence[int]) -> str:
    """One line per problem: `file:line: sections[i] (id): field: message`."""
    messages = []
    for problem in err.errors():
        loc = problem["loc"]
        where = str(path)
        if len(loc) >= 2 and loc[0] == "sections" and isinstance(loc[1], int):
            index = loc[1]
            if index < len(lines):
                where = f"{path}:{lines[index]}"
            entries = data.get("sections") if isinstance(data, Mapping) else None
            entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
            section_id = entry.get("section_id") if isinstance(entry, Mapping) else None
            label = f"sections[{index}]" + (f" ({section_id})" if section_id else "")
            field = ".".join(str(p) for p in loc[2:]) or "entry"
        else:
            label, field = "manifest", ".".join(str(p) for p in loc) or "document"
        message = problem["msg"].removeprefix("Value error, ")
        messages.append(f"{where}: {label}: {field}: {message}")
    return "\n".join(messages)


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of a YAML manifest, for editors (yaml-language-server)."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "histmol ingest manifest"
    return schema


def write_json_schema(path: str | Path) -> None:
    """Write `json_schema()` to `path` (sorted keys, trailing newline: stable in git)."""
    Path(path).write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_json_schema(sys.argv[1] if len(sys.argv) > 1 else "manifests/schema.json")
