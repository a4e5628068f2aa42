"""The corpus report: one self-contained HTML page a curator opens from disk.

No server and no network: CSS and the small sorting/filtering script are inline, thumbnails are
inline JPEG data URIs (so the page alone shows every section), and each thumbnail links to the
section's full QC figures by a relative path (``<figures_dir>/<section_id>/overview.png``, written
by `histmol.qc.figures.write_section_figures`). The section table sorts on any column (click a
header; ``report.html#sort=n_units:desc`` opens it sorted) and filters on free text.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

import histmol
from histmol.progress import track
from histmol.shards.atomic import temp_name
from histmol.shards.corpus import COMMITTED, Corpus
from histmol.summary import summarise

THUMBNAIL_WIDTH = 200
FIGURE_LINKS = ("overview", "genes", "zoom", "metrics")
COLUMNS = (  # key, header, numeric
    ("thumbnail", "", False),
    ("section_id", "section", False),
    ("platform", "platform", False),
    ("tissue", "tissue", False),
    ("species", "species", False),
    ("status", "status", False),
    ("n_pairs", "pairs", True),
    ("n_units", "units", True),
    ("n_genes", "genes", True),
    ("dropped", "dropped patches", True),
    ("mpp", "um/px (source)", True),
    ("bytes", "MB", True),
    ("notes", "QC flags / failure reason", False),
)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{margin:0 0 .2em}h2{margin:1.4em 0 .4em}.meta{color:#666}
table{border-collapse:collapse;margin:.3em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:middle}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
#sections th{cursor:pointer;user-select:none}
#sections th[aria-sort=ascending]::after{content:" \\25B2"}
#sections th[aria-sort=descending]::after{content:" \\25BC"}
tr.failed td{background:#fde8e8}tr.flagged td{background:#fff6dc}
td img{display:block;max-width:200px}td.notes{max-width:26em;font-size:13px}
.totals td:first-child{font-weight:600}.totals td+td{text-align:right}
.groups{display:flex;gap:2em;align-items:flex-start;flex-wrap:wrap}
#filter{margin:.4em 0;padding:4px;width:24em}
"""

SCRIPT = """
(function(){
  const table=document.getElementById('sections');
  const heads=[...table.tHead.rows[0].cells];
  function value(row,i){const c=row.cells[i];
    return c.dataset.v!==undefined?c.dataset.v:c.textContent;}
  function sortBy(key,dir){
    const i=heads.findIndex(h=>h.dataset.key===key);if(i<0)return;
    const numeric=heads[i].dataset.numeric==='1';const body=table.tBodies[0];
    const rows=[...body.rows];
    rows.sort((a,b)=>{let x=value(a,i),y=value(b,i);
      if(numeric){x=x===''?-Infinity:+x;y=y===''?-Infinity:+y;return dir*(x-y);}
      return dir*x.localeCompare(y);});
    rows.forEach(r=>body.appendChild(r));
    heads.forEach(h=>h.removeAttribute('aria-sort'));
    heads[i].setAttribute('aria-sort',dir>0?'ascending':'descending');
    table.dataset.sort=key+':'+(dir>0?'asc':'desc');
  }
  heads.forEach(h=>{if(!h.dataset.key)return;h.addEventListener('click',()=>{
    const dir=h.getAttribute('aria-sort')==='ascending'?-1:1;sortBy(h.dataset.key,dir);
    history.replaceState(null,'','#sort='+table.dataset.sort);});});
  const m=/sort=([\\w-]+):(asc|desc)/.exec(location.hash);if(m)sortBy(m[1],m[2]==='asc'?1:-1);
  document.getElementById('filter').addEventListener('input',e=>{
    const q=e.target.value.toLowerCase();
    [...table.tBodies[0].rows].forEach(r=>{r.hidden=q&&!r.textContent.toLowerCase().includes(q);});});
  window.addEventListener('load',()=>{
    const imgs=[...document.images];
    document.body.dataset.imagesLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
    document.body.dataset.images=imgs.length;});
})();
"""


def write_report(
    corpus_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    figures_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the corpus report to `out` (HTML); figures are looked up in `figures_dir`.

    `figures_dir` defaults to ``<corpus>/qc``. Sections without figures get no thumbnail (run
    ``histmol qc``); the page is still complete.
    """
    corpus = Corpus.open(corpus_root)
    summary = summarise(corpus.root)
    figures = Path(figures_dir) if figures_dir is not None else corpus.root / "qc"
    out = Path(out)
    sections = summary.sections
    committed = sections[sections["status"] == COMMITTED] if len(sections) else sections
    body = [
        f"<h1>histmol corpus: {_e(corpus.root.resolve().name)}</h1>",
        f"<p class=meta>{_e(_meta_line(corpus))}</p>",
        "<h2>Totals</h2>",
        _totals_table(summary.totals, summary.n_genes),
        "<h2>By platform, tissue and species</h2>",
        "<div class=groups>",
        "".join(_group_table(sections, key) for key in ("platform", "tissue", "species")),
        "</div>",
        "<h2>Sections</h2>",
        "<input id=filter type=search placeholder='filter rows (any text)'>",
        _sections_table(sections, figures, out.parent),
        "<h2>Gene panel coverage</h2>",
        _coverage(committed, corpus.genes()),
    ]
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>histmol corpus report: {_e(corpus.root.resolve().name)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}<script>{SCRIPT}</script>"
        "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(temp_name(out.name))
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _meta_line(corpus: Corpus) -> str:
    config = corpus.build_config
    geometry = ""
    if config:
        geometry = (
            f"patches {config.get('patch_px')} px at {config.get('target_mpp')} um/px, "
            f"{config.get('resample')} resampling, JPEG quality {config.get('jpeg_quality')}; "
        )
    return (
        f"{geometry}corpus format {corpus.meta.get('format_version')}, built by histmol "
        f"{corpus.meta.get('histmol_version')}; report by histmol {histmol.__version__}"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    lines = []
    for row in rows:
        cells = "".join(
            f"<td class=num>{_number(v)}</td>"
            if isinstance(v, int | float | np.number)
            else f"<td>{_e(v)}</td>"
            for v in row
        )
        lines.append(f"<tr>{cells}</tr>")
    body = "".join(lines)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _number(value: object) -> str:
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        return f"{float(value):,.4g}"
    return f"{int(value):,}"  # type: ignore[call-overload]


def _totals_table(totals: dict[str, int], n_genes: int) -> str:
    rows = [
        ("committed sections", totals["sections"]),
        ("failed sections", totals["failed"]),
        ("pairs", totals["pairs"]),
        ("units", totals["units"]),
        ("shard parts", totals["shards"]),
        ("genes in the vocabulary", n_genes),
        ("MB on disk", f"{totals['bytes'] / 1e6:,.1f}"),
    ]
    return _table(("", "total"), rows, cls="totals")


def _group_table(sections: pd.DataFrame, key: str) -> str:
    """Count committed sections, pairs, units and failed sections per value of `key`."""
    if not len(sections) or key not in sections:
        return ""
    frame = sections.assign(**{key: sections[key].fillna("").replace("", "(unset)")})
    rows = []
    for value, group in frame.groupby(key, sort=True):
        done = group[group["status"] == COMMITTED]
        rows.append(
            (
                value,
                len(done),
                int(done["n_pairs"].sum()),
                int(done["n_units"].sum()),
                int((group["status"] != COMMITTED).sum()),
            )
        )
    return _table((key, "sections", "pairs", "units", "failed"), rows)


def _thumbnail(path: Path) -> str:
    """Encode a thumbnail PNG as an inline JPEG data URI, THUMBNAIL_WIDTH px wide."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        height = max(1, round(image.height * THUMBNAIL_WIDTH / image.width))
        small = image.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _link(path: Path, base: Path) -> str:
    return quote(Path(os.path.relpath(path, base)).as_posix())


def _cell(key: str, record: dict[str, object]) -> str:
    value = record.get(key)
    if key == "mpp":
        if value is None or pd.isna(value):
            return "<td class=num data-v=''></td>"
        source = str(record.get("mpp_source"))
        return (
            f"<td class=num data-v='{value}' title='mpp source: {_e(source)}'>{value:.4f} "
            f"({_e(source)})</td>"
        )
    if key == "dropped":
        planned, dropped = record.get("qc_n_pairs_planned"), record.get("qc_n_pairs_dropped_tissue")
        if (
            planned is None
            or pd.isna(planned)
            or not planned
            or dropped is None
            or pd.isna(dropped)
        ):
            return "<td class=num data-v=''></td>"
        share = float(dropped) / float(planned)
        return f"<td class=num data-v='{share}'>{int(dropped):,} ({share:.1%})</td>"
    if key == "bytes":
        return f"<td class=num data-v='{value}'>{int(value) / 1e6:,.1f}</td>"  # type: ignore[call-overload]
    if key in ("n_pairs", "n_units", "n_genes"):
        number = None if value is None or pd.isna(value) else int(value)  # type: ignore[call-overload]
        return (
            f"<td class=num data-v='{'' if number is None else number}'>"
            f"{'' if number is None else f'{number:,}'}</td>"
        )
    if key == "notes":
        note = record.get("reason") if record.get("status") != COMMITTED else record.get("qc_flags")
        return f"<td class=notes>{_e(note or '')}</td>"
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else value
    return f"<td>{_e(text)}</td>"


def _sections_table(sections: pd.DataFrame, figures: Path, base: Path) -> str:
    heads = "".join(
        f"<th data-key='{key}' data-numeric='{int(numeric)}'>{_e(title)}</th>"
        if key != "thumbnail"
        else "<th>figures</th>"
        for key, title, numeric in COLUMNS
    )
    rows = []
    for record in track(sections.to_dict("records"), "report", unit="sections"):
        section_id = str(record["section_id"])
        folder = figures / section_id
        thumb = folder / "thumbnail.png"
        if thumb.exists():
            links = " ".join(
                f"<a href='{_link(folder / f'{n}.png', base)}'>{n}</a>"
                for n in FIGURE_LINKS
                if (folder / f"{n}.png").exists()
            )
            figure_cell = (
                f"<td><a href='{_link(folder / 'overview.png', base)}'><img alt='"
                f"{_e(section_id)}' src='{_thumbnail(thumb)}'></a>{links}</td>"
            )
        else:
            figure_cell = "<td class=meta>no figures</td>"
        status = (
            "failed"
            if record["status"] != COMMITTED
            else ("flagged" if record.get("qc_flags") else "")
        )
        cells = "".join(_cell(key, record) for key, _, _ in COLUMNS[1:])
        rows.append(
            f"<tr class='{status}' data-section='{_e(section_id)}'>{figure_cell}{cells}</tr>"
        )
    return (
        f"<table id=sections><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _coverage(committed: pd.DataFrame, genes: pd.DataFrame) -> str:
    """How many committed sections measure each gene, and how panels overlap across platforms."""
    if not len(committed):
        return "<p class=meta>no committed sections</p>"
    n_sections = len(committed)
    measured = np.zeros(len(genes), dtype=np.int64)
    vocab = genes["index"].to_numpy()
    # A histMol-sized corpus has thousands of sections but a few dozen distinct panels: count
    # each distinct (platform, panel) once, weighted by its sections.
    distinct: dict[tuple[str, bytes], list[Any]] = {}
    for platform, panel in zip(committed["platform"], committed["panel"], strict=True):
        indices = np.asarray(panel, dtype=np.int64)
        entry = distinct.setdefault((str(platform), indices.tobytes()), [indices, 0])
        entry[1] += 1
    platform_genes: dict[str, set[int]] = {}
    for (platform, _), (indices, count) in distinct.items():
        measured[np.searchsorted(vocab, indices)] += count  # stable index -> genes.parquet row
        platform_genes.setdefault(platform, set()).update(indices.tolist())
    levels = [
        ("every section", measured == n_sections),
        ("at least half of the sections", measured * 2 >= n_sections),
        ("exactly one section", measured == 1),
        ("no committed section (vocabulary only)", measured == 0),
    ]
    spread = _table(
        ("genes measured in", "genes"), [(name, int(mask.sum())) for name, mask in levels]
    )
    species = _table(
        ("species", "genes in the vocabulary"),
        [(name, len(group)) for name, group in genes.groupby("species", sort=True)],
    )
    names = sorted(platform_genes)
    overlap = _table(
        ("genes shared", *names),
        [(a, *(len(platform_genes[a] & platform_genes[b]) for b in names)) for a in names],
    )
    sizes = committed.groupby("platform")["n_genes"].agg(["min", "median", "max"]).reset_index()
    panel = _table(
        ("platform", "smallest panel", "median panel", "largest panel"),
        [tuple(r) for r in sizes.itertuples(index=False)],
    )
    return (
        spread + species + panel + "<p>Genes shared between platforms (diagonal: all genes "
        "a platform's sections measure):</p>" + overlap
    )
