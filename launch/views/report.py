"""`extrema-launch report`: one self-contained HTML file of a sweep, to open anywhere without a network.

The page holds the sweep and its axes, the status table (backends asked), the results averaged over seeds
(mean ± std (n)), every figure `plot` draws (inline SVG), the attention maps and inpainting pictures the runs have
(inline PNG), and each stage's provenance (host, git sha, code snapshot, world size). Nothing is fetched: no
scripts, no styles, no images from elsewhere.

Making the page writes nothing into the run store (the backends' corrections are shown, not recorded), and reads
nothing from outside it: a picture that is a link out of the sweep's directory, not a PNG or too large is listed
with the unreadable records, never inlined.
"""

from __future__ import annotations

import base64
import html
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from extrema.run import contract, rundir
from launch.addressed import Addressed, swept_axes
from launch.runstore import store
from launch.views import aggregate
from launch.views.results_view import collect
from launch.views.status_view import status_table
from launch.views.tables import short_cell

PICTURES = ("viz/*.png", "*/viz/*.png", "inpaint/*.png")  # under a run directory
MAX_PICTURE_BYTES = 8 << 20
PNG = b"\x89PNG\r\n\x1a\n"
MAX_PICTURES = 48
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.failed td { background: #fde8e8; } tr.completed td { background: #eef8ee; }
figure { display: inline-block; margin: 0.5em; max-width: 720px; } figure svg, figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #777; font-size: 0.9em; }
"""


def table_html(header: Sequence[str], rows: Sequence[Sequence[object]], state_col: int | None = None) -> str:
    """An HTML table (every cell escaped); rows coloured by their state when `state_col` is given."""
    out = ["<table><tr>", *(f"<th>{html.escape(str(h))}</th>" for h in header), "</tr>"]
    for row in rows:
        state = str(row[state_col]) if state_col is not None else ""
        out.append(f'<tr class="{html.escape(state)}">')
        out.extend(f"<td>{html.escape(short_cell(c) if not isinstance(c, str) else c)}</td>" for c in row)
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def figures_html(target: Addressed, table: pa.Table) -> str:
    """Every figure of `plot`, inline as SVG; a note when there is none or matplotlib is missing."""
    try:
        from launch.views import plots
    except ImportError as e:
        return f'<p class="note">figures need matplotlib: {html.escape(str(e))}</p>'
    with tempfile.TemporaryDirectory(prefix="extrema-report-") as tmp:
        try:
            plotted = plots.plot_sweep(target.url, target.runs, table, tmp)
        except (ImportError, ValueError) as e:
            return f'<p class="note">no figures: {html.escape(str(e))}</p>'
        parts = []
        for p in plotted:
            svg = next((f for f in p.files if f.endswith(".svg")), None)
            if svg is None:
                continue
            text = Path(svg).read_text()
            body = text[text.find("<svg") :]  # drop the XML prolog and doctype: inline SVG needs neither
            parts.append(f"<figure>{body}<figcaption>{html.escape(p.caption)}</figcaption></figure>")
    return "".join(parts) or '<p class="note">no figures yet</p>'


def picture(url: str, tree: str | None) -> bytes:
    """The bytes of one PNG of the sweep; Unreadable when it cannot be read, leads outside `tree`, is larger than
    MAX_PICTURE_BYTES or is not a PNG."""
    data = contract.read_bytes(url, MAX_PICTURE_BYTES, tree)
    if data is None:
        raise contract.Unreadable(url, "vanished while the report was made")
    if len(data) > MAX_PICTURE_BYTES:
        raise contract.Unreadable(url, f"more than the {MAX_PICTURE_BYTES:,} bytes a picture may have")
    if not data.startswith(PNG):
        raise contract.Unreadable(url, "not a PNG image")
    return data


def pictures_html(target: Addressed, problems: list[str]) -> str:
    """The attention maps and inpainting pictures of the runs, inline as PNG (bounded in number and size); those
    that cannot be shown go to `problems` as `path: reason`."""
    parts: list[str] = []
    tree = store.real_tree(target.url)
    for run in target.runs:
        base = rundir.join(target.url, run.run_id)
        fs, path = rundir.filesystem(base)
        found = sorted({f for pattern in PICTURES for f in fs.glob(f"{path}/{pattern}")})
        for name in found[: max(0, MAX_PICTURES - len(parts))]:
            url = fs.unstrip_protocol(name) if "://" in base else name
            try:
                data = base64.b64encode(picture(url, tree)).decode()
            except contract.Unreadable as e:
                problems.append(str(e))
                continue
            shown = f"{run.run_id}/{name[len(path) + 1 :]}"
            parts.append(
                f'<figure><img alt="{html.escape(shown)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(shown)}</figcaption></figure>"
            )
    return "".join(parts) or '<p class="note">no attention maps or inpainting pictures in these runs</p>'


def results_html(table: pa.Table) -> str:
    """The results averaged over seeds: mean ± std (n) per stage and swept values."""
    if table.num_rows == 0:
        return '<p class="note">no results yet</p>'
    try:
        header, cells = aggregate.summary(aggregate.aggregate(table), digits=4)
    except ValueError as e:
        return f'<p class="note">{html.escape(str(e))}</p>'
    return table_html(header, cells)


PROVENANCE = ("run_id", "stage", "state", "host", "git_sha", "git_dirty", "code", "world_size", "backend", "job_id")


def provenance_html(table: pa.Table) -> str:
    """Where each stage ran and with which code."""
    columns = [c for c in PROVENANCE if c in table.column_names]
    rows = [[r[c] for c in columns] for r in table.select(columns).to_pylist()]
    return table_html(columns, rows, columns.index("state") if "state" in columns else None)


def render(target: Addressed) -> tuple[str, list[str]]:
    """The report of a sweep as one HTML document, and `path: reason` of every record or picture it could not
    read (listed on the page too)."""
    status = status_table(target, write=False)
    table, _, problems = collect(target, write=False)
    problems = list(dict.fromkeys([*status.problems, *problems]))
    name = target.url.rstrip("/").rsplit("/", 1)[-1]
    axes = swept_axes(target.runs)
    state_col = status.columns.index("state")
    pictures = pictures_html(target, problems)
    sections = [
        f"<h1>extrema sweep {html.escape(name)}</h1>",
        f"<p>{html.escape(target.url)} · {len(target.runs)} runs · swept: {html.escape(', '.join(axes) or 'nothing')}"
        f" · generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>",
        "<h2>Status</h2>",
        table_html(status.columns, status.rows, state_col),
        "<h2>Results (mean ± std over seeds, n)</h2>",
        results_html(table),
        "<h2>Figures</h2>",
        figures_html(target, table),
        "<h2>Attention maps and inpainting</h2>",
        pictures,
        "<h2>Provenance</h2>",
        provenance_html(table),
    ]
    if problems:
        sections += ["<h2>Unreadable records</h2>", "<ul>", *(f"<li>{html.escape(p)}</li>" for p in problems), "</ul>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>extrema {html.escape(name)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
    return page, problems


def write(out: str, page: str) -> int:
    """Write the page to a path or URL (atomically); its size in bytes."""
    rundir.write_text_atomic(out, page)
    return len(page.encode())
