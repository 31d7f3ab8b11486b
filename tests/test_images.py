"""Instance photo folders: every format and mode users have loads upright, as RGB, centre-cropped, in [-1, 1];
every broken folder gives one error naming all the bad files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, features

from persguard_jax.data.images import (IMAGE_SUFFIXES, ImageFileError, ImageFolderError, load_folder, load_image,
                                       scan_folder)
from persguard_jax.io import signed_to_uint8 as to_uint8

RED, BLUE, GREEN, GREY = (255, 0, 0), (0, 0, 255), (0, 200, 0), (128, 128, 128)
HAS_WEBP = features.check("webp")


def _solid(size, colour, mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def _halves(size, left, right) -> Image.Image:
    """Left half one colour, right half another."""
    w, h = size
    arr = np.empty((h, w, 3), np.uint8)
    arr[:, : w // 2], arr[:, w // 2:] = left, right
    return Image.fromarray(arr)


def _close(pixel, colour, atol=12) -> bool:
    """``pixel`` (in [-1, 1]) is ``colour`` (uint8) up to JPEG/resampling error."""
    return bool(np.all(np.abs(to_uint8(pixel).astype(int) - np.array(colour)) <= atol))


# ---------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("name", ["a.jpg", "a.jpeg", "a.png", "A.JPG", "a.webp"])
def test_each_format_loads(tmp_path, name):
    if name.endswith(".webp") and not HAS_WEBP:
        pytest.skip("this Pillow build has no WebP support")
    _solid((80, 96), (200, 50, 100)).save(tmp_path / name)
    out = load_image(tmp_path / name, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert _close(out, (200, 50, 100), atol=6)


def test_webp_is_accepted_by_suffix():
    assert ".webp" in IMAGE_SUFFIXES


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    # Stored landscape 60x40, red left / blue right; tag 6 means "rotate 90 clockwise to display", so the stored
    # left edge ends up on top (tag 8: at the bottom). Without the rotation the output would split left/right.
    exif = Image.Exif()
    exif[0x0112] = orientation
    _halves((60, 40), RED, BLUE).save(tmp_path / "p.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "p.jpg", 32, min_size=8)
    for col in (2, 16, 29):
        assert _close(out[3, col], top, atol=40), (col, to_uint8(out[3, col]))
        assert _close(out[28, col], bottom, atol=40), (col, to_uint8(out[28, col]))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(tmp_path, mode):
    arr = np.zeros((64, 64, 4), np.uint8)  # transparent black on the left half
    arr[:, 32:] = (*GREEN, 255)
    img = Image.fromarray(arr)
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P":  # palette with a transparent index, as GIF-style PNGs have
        img = img.convert("RGB").quantize(4)
        black = int(np.asarray(img)[0, 0])
        img.info["transparency"] = black
    img.save(tmp_path / "cut.png", **({"transparency": img.info["transparency"]} if mode == "P" else {}))
    assert Image.open(tmp_path / "cut.png").mode == mode
    out = load_image(tmp_path / "cut.png", 64)
    assert np.all(out[:, :30] == 1.0), "transparent area must be white"
    assert not np.all(out[:, 34:] == 1.0), "opaque area must keep its colour"


def test_greyscale_palette_and_cmyk_become_rgb(tmp_path):
    _solid((64, 64), 100, "L").save(tmp_path / "g.png")
    _solid((64, 64), RED).quantize(8).save(tmp_path / "p.png")
    _solid((64, 64), (0, 0, 0, 0), "CMYK").save(tmp_path / "c.jpg")  # no ink = white
    assert Image.open(tmp_path / "p.png").mode == "P" and Image.open(tmp_path / "c.jpg").mode == "CMYK"
    grey, pal, cmyk = (load_image(tmp_path / n, 64) for n in ("g.png", "p.png", "c.jpg"))
    assert grey.shape == pal.shape == cmyk.shape == (64, 64, 3)
    assert _close(grey, (100, 100, 100), atol=0)
    assert _close(pal, RED, atol=0)
    assert _close(cmyk, (255, 255, 255), atol=3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((64, 64), 32896, np.uint16)).save(tmp_path / "deep.png")  # 32896 = 128 * 257
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert _close(load_image(tmp_path / "deep.png", 64), (128, 128, 128), atol=1)


# ---------------------------------------------------------------- geometry and range


@pytest.mark.parametrize("portrait", [False, True])
def test_resize_keeps_the_centre_and_cuts_the_borders(tmp_path, portrait):
    # 300x200 grey with a red marker in the centre and blue bands in the outer 35 columns; the short side goes
    # to 64, so 50 source columns are cut each side: the bands must vanish, the marker must stay in the middle.
    arr = np.full((200, 300, 3), GREY, np.uint8)
    arr[:, :35], arr[:, -35:] = BLUE, BLUE
    arr[80:120, 130:170] = RED
    if portrait:
        arr = arr.transpose(1, 0, 2).copy()
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = to_uint8(load_image(tmp_path / "x.png", 64)).astype(int)
    assert out.shape == (64, 64, 3)
    assert np.all(np.abs(out[..., 2] - out[..., 1]) <= 3), "no blue may survive the crop"
    assert _close(load_image(tmp_path / "x.png", 64)[32, 32], RED, atol=3)
    assert _close(load_image(tmp_path / "x.png", 64)[2, 2], GREY, atol=3)
    # A symmetric picture stays symmetric only if the crop is exactly centred.
    np.testing.assert_allclose(out, out[:, ::-1], atol=1)
    np.testing.assert_allclose(out, out[::-1], atol=1)


def test_range_dtype_and_uint8_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    arr[0, 0], arr[0, 1] = 0, 255
    Image.fromarray(arr).save(tmp_path / "r.png")
    out = load_image(tmp_path / "r.png", 48)
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    np.testing.assert_array_equal(to_uint8(out), arr)
    assert to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_min_size_default_is_half_the_resolution(tmp_path):
    _solid((32, 100), GREY).save(tmp_path / "ok.png")
    _solid((31, 100), GREY).save(tmp_path / "small.png")
    assert load_image(tmp_path / "ok.png", 64).shape == (64, 64, 3)
    with pytest.raises(ImageFileError, match=r"small\.png: 31x100 is smaller than the minimum 32 px side"):
        load_image(tmp_path / "small.png", 64)
    assert load_image(tmp_path / "small.png", 64, min_size=16).shape == (64, 64, 3)


# ---------------------------------------------------------------- folders


def _write_jpg(path, size=(96, 96)):
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def test_bad_files_are_all_reported_in_one_error(tmp_path):
    _write_jpg(tmp_path / "good.jpg")
    _write_jpg(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # header intact: only a full decode notices
    (tmp_path / "notes.png").write_text("these are not pixels\n")
    _solid((20, 30), GREY).save(tmp_path / "tiny.png")
    (tmp_path / "readme.txt").write_text("ignored")
    for fn in (scan_folder, load_folder):
        with pytest.raises(ImageFolderError) as info:
            fn(tmp_path, 64)
        lines = str(info.value).splitlines()
        assert lines[0] == f"{tmp_path}: 3 of 4 images cannot be used:"
        assert sorted(info.value.problems) == ["cut.jpg", "notes.png", "tiny.png"]
        assert any(l.startswith("  cut.jpg: truncated file") for l in lines)
        assert any(l.startswith("  notes.png: not a readable image") for l in lines)
        assert "  tiny.png: 20x30 is smaller than the minimum 32 px side" in lines
        assert "good.jpg" not in str(info.value) and "readme.txt" not in str(info.value)


def test_missing_empty_and_non_folder_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        scan_folder(tmp_path / "nope", 64)
    (tmp_path / "file.jpg").write_text("x")
    with pytest.raises(ImageFolderError, match="not a directory"):
        load_folder(tmp_path / "file.jpg", 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageFolderError, match=r"no images \(accepted suffixes: \.jpg, \.jpeg, \.png, \.webp.*"
                                                r"0 other files ignored"):
        scan_folder(empty, 64)
    (empty / "caption.txt").write_text("a photo of sks dog")
    with pytest.raises(ImageFolderError, match="1 other file ignored"):
        load_folder(empty, 64)


def test_a_broken_link_is_reported_not_skipped(tmp_path):
    _write_jpg(tmp_path / "one.jpg")
    (tmp_path / "two.png").symlink_to(tmp_path / "moved_away.png")
    with pytest.raises(ImageFolderError) as info:
        load_folder(tmp_path, 64)
    assert sorted(info.value.problems) == ["two.png"]


def test_non_image_files_are_ignored(tmp_path):
    _write_jpg(tmp_path / "one.jpg")
    _solid((64, 64), RED).save(tmp_path / "two.png")
    (tmp_path / "captions.txt").write_text("a photo of sks dog")
    (tmp_path / "._one.jpg").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    (tmp_path / "sub").mkdir()
    _write_jpg(tmp_path / "sub" / "three.jpg")
    assert [p.name for p in scan_folder(tmp_path, 64)] == ["one.jpg", "two.png"]
    assert load_folder(tmp_path, 64).shape == (2, 64, 64, 3)


def test_folder_order_is_sorted_by_name(tmp_path):
    colours = {"b.png": RED, "D.PNG": BLUE, "a.png": GREEN, "c.jpg": GREY}
    for name, colour in colours.items():  # written in non-sorted order
        _solid((64, 64), colour).save(tmp_path / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    names = [p.name for p in scan_folder(tmp_path, 64)]
    assert names == sorted(colours) == ["D.PNG", "a.png", "b.png", "c.jpg"]
    batch = load_folder(tmp_path, 64, min_size=1)
    assert batch.shape == (4, 64, 64, 3) and batch.dtype == np.float32
    for image, name in zip(batch, names):
        assert _close(image[32, 32], colours[name], atol=3), name
    np.testing.assert_array_equal(batch, load_folder(tmp_path, 64))
