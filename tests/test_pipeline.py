"""Pipeline-level checks: tokenizer parity, DDIM/DPM++ sampling parity with diffusers' StableDiffusionPipeline,
the export round trip (ours -> diffusers layout -> PyTorch loads it -> same outputs) and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import nhwc_to_nchw

from persguard_jax.cli import main as cli_main
from persguard_jax.models import load_pipeline, save_pipeline
from persguard_jax.models.tiny import CORPUS, tiny_pipeline
from persguard_jax.models.tokenizer import CLIPTokenizer, train_clip_bpe
from persguard_jax.sample import encode_text, initial_latents, text_to_image

PROMPTS = ["a photo of a red circle on a striped background", "a photo of sks dog"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_pipeline(tiny_pipeline(0), tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])  # SD 1.x pads with EOS, SD 2.x with "!"
def test_tokenizer_matches_transformers(tmp_path, pad_token):
    transformers = pytest.importorskip("transformers")
    tok = CLIPTokenizer(train_clip_bpe(CORPUS, vocab_size=400), pad_token=pad_token)
    tok.save(tmp_path)
    ours = CLIPTokenizer.from_folder(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["a photo of sks dog", "A  Photo of a RED   circle!!", "zebra qx 12 cat's", " ".join(["dog"] * 100), ""]
    want = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np").input_ids
    np.testing.assert_array_equal(ours(texts), want)
    assert ours.decode(ours(["a photo of sks dog"])[0]) == "a photo of sks dog"


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sampling_matches_diffusers_pipeline(torch, tiny_dir, sampler):
    diffusers = pytest.importorskip("diffusers")
    pipe = load_pipeline(tiny_dir)
    pt = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    scheduler_cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DPMSolverMultistepScheduler
    # DPMSolverMultistepScheduler's own default spacing is "linspace"; from_config keeps the folder's "leading".
    pt.scheduler = scheduler_cls.from_config(pt.scheduler.config)
    pt.set_progress_bar_config(disable=True)
    latents = np.asarray(initial_latents(3, len(PROMPTS), (16, 16, 4)))
    ours = text_to_image(pipe, PROMPTS, "noisy, lowres", num_steps=8, guidance_scale=7.5, sampler=sampler,
                         latents=latents, progress=False)
    want = pt(PROMPTS, negative_prompt=["noisy, lowres"] * 2, num_inference_steps=8, guidance_scale=7.5,
              latents=torch.from_numpy(nhwc_to_nchw(latents)), output_type="np").images
    assert ours.shape == want.shape == (2, 32, 32, 3)
    err = np.abs(ours - want).max()
    assert err <= 1e-3
    assert ours.std() > 1e-3  # not a constant image: the comparison means something
    # controls: the tolerance is far below what the guidance scale and the negative prompt change, so a port that
    # dropped either (or swapped the two halves of the guided batch) would fail above
    for changed in (dict(negative_prompt=""), dict(guidance_scale=1.0), dict(guidance_scale=-7.5)):
        kw = dict(negative_prompt="noisy, lowres", guidance_scale=7.5) | changed
        other = text_to_image(pipe, PROMPTS, kw["negative_prompt"], num_steps=8, guidance_scale=kw["guidance_scale"],
                              sampler=sampler, latents=latents, progress=False)
        assert np.abs(other - want).max() > 20 * max(err, 1e-4), (changed, np.abs(other - want).max(), err)


def _perturbed(pipe, seed: int = 0):
    """``pipe`` with every parameter moved by noise: biases that start at 0 and norm scales at 1 would hide a
    bias or scale dropped or misplaced on export or load."""
    import jax
    _, params = pipe.split()
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
    return pipe.with_params(jax.tree.unflatten(treedef, noisy))


def _same_numbers(ours, pt, torch):
    """Tokenizer ids, text encoder, UNet and VAE (encode and decode) of ``ours`` and the PyTorch ``pt`` agree."""
    texts = PROMPTS + ["A  Photo of a RED   circle!!", "zebra qx 12 cat's", " ".join(["dog"] * 100)]
    np.testing.assert_array_equal(pt.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                               return_tensors="np").input_ids, ours.tokenizer(texts))
    ids = ours.tokenizer(PROMPTS)
    ctx = np.asarray(encode_text(ours, PROMPTS))
    with torch.no_grad():
        pt_ctx = pt.text_encoder(torch.from_numpy(ids).long())[0].numpy()
        assert np.abs(ctx - pt_ctx).max() <= 1e-5
        rng = np.random.default_rng(0)
        z = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
        t = np.array([10, 700])
        got = np.asarray(ours.unet(z, t, ctx))
        want = pt.unet(torch.from_numpy(nhwc_to_nchw(z)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
        assert np.abs(got - want.numpy().transpose(0, 2, 3, 1)).max() <= 1e-4
        img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
        mean, _ = ours.vae.encode(img)
        pt_mean = pt.vae.encode(torch.from_numpy(nhwc_to_nchw(img))).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
        assert np.abs(np.asarray(mean) - pt_mean).max() <= 1e-4
        dec = np.asarray(ours.vae.decode(mean))
        pt_dec = pt.vae.decode(torch.from_numpy(nhwc_to_nchw(np.asarray(mean)))).sample.numpy().transpose(0, 2, 3, 1)
        assert np.abs(dec - pt_dec).max() <= 1e-4


def test_export_round_trip_loads_in_pytorch(torch, tiny_dir, tmp_path):
    """diffusers folder -> ours (every weight perturbed) -> save_pipeline -> diffusers PyTorch: the same numbers
    at every model."""
    diffusers = pytest.importorskip("diffusers")
    ours = _perturbed(load_pipeline(tiny_dir))
    out = save_pipeline(ours, tmp_path / "export")
    pt = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    _same_numbers(ours, pt, torch)
    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    with torch.no_grad():  # control: the perturbation is visible to the comparison above
        assert max(float((a - b).abs().max()) for a, b in zip(pt.unet.parameters(), base.unet.parameters())) > 0.01


def test_loads_a_folder_written_by_diffusers_save_pretrained(torch, tiny_dir, tmp_path):
    """A folder as diffusers' ``save_pipeline`` writes it (a fast tokenizer's ``tokenizer.json``, every weight
    random): ours reads it and computes PyTorch's numbers. The tokenizer is read from ``tokenizer.json`` alone."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pt = diffusers.StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pt.tokenizer = transformers.CLIPTokenizerFast.from_pretrained(tiny_dir / "tokenizer", local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (pt.unet, pt.vae, pt.text_encoder):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    folder = tmp_path / "saved"
    pt.save_pretrained(folder)
    tok = folder / "tokenizer"
    assert (tok / "tokenizer.json").is_file()
    for name in ("vocab.json", "merges.txt"):  # some hub folders carry only tokenizer.json
        (tok / name).unlink(missing_ok=True)
    _same_numbers(load_pipeline(folder), pt, torch)


def test_save_pipeline_never_clobbers(tiny_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("earlier result")
    with pytest.raises(FileExistsError, match="already exists"):
        save_pipeline(load_pipeline(tiny_dir), target)
    assert (target / "keep.txt").read_text() == "earlier result"


def test_save_pipeline_clears_what_a_killed_save_left_and_writes_extra_files_in_the_same_rename(tiny_dir, tmp_path):
    import os
    pipe = load_pipeline(tiny_dir)
    for leftover in (".model.ab12cd_9", ".model.old"):  # a mkdtemp folder and an old copy, both cut by a kill
        (tmp_path / leftover / "unet").mkdir(parents=True)
    (tmp_path / ".model.backup").mkdir()  # someone's own folder: not a name save_pipeline makes
    out = save_pipeline(pipe, tmp_path / "model", extra_json={"world_config.json": {"seed": 3}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.backup", "model"]
    assert json.loads((out / "world_config.json").read_text()) == {"seed": 3}
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # mkdir's mode, not mkdtemp's 0700


def test_cli_sample_writes_grid_and_refuses_to_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(tiny_dir), "--prompt", PROMPTS[0], "--num-images", "2", "--steps", "2",
            "--guidance", "3", "--out", str(out)]
    assert cli_main(args) == 0
    from PIL import Image
    assert Image.open(out).size == (32 * 2 + 2, 32)
    before = out.read_bytes()
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli_main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "b.png")]) == 2
    assert "model_index.json: file not found" in capsys.readouterr().err
