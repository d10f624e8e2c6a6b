"""Static images of the pipeline's charts: ``python -m slimcore.render_plots`` (``make plots``).

The charts are defined once, by ``dvc.yaml``'s ``plots:`` and the vega-lite templates in
``.dvc/plots/``. This module asks DVC for the filled specs (``dvc plots show --json``, or
``dvc plots diff --json REV...``) and renders each with vl-convert, which bundles Vega and
Vega-Lite and needs no network and no browser. The output names are the plot ids in lower case
with dashes (``top-1 vs FLOPs`` -> ``top-1-vs-flops.png``).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from slimcore.console import console

# The Vega-Lite release vl-convert compiles with: the one vendored for the browser (vendor/vega/).
VEGA_LITE_VERSION = "6.4"
FORMATS = ("png", "svg")
DEFAULT_OUT = Path("docs/plots")
PNG_SCALE = 2.0  # pixels per CSS pixel: sharp on high-density screens


class PlotsError(RuntimeError):
    """DVC could not produce the plots (no data, a broken template, a bad revision)."""


def slug(name: str) -> str:
    """A plot id as a file name: ``top-1 vs FLOPs`` -> ``top-1-vs-flops``."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "plot"


def dvc_plots_json(revs: Sequence[str] = (), repo: Path = Path(".")) -> dict[str, Any]:
    """``dvc plots show --json`` (``dvc plots diff --json REVS`` with revisions), parsed."""
    command = [sys.executable, "-m", "dvc", "plots", *(("diff", *revs) if revs else ("show",)), "--json"]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PlotsError(f"{' '.join(command[2:])} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def plot_errors(plots_json: dict[str, Any]) -> list[str]:
    """DVC's errors, one line each (e.g. a revision whose CSV predates a template's fields)."""
    return [f"{e.get('name', '?')} @ {e.get('rev', '?')}: {e.get('msg') or e.get('type')}"
            for e in plots_json.get("errors") or []]


def vega_lite_specs(plots_json: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The filled vega-lite spec of every vega plot in ``dvc plots ... --json`` output, by plot id."""
    specs = {name: entry["content"] for name, entries in plots_json.get("data", {}).items()
             for entry in entries if entry.get("type") == "vega" and entry.get("content")}
    if not specs:
        raise PlotsError("dvc plots found no data: run `dvc repro` first (metrics/plots/*.csv)"
                         + "".join(f"\n  {line}" for line in plot_errors(plots_json)))
    return specs


def compact_png(data: bytes) -> bytes:
    """The same pixels, re-encoded with Pillow's best compression (vl-convert's PNGs are ~10x larger)."""
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.save(out, "PNG", optimize=True)
    return out.getvalue()


def render(spec: dict[str, Any], fmt: str) -> bytes:
    """One vega-lite spec as PNG or SVG bytes, offline (vl-convert's bundled Vega-Lite)."""
    import vl_convert

    if fmt == "png":
        return compact_png(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=PNG_SCALE))
    if fmt == "svg":
        return vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION).encode()
    raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")


def render_all(specs: dict[str, dict[str, Any]], out: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write every spec in every format under ``out``; returns the files written, in order."""
    from slimcore.checkpoint import atomic_write_bytes

    written = []
    for name, spec in specs.items():
        for fmt in formats:
            path = out / f"{slug(name)}.{fmt}"
            atomic_write_bytes(path, render(spec, fmt))
            written.append(path)
    return written


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="folder for the images")] = DEFAULT_OUT,
    fmt: Annotated[list[str] | None, typer.Option("--format", help="png and/or svg (repeatable)")] = None,
    rev: Annotated[list[str] | None, typer.Option(help="revisions to compare, as `dvc plots diff REV...` "
                                                          "(repeatable)")] = None,
) -> None:
    """Render dvc.yaml's plots (the workspace, or several revisions) to static images."""
    fmt, rev = fmt or ["png"], rev or []
    bad = [f for f in fmt if f not in FORMATS]
    if bad:
        raise typer.BadParameter(f"unknown format {', '.join(bad)}; use {' or '.join(FORMATS)}", param_hint="--format")
    try:
        plots_json = dvc_plots_json(rev)
        written = render_all(vega_lite_specs(plots_json), out, fmt)
    except PlotsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    for line in plot_errors(plots_json):  # drawn without the data DVC could not read
        console.print(f"[yellow]warning:[/] {line}")
    for path in written:
        console.print(f"wrote {path}")


if __name__ == "__main__":
    app()
