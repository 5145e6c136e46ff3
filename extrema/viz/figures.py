"""Matplotlib figures without a display, saved as PNG and SVG to any fsspec URL."""

from __future__ import annotations

import io
from typing import Any

from extrema.run import rundir

FORMATS = ("png", "svg")


def new_figure(width: float, height: float) -> Any:
    """A constrained-layout figure of `width` x `height` inches on the Agg canvas (matplotlib imported here)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, out_dir: str, name: str) -> list[str]:
    """Write the figure as `<out_dir>/<name>.png` and `.svg` (any fsspec URL); the URLs written."""
    files = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight", pad_inches=0.15)
        url = rundir.join(out_dir, f"{name}.{fmt}")
        fs, path = rundir.filesystem(url)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())
        files.append(url)
    return files
