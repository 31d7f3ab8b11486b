"""Reports: image grids and labelled sample sheets (PNG), training curves (PNG), result tables (JSON + Markdown).

Everything is drawn with PIL (matplotlib is not a dependency): curves get axes, "nice" ticks, grid lines and a
legend, rendered at twice the size and downsampled so lines and text are antialiased. Text uses PIL's built-in
scalable font, so output does not depend on the fonts a machine has installed.

Files are written atomically. The functions added here refuse to replace an existing file unless called with
``overwrite=True`` (``FileExistsError`` naming the path): a report is evidence, and re-running an analysis into
the same folder should not silently change it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from persguard_jax.io import atomic_write, read_jsonl, unit_to_uint8
from persguard_jax.io import save_png  # noqa: F401  (moved to io; ``from persguard_jax.report import save_png`` works)

# matplotlib's "tab10": distinguishable, and familiar from every other plot a reader has seen
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
_SS = 2  # supersampling factor for antialiased drawing


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(size)))


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


# --------------------------------------------------------------------------- image sheets

def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(N, H, W, 3)`` images in [0, 1] into one uint8 ``(rows*H, cols*W, 3)`` array, white gaps."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"image_grid expects (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), 255, np.uint8)
    for i, img in enumerate(unit_to_uint8(images)):
        r, col = divmod(i, ncols)
        grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = img
    return grid


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a single word wider than that is cut with an ellipsis."""
    lines: list[str] = []
    for word in str(text).split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and _text_size(font, trial)[0] <= width:
            lines[-1] = trial
        else:
            while _text_size(font, word)[0] > width and len(word) > 1:
                word = word[:-2] + "…"  # one character shorter each time, ellipsis kept
            lines.append(word)
    return lines or [""]


def labelled_grid(images: np.ndarray, row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, *, pad: int = 2, scale: int | None = None,
                  font_size: int | None = None) -> np.ndarray:
    """A grid with a text label left of each row and above each column (before/after sample sheets).

    ``images`` ``(rows * cols, H, W, 3)`` in [0, 1], row-major. The number of columns is ``len(col_labels)``, else
    ``N / len(row_labels)``, else a square-ish grid. Small images are enlarged by an integer ``scale`` (default:
    to about 128 pixels, nearest neighbour, so pixels stay visible) to leave room for readable labels.
    Returns uint8 ``(height, width, 3)``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"labelled_grid expects (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, _ = images.shape
    if col_labels is not None:
        ncols = len(col_labels)
    elif row_labels is not None:
        ncols = math.ceil(n / max(len(row_labels), 1))
    else:
        ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    for name, labels, count in (("row_labels", row_labels, nrows), ("col_labels", col_labels, ncols)):
        if labels is not None and len(labels) != count:
            raise ValueError(f"labelled_grid: {len(labels)} {name} for a {nrows}x{ncols} grid of {n} images")
    scale = scale or max(1, round(128 / max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    grid = Image.fromarray(image_grid(images, ncols=ncols, pad=pad))
    font = _font(font_size or min(28, max(11, min(h, w) // 9)))
    line_h = _text_size(font, "Ag")[1] + 4
    margin = 6
    left = 0
    if row_labels is not None:
        left = min(max(_text_size(font, str(s))[0] for s in row_labels), 3 * w) + 2 * margin
    top = 0
    col_lines = [_wrap(s, font, w) for s in col_labels] if col_labels is not None else []
    if col_lines:
        top = max(len(lines) for lines in col_lines) * line_h + 2 * margin
    sheet = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    sheet.paste(grid, (left, top))
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(col_lines):
        x_mid = left + c * (w + pad) + w / 2
        y = top - margin - len(lines) * line_h
        for line in lines:
            draw.text((x_mid, y), line, fill="black", font=font, anchor="ma")
            y += line_h
    for r, label in enumerate(row_labels or []):
        lines = _wrap(label, font, left - 2 * margin)
        y = top + r * (h + pad) + h / 2 - len(lines) * line_h / 2
        for line in lines:
            draw.text((left - margin, y), line, fill="black", font=font, anchor="ra")
            y += line_h
    return np.asarray(sheet)


# --------------------------------------------------------------------------- curves

def _nice_ticks(lo: float, hi: float, target: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]; ``integer``: whole numbers only
    (training steps)."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1) if integer else step
    first = math.ceil(lo / step - 1e-9)
    ticks = [(first + i) * step for i in range(int(math.floor(hi / step + 1e-9)) - first + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick positions (log10 values) for a log axis over [lo, hi] (log10 values too): decades when the range
    spans them, else 1-2-5 steps, else linear nice values."""
    decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    if len(decades) >= 2:
        every = math.ceil(len(decades) / 6)
        return [float(d) for d in decades[::every]]
    ticks = [math.log10(m) + e for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
    return ticks if len(ticks) >= 2 else [math.log10(v) for v in _nice_ticks(10 ** lo, 10 ** hi) if v > 0]


def _tick_label(value: float) -> str:
    return f"{value:.4g}"


def _padded(lo: float, hi: float, frac: float) -> tuple[float, float]:
    """[lo, hi] widened by ``frac`` of its span each side (a flat series gets a unit-sized window)."""
    span = hi - lo if hi > lo else (abs(lo) or 1.0)
    return lo - frac * span, hi + frac * span


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential moving average, debiased so the start is not pulled towards 0;
    non-finite values are skipped (kept as NaN) and do not poison the average."""
    if weight <= 0:
        return values
    out = np.full_like(values, np.nan)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
            out[i] = avg / norm
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key``; records without it are skipped, non-finite values ("nan" strings) become NaN."""
    steps, values = [], []
    for rec in records:
        if key in rec and "step" in rec:
            try:
                v = float(rec[key])
            except (TypeError, ValueError):
                v = math.nan
            steps.append(float(rec["step"]))
            values.append(v)
    return np.asarray(steps, float), np.asarray(values, float)


def _polylines(xs: np.ndarray, ys: np.ndarray) -> list[list[tuple[float, float]]]:
    """Runs of consecutive finite points (a NaN breaks the line instead of drawing to nowhere)."""
    runs, run = [], []
    for x, y in zip(xs, ys):
        if np.isfinite(x) and np.isfinite(y):
            run.append((float(x), float(y)))
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: list[tuple[str, np.ndarray,
                np.ndarray, np.ndarray | None]], *, xlim: tuple[float, float], log_y: bool, font, xlabel: bool,
                s: int) -> None:
    """One axes: frame, grid, ticks, curves (raw faint when smoothed) and a legend, inside ``box``."""
    x0, y0, x1, y1 = box
    ys = [v for _, _, raw, sm in series for v in (raw, sm) if v is not None]
    finite = np.concatenate([v[np.isfinite(v)] for v in ys]) if ys else np.zeros(0)
    if log_y:
        finite = np.log10(finite[finite > 0])
    # margins as matplotlib's: the extreme points do not sit on the frame
    lo, hi = _padded(*((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)), 0.05)
    yticks = _log_ticks(lo, hi) if log_y else _nice_ticks(lo, hi)
    xlo, xhi = _padded(*xlim, 0.02)
    xticks = _nice_ticks(xlo, xhi, integer=True)
    px = lambda x: x0 + (x - xlo) / ((xhi - xlo) or 1) * (x1 - x0)
    py = lambda y: y1 - (y - lo) / ((hi - lo) or 1) * (y1 - y0)
    for t in yticks:
        draw.line([(x0, py(t)), (x1, py(t))], fill="#e6e6e6", width=s)
        label = _tick_label(10 ** t if log_y else t)
        draw.text((x0 - 6 * s, py(t)), label, fill="#333333", font=font, anchor="rm")
    for t in xticks:
        draw.line([(px(t), y0), (px(t), y1)], fill="#e6e6e6", width=s)
        draw.text((px(t), y1 + 5 * s), _tick_label(t), fill="#333333", font=font, anchor="ma")
    for i, (name, steps, raw, sm) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        layers = [(raw, _fade(colour), s), (sm, colour, 2 * s)] if sm is not None else [(raw, colour, 2 * s)]
        for values, fill, width in layers:
            vals = np.where(values > 0, np.log10(np.where(values > 0, values, 1)), np.nan) if log_y else values
            for run in _polylines(steps, vals):
                points = [(px(x), py(y)) for x, y in run]
                if len(points) == 1:
                    (cx, cy), r = points[0], 2 * s
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
                else:
                    draw.line(points, fill=fill, width=width, joint="curve")
    draw.rectangle([x0, y0, x1, y1], outline="#333333", width=s)
    if xlabel:
        draw.text(((x0 + x1) / 2, y1 + 5 * s + _text_size(font, "0")[1] + 8 * s), "step", fill="#333333",
                  font=font, anchor="ma")
    # legend, top right, on a white box so curves behind it stay readable
    line_h = _text_size(font, "Ag")[1] + 6 * s
    width = max(_text_size(font, name)[0] for name, *_ in series) + 40 * s
    lx1, ly0 = x1 - 8 * s, y0 + 8 * s
    lx0 = lx1 - width
    draw.rectangle([lx0, ly0, lx1, ly0 + line_h * len(series) + 6 * s], fill="white", outline="#bbbbbb", width=s)
    for i, (name, *_rest) in enumerate(series):
        cy = ly0 + 3 * s + line_h * i + line_h / 2
        draw.line([(lx0 + 6 * s, cy), (lx0 + 24 * s, cy)], fill=PALETTE[i % len(PALETTE)], width=3 * s)
        draw.text((lx0 + 30 * s, cy), name, fill="black", font=font, anchor="lm")


def _fade(colour: str, amount: float = 0.7) -> str:
    """``colour`` mixed with white (the raw curve behind its smoothed one)."""
    rgb = [int(colour[i: i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def loss_curves(metrics: str | Path | Sequence[Mapping[str, Any]], keys: Sequence[str | Sequence[str]],
                path: str | Path, *, smooth: float = 0.0, log_y: bool = False, size: tuple[int, int] | None = None,
                title: str | None = None, overwrite: bool = False) -> Path:
    """Plot training curves against ``step`` into a PNG; returns ``path``.

    ``metrics``: a ``metrics.jsonl`` path (read as ``train.metrics.read_metrics`` does: a resumed run's repeated steps
    count once) or its records. ``keys``: one panel per entry, stacked; an entry that is a list of keys shares its
    panel (one y axis, one legend), e.g. ``["loss", ["instance_loss", "prior_loss"], "grad_norm"]`` (the keys the DreamBooth step logs).
    ``smooth`` in [0, 1): TensorBoard's exponential-moving-average weight; when > 0 the raw curve is drawn faint
    behind the smoothed one. ``log_y`` for losses spanning decades (non-positive values dropped). ``size``
    ``(width, height)`` in pixels, default 800 wide and 260 per panel. Non-finite values break the line.
    """
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    path = Path(path)
    _refuse_existing([path], overwrite)
    records = read_jsonl(metrics, unique="step") if isinstance(metrics, (str, Path)) else list(metrics)
    panels = [[k] if isinstance(k, str) else list(k) for k in keys]
    if not panels or not all(panels):
        raise ValueError("loss_curves: no keys to plot")
    missing = [k for panel in panels for k in panel if not any(k in r for r in records)]
    if missing:
        have = sorted({k for r in records for k in r} - {"step", "time"})
        raise KeyError(f"loss_curves: no values for {missing} in the metrics (have {have})")
    width, height = size or (800, 260 * len(panels) + (40 if title else 0))
    s = _SS
    img = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(img)
    font = _font(12 * s)
    all_steps = np.concatenate([_series(records, k)[0] for panel in panels for k in panel])
    xlim = (float(all_steps.min()), float(all_steps.max()))
    top = 0
    if title:
        title_font = _font(16 * s)
        draw.text((width * s / 2, 10 * s), title, fill="black", font=title_font, anchor="ma")
        top = 40 * s
    panel_h = (height * s - top) / len(panels)
    left, right, pad_top, pad_bottom = 70 * s, 16 * s, 12 * s, 44 * s
    for i, panel in enumerate(panels):
        series = []
        for key in panel:
            steps, values = _series(records, key)
            series.append((key, steps, values, _smooth(values, smooth) if smooth > 0 else None))
        y_top = top + i * panel_h
        box = (left, int(y_top + pad_top), width * s - right, int(y_top + panel_h - pad_bottom))
        _draw_panel(draw, box, series, xlim=xlim, log_y=log_y, font=font, xlabel=i == len(panels) - 1, s=s)
    out = img.resize((width, height), Image.LANCZOS)
    atomic_write(path, lambda tmp: out.save(tmp, format="PNG"))
    return path


# --------------------------------------------------------------------------- result tables

def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy/jax scalars -> numbers, arrays -> lists, paths -> strings, non-finite floats ->
    the strings "nan"/"inf"/"-inf" (as metrics.jsonl writes them: strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / jax arrays and scalars
        arr = np.asarray(value)
        return _jsonable(arr.tolist()) if arr.ndim else _jsonable(arr.item())
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    raise TypeError(f"write_results: cannot store {type(value).__name__} value {value!r} in JSON")


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value).lower() if value is not None else "—"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = ", ".join(_cell(v) for v in value[:8]) + (f", … ({len(value)} values)" if len(value) > 8 else "")
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flat_rows(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` rows; nested dicts below a section's level become dotted keys."""
    rows = []
    for k in sorted(d):
        if isinstance(d[k], Mapping):
            rows += _flat_rows(d[k], f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", d[k]))
    return rows


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| metric | value |", "| --- | --- |", *[f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]]


def results_markdown(results: Mapping[str, Any], *, title: str) -> str:
    """The Markdown of ``write_results``: top-level values in one table, each nested dict its own section."""
    clean = _jsonable(results)
    lines = [f"# {title}", "", "Numbers as stored in `results.json` beside this file (4 significant digits here).", ""]
    top = [(k, v) for k, v in sorted(clean.items()) if not isinstance(v, Mapping)]
    if top:
        lines += [*_table(top), ""]
    for k in sorted(clean):
        if isinstance(clean[k], Mapping):
            rows = _flat_rows(clean[k])
            lines += [f"## {k}", "", *(_table(rows) if rows else ["(empty)"]), ""]
    return "\n".join(lines)


def write_results(out_dir: str | Path, results: Mapping[str, Any], *, title: str,
                  overwrite: bool = False, markdown: str | None = None) -> tuple[Path, Path]:
    """Write ``results.json`` (sorted keys, numbers as JSON numbers) and ``results.md`` (tables) into ``out_dir``.

    Both are checked before either is written, so a refused call leaves no half-updated pair behind.
    ``markdown`` replaces ``results_markdown``'s generic tables (``title`` is then unused) for a caller whose
    results read better in a layout of its own (``evaluate``: one row per prompt).
    """
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    _refuse_existing([json_path, md_path], overwrite)
    clean = _jsonable(results)
    text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    md = results_markdown(clean, title=title) if markdown is None else markdown
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(md, encoding="utf-8"))
    return json_path, md_path
