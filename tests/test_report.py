"""Reports: curves from a metrics.jsonl, result tables (JSON round trip, Markdown), grids, and the overwrite guard."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from persguard_jax.report import image_grid, labelled_grid, loss_curves, save_png, write_results


@pytest.fixture
def metrics_jsonl(tmp_path):
    """A run's metrics.jsonl as MetricsWriter writes it: a NaN stored as a string, a resumed run repeating steps."""
    rng = np.random.default_rng(0)
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    lines = []
    for step in list(range(0, 100, 10)) + [80, 90, 100]:
        loss = math.exp(-step / 40) + 0.05 * rng.random()
        rec = {"step": step, "time": 0.0, "loss": loss, "loss_prior": 0.5 * loss, "grad_norm": 1 + rng.random()}
        lines.append(json.dumps(dict(rec, loss="nan") if step == 50 else rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def _png(path):
    with Image.open(path) as img:
        img.load()  # decodes every byte: a truncated or corrupt file fails here
        return img.format, img.size, np.asarray(img.convert("RGB"))


def test_loss_curves_writes_a_png(metrics_jsonl, tmp_path):
    out = loss_curves(metrics_jsonl, ["loss", ["loss", "loss_prior"], "grad_norm"], tmp_path / "curves.png",
                      smooth=0.6, size=(640, 480), title="tiny run")
    fmt, size, pixels = _png(out)
    assert out == tmp_path / "curves.png" and fmt == "PNG" and size == (640, 480)
    assert (pixels != 255).any(axis=-1).mean() > 0.02  # something was drawn
    coloured = (np.abs(pixels.astype(int) - [31, 119, 180]).sum(-1) < 40).sum()  # the first series' blue
    assert coloured > 100
    # default size: 800 wide, 260 per panel; records instead of a file; log axis
    from persguard_jax.train.metrics import read_metrics
    out = loss_curves(read_metrics(metrics_jsonl), ["loss"], tmp_path / "log.png", log_y=True)
    assert _png(out)[:2] == ("PNG", (800, 260))


def test_loss_curves_errors(metrics_jsonl, tmp_path):
    with pytest.raises(KeyError, match="accuracy"):
        loss_curves(metrics_jsonl, ["loss", "accuracy"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="smooth"):
        loss_curves(metrics_jsonl, ["loss"], tmp_path / "x.png", smooth=1.0)
    assert not (tmp_path / "x.png").exists()


def test_loss_curves_never_overwrites_unless_asked(metrics_jsonl, tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=str(path)):
        loss_curves(metrics_jsonl, ["loss"], path)
    assert path.read_bytes() == b"keep me"
    loss_curves(metrics_jsonl, ["loss"], path, overwrite=True, size=(300, 200))
    assert _png(path)[:2] == ("PNG", (300, 200))


RESULTS = {
    "clip_i": np.float32(0.8125),        # numpy scalars become plain numbers
    "num_images": np.int64(8),
    "fid_clip": float("nan"),            # strict JSON has no NaN: stored as the string, as metrics.jsonl does
    "model": "out/model",
    "protected": {"clip_t": 0.21, "pattern_score": 0.9, "per_prompt": {"a photo of sks dog": 0.25}},
    "clean": {"clip_t": 0.3, "lpips_style": 0.0},
    "seeds": (0, 1, 2),
}


def test_write_results_round_trip_and_markdown(tmp_path):
    json_path, md_path = write_results(tmp_path / "eval", RESULTS, title="Protection on the synthetic world")
    text = json_path.read_text()
    loaded = json.loads(text)
    assert loaded == {"clip_i": 0.8125, "num_images": 8, "fid_clip": "nan", "model": "out/model",
                      "protected": {"clip_t": 0.21, "pattern_score": 0.9, "per_prompt": {"a photo of sks dog": 0.25}},
                      "clean": {"clip_t": 0.3, "lpips_style": 0.0}, "seeds": [0, 1, 2]}
    assert isinstance(loaded["clip_i"], float) and isinstance(loaded["num_images"], int)
    assert list(loaded) == sorted(loaded) and list(loaded["protected"]) == sorted(loaded["protected"])
    md = md_path.read_text()
    assert md.startswith("# Protection on the synthetic world\n")
    for key in ("clip_i", "num_images", "fid_clip", "model", "seeds", "## protected", "## clean", "| clip_t |",
                "| pattern_score |", "| per_prompt.a photo of sks dog |", "| lpips_style |"):
        assert key in md, key
    assert "| clip_i | 0.8125 |" in md and "| seeds | 0, 1, 2 |" in md
    # every row of every table has the two columns
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows and all(line.count(" | ") == 1 for line in rows)


def test_write_results_never_overwrites_unless_asked(tmp_path):
    write_results(tmp_path, {"a": 1.0}, title="first")
    with pytest.raises(FileExistsError, match="results.json"):
        write_results(tmp_path, {"a": 2.0}, title="second")
    (tmp_path / "results.json").unlink()  # one of the pair is enough to refuse, and nothing is written
    with pytest.raises(FileExistsError, match="results.md"):
        write_results(tmp_path, {"a": 2.0}, title="second")
    assert not (tmp_path / "results.json").exists()
    write_results(tmp_path, {"a": 2.0}, title="second", overwrite=True)
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 2.0}
    assert "# second" in (tmp_path / "results.md").read_text()


def test_write_results_refuses_values_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="object"):
        write_results(tmp_path, {"a": object()}, title="t")


def test_grids(tmp_path):
    images = np.random.default_rng(0).random((6, 8, 8, 3))
    grid = image_grid(images, ncols=3, pad=2)
    assert grid.shape == (2 * 8 + 2, 3 * 8 + 2 * 2, 3) and grid.dtype == np.uint8
    sheet = labelled_grid(images, ["before", "after protection"], ["seed 0", "seed 1", "a long prompt here"])
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    # images are enlarged to ~128 px (8 px -> x16) and labels add room on the left and the top
    assert sheet.shape[0] > 2 * 128 and sheet.shape[1] > 3 * 128
    assert save_png(sheet, tmp_path / "sheet.png") == tmp_path / "sheet.png"
    assert _png(tmp_path / "sheet.png")[1] == (sheet.shape[1], sheet.shape[0])
    with pytest.raises(ValueError, match="row_labels"):
        labelled_grid(images, ["one", "two", "three"], ["a", "b", "c"])
    with pytest.raises(FileExistsError):
        save_png(sheet, tmp_path / "sheet.png", overwrite=False)
