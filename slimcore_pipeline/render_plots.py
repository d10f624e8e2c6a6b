"""Static images of the pipeline's charts: ``python -m slimcore_pipeline.render_plots`` (``make plots``).

The charts are defined once, by ``dvc.yaml``'s ``plots:`` and the vega-lite templates in
``.dvc/plots/``. This module asks DVC for the filled specs (``dvc plots show --json``, or
``dvc plots diff --json REV...``) and renders each with vl-convert, which bundles Vega and
Vega-Lite and needs no network and no browser. The output names are the plot ids in lower case
with dashes (``top-1 vs FLOPs`` -> ``top-1-vs-flops.png``).

Every chart is checked before it is written (:func:`chart_problems`): Vega lays it out (its scene
graph), and a panel with no visible data mark, a mark that the axis cannot place (a 0 or a
negative value on a log axis), an axis without tick labels, or two overlapping text labels is
reported; ``make plots`` prints each as a warning, ``--strict`` makes them an error.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from slimcore_pipeline.console import console

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


def fill_specs(tables: dict[str, bytes], revs: Sequence[str] = ("workspace",),
               dvc_yaml: Path = Path("dvc.yaml"), templates: Path = Path(".dvc/plots")) -> dict[str, dict[str, Any]]:
    """The vega-lite specs ``dvc plots show`` builds from ``dvc_yaml``'s plots, with the data
    ``tables`` (file name -> CSV bytes, e.g. :func:`slimcore_pipeline.plotdata.plot_tables`) for every
    revision of ``revs``: what :func:`chart_problems` checks without a DVC repository."""
    import csv

    import yaml
    from dvc.render.converter.vega import VegaConverter
    from dvc_render.vega import VegaRenderer

    defs = {name: spec for entry in yaml.safe_load(dvc_yaml.read_text())["plots"] for name, spec in entry.items()}
    specs = {}
    for name, spec in defs.items():
        ((file, _),) = spec["y"].items()
        rows = list(csv.DictReader(io.StringIO(tables[Path(file).name].decode())))
        points: list[dict[str, Any]] = []
        props: dict[str, Any] = {}
        for rev in revs:
            more, props = VegaConverter(name, {file: rows}, dict(spec)).flat_datapoints(rev)
            points += more
        props.update(template_dir=str(templates), revs_with_datapoints=list(revs))
        specs[name] = VegaRenderer(points, name, **props).get_filled_template()
    return specs


_POSITIONS = ("x", "y", "x2", "y2", "width", "height")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _text_box(item: dict[str, Any], font_size: float) -> tuple[float, float, float, float] | None:
    """A text item's box (x0, y0, x1, y1) in its group's pixels, estimated from its length."""
    text = item.get("text")
    if not text or not _finite(item.get("x")) or not _finite(item.get("y")):
        return None
    text = "".join(text) if isinstance(text, list) else str(text)
    size = float(item.get("fontSize") or font_size)
    w, h = 0.58 * size * len(text), size
    if round(float(item.get("angle") or 0)) % 180 == 90:
        w, h = h, w  # rotated a quarter turn: its length runs along y
        align = {"left": 1.0, "center": 0.5, "right": 0.0}.get(item.get("align", "left"), 1.0)
        x0 = item["x"] - w / 2
        y0 = item["y"] - h * align
    else:
        align = {"left": 0.0, "center": 0.5, "right": 1.0}.get(item.get("align", "left"), 0.0)
        baselines = {"top": 0.0, "middle": 0.5, "bottom": 1.0, "alphabetic": 0.8}
        base = baselines.get(item.get("baseline", "alphabetic"), 0.8)
        x0 = item["x"] + float(item.get("dx") or 0) - w * align
        y0 = item["y"] + float(item.get("dy") or 0) - h * base
    return x0, y0, x0 + w, y0 + h


def _overlap(a: tuple[float, ...], b: tuple[float, ...], slack: float = 1.0) -> bool:
    return a[0] + slack < b[2] and b[0] + slack < a[2] and a[1] + slack < b[3] and b[1] + slack < a[3]


def _spans(item: dict[str, Any], axis: str, length: float) -> bool:
    """A rule item drawn across the whole panel along ``axis`` (or with no position on it)."""
    a, b = item.get(axis), item.get(f"{axis}2")
    if not _finite(a) or not _finite(b):
        return not _finite(a) and not _finite(b)
    return min(a, b) <= 1 and max(a, b) >= length - 1


def _cell_problems(cell: dict[str, Any], where: str) -> list[str]:
    """What is wrong with one panel of a laid-out chart (see :func:`chart_problems`)."""
    problems: list[str] = []
    width, height = float(cell.get("width") or 0), float(cell.get("height") or 0)
    visible, boxes = 0, []
    for mark in cell.get("items", []):
        role = mark.get("role")
        if role == "axis":
            for axis in mark.get("items", []):
                parts = {m.get("role"): m.get("items", []) for m in axis.get("items", [])}
                shown = [it for it in parts.get("axis-label", []) if it.get("text") and (it.get("opacity", 1) or 0) > 0]
                if "axis-domain" in parts and "axis-label" in parts and not shown:
                    problems.append(f"{where}: an axis ({axis.get('orient')}) has no tick labels")
                labels = [(box, str(it["text"])) for it in shown if (box := _text_box(it, 10.0)) is not None]
                problems += [f"{where}: tick labels {a!r} and {b!r} of the {axis.get('orient')} axis overlap"
                             for i, (box_a, a) in enumerate(labels) for box_b, b in labels[i + 1:]
                             if _overlap(box_a, box_b)]
            continue
        if role != "mark" or not mark.get("items"):
            continue
        items = mark["items"]
        unplaced = [it for it in items if any(k in it and not _finite(it[k]) for k in _POSITIONS)
                    or not any(_finite(it.get(k)) for k in ("x", "y"))]
        if unplaced:
            problems.append(f"{where}: {len(unplaced)} of {len(items)} {mark['marktype']} marks "
                            f"({mark.get('name')}) cannot be placed on the axes")
        for it in items:
            if it in unplaced:
                continue
            if mark["marktype"] == "text":
                box = _text_box(it, 11.0)
                if box is not None and (it.get("opacity", 1) or 0) > 0:
                    boxes.append((box, str(it.get("text"))))
                continue
            if mark["marktype"] == "rect" and not (abs(float(it.get("width") or 0)) >= 0.5
                                                   and abs(float(it.get("height") or 0)) >= 0.5):
                continue  # a zero-height bar: present, but nothing to see
            inside = all(-1 <= it[k] <= width + 1 for k in ("x", "x2") if _finite(it.get(k))) and \
                all(-1 <= it[k] <= height + 1 for k in ("y", "y2") if _finite(it.get(k)))
            visible += inside
    if not visible:
        problems.append(f"{where}: no visible data mark")
    for i, (a, text_a) in enumerate(boxes):
        for b, text_b in boxes[i + 1:]:
            if _overlap(a, b):
                problems.append(f"{where}: labels {text_a!r} and {text_b!r} overlap")
    return problems


def _cells(node: Any, where: str) -> Any:
    """Every panel (a group holding data marks) of a scene graph, with a name for messages."""
    if isinstance(node, dict):
        items = node.get("items", [])
        if node.get("marktype") == "group" and node.get("role") in ("scope", "frame"):
            for i, group in enumerate(items):
                inner = [m for m in group.get("items", []) if isinstance(m, dict)]
                if any(m.get("role") == "mark" and m.get("marktype") != "group" for m in inner):
                    yield group, f"{where} panel {i + 1}"
                for m in inner:
                    yield from _cells(m, where)
        else:
            for item in items:
                yield from _cells(item, where)


def chart_problems(spec: dict[str, Any], name: str = "chart") -> list[str]:
    """Lay ``spec`` out with Vega (offline) and list what a reader could not see: a panel without a
    visible data mark, marks its axes cannot place (NaN positions: a 0 on a log scale), an axis
    without tick labels, overlapping text labels. Empty: the chart shows its data."""
    import vl_convert

    problems = _unmatched_filters(spec, name)
    scene = vl_convert.vegalite_to_scenegraph(spec, vl_version=VEGA_LITE_VERSION)
    cells = list(_cells(scene["scenegraph"], name))
    if not cells:
        return [*problems, f"{name}: no panel with data marks"]
    return problems + [problem for cell, where in cells for problem in _cell_problems(cell, where)]


def _unmatched_filters(spec: dict[str, Any], name: str) -> list[str]:
    """A row or layer whose filter (``{"field": F, "equal"/"oneOf": ...}``) selects none of the
    data draws nothing, and Vega lays out no panel to check: e.g. curves without ``val_top1`` rows.
    (Filters on ``label`` select optional marks, such as the bar of exact zeros, and are skipped.)"""
    values = (spec.get("data") or {}).get("values")
    if not isinstance(values, list):
        return []
    problems = []
    stack: list[Any] = [spec]
    seen: set[tuple[str, str]] = set()
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack += node
            continue
        if not isinstance(node, dict):
            continue
        stack += list(node.values())
        flt = node.get("filter")
        if not isinstance(flt, dict) or "field" not in flt or flt["field"] == "label":
            continue
        wanted = [flt["equal"]] if "equal" in flt else flt.get("oneOf", [])
        for value in wanted:
            key = (flt["field"], str(value))
            if key not in seen and not any(str(row.get(flt["field"])) == str(value) for row in values):
                seen.add(key)
                problems.append(f"{name}: no data has {flt['field']} = {value!r}: what it selects is not drawn")
    return problems


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
    from slimcore_pipeline.process import atomic_write_bytes

    written = []
    for name, spec in specs.items():
        for fmt in formats:
            path = out / f"{slug(name)}.{fmt}"
            atomic_write_bytes(path, render(spec, fmt))
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# what docs/plots.md says about the charts: generated from the metrics, never typed by hand
# ---------------------------------------------------------------------------------------------

DOC_BLOCKS = ("tradeoff", "gamma", "sensitivity")


def _pct(x: float) -> str:
    """An accuracy fraction in % (``n/a`` for a NaN: a model that could not be evaluated)."""
    return f"{100 * x:.2f}%" if _finite(x) else "n/a"


def _prune_reports(metrics: Path) -> dict[str, dict[str, Any]]:
    """``metrics/prune/ARCH-T.json``, by arch and target tag."""
    prunes: dict[str, dict[str, Any]] = {}
    for path in sorted((metrics / "prune").glob("*.json")):
        report = json.loads(path.read_text())
        arch = path.stem[: -len(report["target"]) - 1]
        prunes.setdefault(arch, {})[report["target"]] = report
    return prunes


def _tradeoff_line(arch: str, ev: dict[str, Any], reports: dict[str, Any], tags: list[str]) -> str:
    """One arch in the tradeoff block: the baseline, then per target its own sparse model, pruned and fine-tuned."""
    from slimcore.targets import target_label
    from slimcore_pipeline.noise import image_points, within_noise

    n, base = ev["baseline"].get("test_images"), ev["baseline"]["top1"]
    size = (f"{n} test images, one image = {image_points(n):.2f} pt" if n else "test-set size not recorded")
    cells = []
    for tag in tags:
        pruned, tuned = ev[f"pruned-{tag}"]["top1"], ev[f"finetuned-{tag}"]["top1"]
        sparse = ev.get(f"sparse-{tag}", {}).get("top1")
        verdict = ("within noise of" if n and within_noise(tuned, base, n) else
                   "equal to" if tuned == base else "above" if tuned > base else "below")
        trained = "" if sparse is None else f"its sparse model {_pct(sparse)}, "
        cells.append(f"{target_label(tag, reports[tag])}: {trained}{_pct(pruned)} pruned, "
                     f"{_pct(tuned)} after fine-tuning ({verdict} the baseline)")
    return f"- **{arch}** ({size}): dense baseline {_pct(base)}; " + "; ".join(cells) + "."


def _gamma_line(arch: str, reports: dict[str, Any], tags: list[str]) -> str:
    """One arch in the gamma block: each target's threshold, on its own sparse model."""
    from slimcore.targets import target_label

    marks = []
    for tag in tags:
        t = reports[tag]["threshold"]
        marks.append(f"{target_label(tag, reports[tag])}: "
                     + ("0 (only channels zeroed by sparse training removed)" if t <= 0 else f"{t:.3g}"))
    return f"- **{arch}**: thresholds (each on its target's own sparse model) " + "; ".join(marks) + "."


def _sensitivity_line(arch: str, metrics: Path, reports: dict[str, Any], tags: list[str]) -> str | None:
    """One arch in the sensitivity block, from ``metrics/sensitivity/ARCH-T.json`` (None without any)."""
    from slimcore.targets import target_label
    from slimcore_pipeline.noise import image_points

    cells, sizes = [], []
    for tag in tags:
        path = metrics / "sensitivity" / f"{arch}-{tag}.json"
        if not path.is_file():
            continue
        sens = json.loads(path.read_text())
        sizes.append(sens.get("val_images"))
        cells.append(f"{target_label(tag, reports[tag])}'s sparse model: unpruned validation top-1 "
                     f"{sens['reference_top1']:.2f}%, safe ratio {100 * sens['safe_ratio']:.4g}% "
                     f"(drop <= {sens['max_drop']:g} pt)")
    if not cells:
        return None
    vn = sizes[0]
    return (f"- **{arch}**: " + "; ".join(cells)
            + (f"; {vn} validation images, one image = {image_points(vn):.2f} pt." if vn else "."))


def describe(metrics: Path = Path("metrics")) -> dict[str, str]:
    """The sentences of docs/plots.md about each chart's data, from ``metrics`` (eval.json, prune/,
    sensitivity/ARCH-T.json): ``{block name: markdown}``. ``make plots`` writes them between the page's
    ``<!-- generated: NAME -->`` markers; tests/test_plots.py checks them on a small metrics folder."""
    from slimcore.targets import parse_target

    evals = json.loads((metrics / "eval.json").read_text())
    prunes = _prune_reports(metrics)
    tradeoff, gamma, sensitivity = [], [], []
    for arch, ev in evals.items():
        reports = prunes.get(arch, {})
        tags = sorted(reports, key=lambda t: (parse_target(t).sort_key(), reports[t]["requested_ratio"]))
        tradeoff.append(_tradeoff_line(arch, ev, reports, tags))
        if tags:
            gamma.append(_gamma_line(arch, reports, tags))
        line = _sensitivity_line(arch, metrics, reports, tags)
        if line is not None:
            sensitivity.append(line)
    return {"tradeoff": "\n".join(tradeoff), "gamma": "\n".join(gamma), "sensitivity": "\n".join(sensitivity)}


def fill_doc(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each ``<!-- generated: NAME -->...<!-- /generated -->`` block replaced."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->)(?:(?!<!--).)*?(<!-- /generated -->)", re.S)
        if not pattern.search(text):
            raise PlotsError(f"no <!-- generated: {name} --> block to fill")
        text = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(2)}", text)
    return text


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="folder for the images")] = DEFAULT_OUT,
    fmt: Annotated[list[str] | None, typer.Option("--format", help="png and/or svg (repeatable)")] = None,
    rev: Annotated[list[str] | None, typer.Option(help="revisions to compare, as `dvc plots diff REV...` "
                                                          "(repeatable)")] = None,
    strict: Annotated[bool, typer.Option(help="exit 1 when a chart fails its check (an empty panel, "
                                              "overlapping labels...)")] = False,
    docs: Annotated[Path | None, typer.Option(help="a page whose generated blocks to refresh from metrics/ "
                                                   "(make plots: docs/plots.md)")] = None,
) -> None:
    """Render dvc.yaml's plots (the workspace, or several revisions) to static images."""
    fmt, rev = fmt or ["png"], rev or []
    bad = [f for f in fmt if f not in FORMATS]
    if bad:
        raise typer.BadParameter(f"unknown format {', '.join(bad)}; use {' or '.join(FORMATS)}", param_hint="--format")
    try:
        plots_json = dvc_plots_json(rev)
        specs = vega_lite_specs(plots_json)
        written = render_all(specs, out, fmt)
    except PlotsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    for line in plot_errors(plots_json):  # drawn without the data DVC could not read
        console.print(f"[yellow]warning:[/] {line}")
    for path in written:
        console.print(f"wrote {path}")
    if docs is not None and not rev:
        from slimcore_pipeline.process import atomic_write_bytes

        atomic_write_bytes(docs, fill_doc(docs.read_text(), describe()).encode())
        console.print(f"wrote {docs} (the sentences about the charts, from metrics/)")
    problems = [p for name, spec in specs.items() for p in chart_problems(spec, name)]
    for line in problems:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    if problems and strict:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
