"""The bottom of the package: atomic writes that never leave half a file, JSON / JSONL round trips, and the exact
uint8 <-> float image conversions. Numpy only; runs in well under a second."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from persguard_jax import io


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half of the new cont")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(path, failing)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left behind


def test_atomic_write_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "x.txt"
    io.atomic_write(path, lambda tmp: Path(tmp).write_text("one"))
    io.atomic_write(path, lambda tmp: Path(tmp).write_text("two"))
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["x.txt"]


def test_json_round_trip_and_errors(tmp_path):
    obj = {"b": [1, 2.5, None, True], "a": {"nested": "é"}}
    io.save_json(obj, tmp_path / "x.json")
    assert io.read_json(tmp_path / "x.json") == obj
    assert (tmp_path / "x.json").read_text().startswith('{\n  "a"')  # sorted and indented: stable diffs
    with pytest.raises(ValueError, match=r"missing\.json: file not found"):
        io.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(KeyError, match=r"bad\.json: not valid JSON"):
        io.read_json(tmp_path / "bad.json", error=KeyError)


def test_read_jsonl_keeps_the_last_record_per_key(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 1, "loss": 9.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert io.read_jsonl(path) == rows
    assert io.read_jsonl(path, unique="step") == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 2.0}]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    io.atomic_write(tmp_path / "results.json", lambda tmp: Path(tmp).write_text("{}"))
    with open(tmp_path / "plain.json", "w") as f:
        f.write("{}")
    assert (tmp_path / "results.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode


def test_read_jsonl_names_the_file_and_line_it_cannot_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n')  # a record cut by a kill mid-write
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a JSON record"):
        io.read_jsonl(path)


def test_uint8_float_round_trips_are_exact():
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    unit, signed = io.uint8_to_unit(every), io.uint8_to_signed(every)
    assert unit.dtype == signed.dtype == np.float32
    assert unit.min() == 0.0 and unit.max() == 1.0 and signed.min() == -1.0 and signed.max() == 1.0
    np.testing.assert_array_equal(io.unit_to_uint8(unit), every)
    np.testing.assert_array_equal(io.signed_to_uint8(signed), every)
    np.testing.assert_array_equal(io.unit_to_uint8(unit.astype(np.float64)), every)  # any float width
    # out-of-range values clip instead of wrapping around
    assert io.unit_to_uint8(np.array([-0.5, 1.5])).tolist() == [0, 255]
    assert io.signed_to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_save_png_writes_and_guards(tmp_path):
    from PIL import Image
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path = io.save_png(image, tmp_path / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    grey = io.save_png(image[..., :1], tmp_path / "grey.png")
    np.testing.assert_array_equal(np.asarray(Image.open(grey)), image[..., 0])
    with pytest.raises(FileExistsError, match="x.png"):
        io.save_png(image, path, overwrite=False)


def test_io_imports_nothing_of_the_package_or_jax():
    code = ("import sys, persguard_jax.io; "
            "print(sorted(m for m in sys.modules if m.startswith(('persguard_jax.', 'jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['persguard_jax.io']"
