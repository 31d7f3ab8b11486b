"""Purifiers (persguard_jax/purifiers.py) and ``persguard purify``: each purifier weakens an added perturbation,
JPEG and blur are PIL's to the grey level, TV minimises its energy, chains parse, and the command writes the
inputs' names and sizes without touching them and refuses bad input in one line."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from persguard_jax import purifiers as P
from persguard_jax.cli import main
from persguard_jax.io import uint8_to_unit
from persguard_jax.resources import assets_dir

WORLD = assets_dir() / "world_tiny"


def smooth_images(n: int, height: int, width: int) -> np.ndarray:
    """Smooth colour gradients on the uint8 grid, float32 in [0, 1] (a purifier's natural prey is the noise on
    top, not the picture)."""
    yy, xx = np.mgrid[:height, :width] / max(height, width)
    images = [np.stack([0.5 + 0.3 * np.sin(6 * xx + i), 0.5 + 0.3 * np.cos(5 * yy - i), 0.3 + 0.4 * xx * yy], -1)
              for i in range(n)]
    return (np.round(np.stack(images) * 255) / 255).astype(np.float32)


def sign_noise(images: np.ndarray, eps: float = 8 / 255, seed: int = 0) -> np.ndarray:
    """``images`` plus +-eps random-sign noise (an l_inf perturbation's worst-case energy), clipped to [0, 1]."""
    delta = np.sign(np.random.default_rng(seed).standard_normal(images.shape)).astype(np.float32) * eps
    return np.clip(images + delta, 0.0, 1.0)


def norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.reshape(len(x), -1), axis=1)


def textured_uint8(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients plus strong noise, uint8: every rounding of a filter shows."""
    rng = np.random.default_rng(seed)
    base = smooth_images(1, height, width)[0] * 255
    return np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world_pipe():
    from persguard_jax.models import load_pipeline
    return load_pipeline(WORLD)


@pytest.fixture(scope="module")
def world_photos():
    """Two photos of a world subject, 24x32 (non-square: sizes must survive), float32 in [0, 1]."""
    from persguard_jax.data.world import world_of
    return uint8_to_unit(world_of(WORLD).subject_photos("dog_00", 2)[:, 4:28])


# --------------------------------------------------------------------------- the purifiers

@pytest.mark.parametrize("purifier", [P.JPEG(), P.Blur(radius=1.0), P.TV(), P.SuperResolution()],
                         ids=lambda p: p.NAME)
def test_purifier_lowers_the_perturbation(purifier):
    clean = smooth_images(3, 32, 32)
    perturbed = sign_noise(clean)
    out = purifier(perturbed)
    assert out.shape == clean.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert np.all(norms(out - clean) < 0.75 * norms(perturbed - clean))


@pytest.mark.parametrize("purifier", [P.SDEdit(steps=10, class_name="dog"), P.SDEditEmpty(steps=10)],
                         ids=lambda p: p.NAME)
def test_sdedit_lowers_the_perturbation(purifier, world_pipe, world_photos):
    """SDEdit redraws the image (the world's 32 px VAE alone is further from the photo than the perturbation is),
    so what is measured is the perturbation left after purification: S(x + d) - S(x) against d."""
    perturbed = sign_noise(world_photos)
    out = purifier(perturbed, pipe=world_pipe)
    assert out.shape == world_photos.shape and 0 <= out.min() and out.max() <= 1
    np.testing.assert_array_equal(out, purifier(perturbed, pipe=world_pipe))  # fixed seed: deterministic
    left = norms(out - purifier(world_photos, pipe=world_pipe))
    assert np.all(left < 0.5 * norms(perturbed - world_photos)), left


def test_sdedit_runs_the_timesteps_at_or_below_t_star(world_pipe):
    ts, prev = P.SDEdit(t_star=300, steps=50).timesteps(world_pipe.scheduler_config)
    assert ts[0] <= 300 < ts[0] + 20 and list(ts) == sorted(ts, reverse=True) and len(ts) == len(prev) == 15
    assert P.SDEdit(class_name="cat").text == "a photo of a cat, clear, high resolution, high quality, noise-free"
    with pytest.raises(ValueError, match="sdedit.t_star"):
        P.SDEdit(t_star=1000).timesteps(world_pipe.scheduler_config)
    with pytest.raises(ValueError, match="multiples of 8"):
        P.SDEdit().check(30, 32, world_pipe)


@pytest.mark.parametrize("quality", [75, 20, 95])
def test_jpeg_is_pils_round_trip(quality):
    pixels = np.stack([textured_uint8(24, 40, seed) for seed in range(2)])
    out = P.JPEG(quality=quality)(uint8_to_unit(pixels))
    for image, got in zip(pixels, out):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), expected)


@pytest.mark.parametrize("size,radii", [((32, 32), (0.3, 1.0, 2.5, 6.0)), ((23, 41), (1.7, 40.0))])
def test_blur_is_pils_gaussian_blur(size, radii):
    """Equal to PIL's at radii from below a pixel to wider than the image; the float (differentiable) form within
    a few grey levels."""
    image = textured_uint8(*size)
    for radius in radii:
        expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))).astype(int)
        got = np.round(np.asarray(P.gaussian_blur(uint8_to_unit(image)[None], radius))[0] * 255).astype(int)
        assert np.abs(got - expected).max() == 0, radius
    float_blur = np.asarray(P.gaussian_blur(uint8_to_unit(image)[None], radius, exact=False))[0] * 255
    assert np.abs(float_blur - expected).max() <= 3.5 and np.abs(float_blur - expected).mean() < 1


def test_blur_default_radius_scales_with_the_image():
    assert P.Blur().radius_for(512, 768) == 5.0 and P.Blur().radius_for(32, 32) == pytest.approx(5 * 32 / 512)
    assert P.Blur(radius=2.0).radius_for(32, 32) == 2.0


def test_tv_minimises_its_energy():
    y = sign_noise(smooth_images(2, 24, 24))
    x = np.asarray(P.tv_denoise(y, 0.05, steps=200))
    energy = np.asarray(P.tv_objective(x, y, 0.05))
    assert np.all(energy < 0.6 * np.asarray(P.tv_objective(y, y, 0.05)))
    rng = np.random.default_rng(1)
    for _ in range(3):  # a minimum: small moves from it only raise the energy
        moved = x + rng.normal(0, 2e-3, x.shape).astype(np.float32)
        assert np.all(np.asarray(P.tv_objective(moved, y, 0.05)) > energy)


def test_parse_chain_and_its_errors():
    chain = P.parse_chain("jpeg, blur,sdedit_empty,jpeg", {"jpeg": {"quality": 40}, "sdedit": P.SDEdit(t_star=200)})
    assert [type(p) for p in chain] == [P.JPEG, P.Blur, P.SDEditEmpty, P.JPEG]
    assert chain[0].quality == 40 and chain[2].t_star == 200 and chain[2].prompt == ""
    assert P.chain_keys(chain) == ["jpeg", "blur", "sdedit_empty", "jpeg_2"]
    with pytest.raises(ValueError) as e:
        P.parse_chain("jpeg,bogus")
    message = str(e.value)
    assert "\n" not in message and "'bogus'" in message and all(name in message for name in P.PURIFIERS)
    with pytest.raises(ValueError, match="empty name"):
        P.parse_chain("jpeg,")
    with pytest.raises(ValueError, match="jpeg.quality"):
        P.parse_chain("jpeg", {"jpeg": {"quality": 0}})


def test_purify_times_each_purifier_per_image():
    images = smooth_images(3, 16, 16)
    result = P.purify(images, P.parse_chain("jpeg,blur"), batch_size=2)
    assert result.images.shape == images.shape and set(result.seconds) == {"jpeg", "blur"}
    assert all(s.shape == (3,) and np.all(s > 0) for s in result.seconds.values())
    with pytest.raises(ValueError, match="sdedit: needs a diffusion pipeline"):
        P.purify(images, P.parse_chain("sdedit"))


# --------------------------------------------------------------------------- the command

def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _write_photos(folder: Path, images: np.ndarray, names: list[str]) -> Path:
    folder.mkdir()
    for image, name in zip(np.round(images * 255).astype(np.uint8), names):
        Image.fromarray(image).save(folder / name)
    return folder


KEYS = {"lpips_style", "linf", "l2", "psnr", "seconds"}


def _check_run(out: Path, names: list[str], size: tuple[int, int], chain: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    for name in names:
        assert Image.open(out / name).size == size
    assert set(results["mean"]) == KEYS and set(results["images"]) == set(names)
    for row in [results["mean"], *results["images"].values()]:
        assert set(row) == KEYS and set(row["seconds"]) == {*chain, "total"}
    assert (out / "results.md").is_file() and (out / "config.yaml").is_file()
    return results


def test_command_jpeg_blur_end_to_end(tmp_path, capsys):
    photos = _write_photos(tmp_path / "photos", sign_noise(smooth_images(3, 24, 40)), ["a.png", "b.jpg", "c.PNG"])
    before = _hashes(photos)
    out = tmp_path / "out"
    args = ["purify", "--images", str(photos), "--purifier", "jpeg,blur", "--out", str(out)]
    assert main(args + ["blur.radius=1"]) == 0
    results = _check_run(out, ["a.png", "b.png", "c.png"], (40, 24), ["jpeg", "blur"])
    assert results["chain"] == "jpeg,blur" and results["purifiers"]["blur"]["radius"] == 1.0
    assert 0 < results["mean"]["linf"] < 1 and results["mean"]["psnr"] > 20
    assert _hashes(photos) == before
    # a second run into the same folder is refused, --overwrite replaces it
    capsys.readouterr()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "blur.radius=1", "jpeg.quality=30"]) == 0
    assert json.loads((out / "results.json").read_text())["purifiers"]["jpeg"]["quality"] == 30
    assert _hashes(photos) == before


def test_command_sdedit_on_the_world_model(tmp_path, world_photos):
    photos = _write_photos(tmp_path / "photos", sign_noise(world_photos), ["x.png", "y.png"])
    before = _hashes(photos)
    out = tmp_path / "out"
    assert main(["purify", "--images", str(photos), "--purifier", "sdedit", "--model", str(WORLD), "--out",
                 str(out), "sdedit.steps=10", "sdedit.class_name=dog"]) == 0
    results = _check_run(out, ["x.png", "y.png"], (32, 24), ["sdedit"])
    assert results["purifiers"]["sdedit"]["prompt"].startswith("a photo of a dog, clear")
    assert _hashes(photos) == before


def test_command_sr_with_an_x4_upscaler(tmp_path, tiny_upscaler_dir):
    """``sr.model``: downscale 4x with PIL, then the upscaler (one shared draw of its noise for every image)."""
    from persguard_jax.models import load_pipeline
    from persguard_jax.upscale import upscale, upscale_noise
    images = sign_noise(smooth_images(3, 32, 32))
    photos = _write_photos(tmp_path / "photos", images, ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    assert main(["purify", "--images", str(photos), "--purifier", "sr", "--out", str(out), "purify.batch_size=2",
                 f"sr.model={tiny_upscaler_dir}", "sr.steps=4", "sr.prompt=a photo of sks dog"]) == 0
    results = _check_run(out, ["a.png", "b.png", "c.png"], (32, 32), ["sr"])
    assert results["purifiers"]["sr"]["model"] == str(tiny_upscaler_dir)
    low = P._pil_each(uint8_to_unit(np.stack([np.asarray(Image.open(photos / n)) for n in ("a.png", "b.png", "c.png")])),
                      lambda im: im.resize((8, 8), Image.BICUBIC))
    latents, noise = upscale_noise(0, 1, (8, 8), 4)
    want = upscale(load_pipeline(tiny_upscaler_dir), low, "a photo of sks dog", num_steps=4,
                   latents=np.repeat(latents, 3, 0), image_noise=np.repeat(noise, 3, 0))
    got = uint8_to_unit(np.stack([np.asarray(Image.open(out / n)) for n in ("a.png", "b.png", "c.png")]))
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6  # written as 8-bit PNGs
    assert got.std() > 0.01


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Folders for the refusals: ``photos`` (two 32 px images), ``empty``, ``mixed`` (two sizes)."""
    root = tmp_path_factory.mktemp("purify_ws")
    images = sign_noise(smooth_images(2, 32, 32))
    _write_photos(root / "photos", images, ["a.png", "b.png"])
    (root / "empty").mkdir()
    _write_photos(root / "mixed", images, ["a.png", "b.png"])
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "mixed" / "c.png")
    return root


U = "purify --images {root}/photos --purifier jpeg --out {root}/new"
BAD = [
    (U.replace("photos", "empty"), "no images"),
    (U.replace("photos", "mixed"), "c.png"),
    (U.replace("jpeg", "jpeg,bogus"), "unknown purifier 'bogus'"),
    (U + " jpeg.quality=0", "jpeg.quality"),
    (U + " jpeg.quality=96", "jpeg.quality"),
    (U.replace("jpeg", "blur") + " blur.radius=0", "blur.radius"),
    (U.replace("jpeg", "blur") + " blur.radius=-1.5", "blur.radius"),
    (U.replace("jpeg", "tv") + " tv.stepsize=0.1", "stepsize"),
    (U.replace("{root}/new", "{root}/photos"), "--out"),
    (U.replace("{root}/new", "{root}/photos/purified"), "--out"),
    (U.replace("{root}/new", "{root}"), "--out"),
    (U.replace("jpeg", "jpeg,sdedit"), "sdedit needs --model"),
    (U.replace("jpeg", "sr") + " sr.model={root}/empty", "sr.model"),
    (U.replace("jpeg", "sr") + f" sr.model={WORLD}", "not an SD x4-upscaler pipeline"),
    (U.replace("jpeg", "sr") + " sr.model={upscaler} sr.factor=2", "sr.factor=2"),
    (U.replace("jpeg", "sr") + " sr.model={upscaler} sr.noise_level=400", "sr.noise_level=400"),
    (U.replace("jpeg", "sdedit") + f" --model {WORLD} sdedit.t_star=0", "sdedit.t_star"),
]


@pytest.mark.parametrize("line,needle", BAD, ids=[needle for _, needle in BAD])
def test_bad_input_is_one_line_and_writes_nothing(ws, tiny_upscaler_dir, capsys, line, needle):
    before = {p: _hashes(ws / p) for p in ("photos", "mixed")}
    assert main(line.format(root=ws, upscaler=tiny_upscaler_dir).split()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("persguard purify: error: ") and needle in err, err
    assert not (ws / "new").exists() and not (ws / "photos" / "purified").exists()
    assert {p: _hashes(ws / p) for p in ("photos", "mixed")} == before


def test_sdedit_refuses_a_blank_class_its_prompt_names():
    from persguard_jax.purifiers import SDEdit
    with pytest.raises(ValueError, match="sdedit.class_name: must not be empty"):
        SDEdit(class_name=" ")
    SDEdit(class_name=" ", prompt="a photo")  # a prompt without {class} does not read it
