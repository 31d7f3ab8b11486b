"""Every way a weights folder can be wrong gives one clear line naming the file and the key; every
layout users have (sharded, fp16 variant, unprefixed CLIP, old VAE attention names) loads."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persguard_jax.models import WeightsError, load_pipeline, load_text_encoder, load_unet, load_vae, save_pipeline
from persguard_jax.models.tiny import tiny_pipeline

UNET_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_pipeline(tiny_pipeline(1), tmp_path_factory.mktemp("pipe") / "tiny")


@pytest.fixture
def unet_dir(pipe_dir, tmp_path):
    return shutil.copytree(pipe_dir / "unet", tmp_path / "unet")


def _leaves(model):
    from flax import nnx
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k].astype(la[k].dtype), err_msg=k)


def _edit(folder, fn, name=UNET_FILE):
    tensors = load_file(str(folder / name))
    fn(tensors)
    save_file(tensors, str(folder / name))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(WeightsError, match="folder not found"):
        load_unet(tmp_path / "nope")
    (tmp_path / "unet").mkdir()
    with pytest.raises(WeightsError, match=r"config\.json: file not found"):
        load_unet(tmp_path / "unet")


def test_broken_json_names_the_file(unet_dir):
    (unet_dir / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"unet/config\.json: not valid JSON"):
        load_unet(unet_dir)


def test_pickle_is_refused_with_conversion_hint(unet_dir):
    (unet_dir / UNET_FILE).rename(unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin: pickle weights are never loaded.*save_pretrained"):
        load_unet(unet_dir)


def test_no_weights(unet_dir):
    (unet_dir / UNET_FILE).unlink()
    with pytest.raises(WeightsError, match="no weights found"):
        load_unet(unet_dir)


def test_missing_key_names_key_and_shape(unet_dir):
    _edit(unet_dir, lambda t: t.pop("conv_in.weight"))
    with pytest.raises(WeightsError, match=r"missing key conv_in\.weight \(expected shape \(32, 4, 3, 3\)\)"):
        load_unet(unet_dir)


def test_wrong_shape_names_file_key_and_both_shapes(unet_dir):
    _edit(unet_dir, lambda t: t.__setitem__("conv_in.bias", np.zeros(7, np.float32)))
    with pytest.raises(WeightsError, match=r"safetensors: key conv_in\.bias has shape \(7,\), the config expects \(32,\)"):
        load_unet(unet_dir)


def test_unexpected_key(unet_dir):
    _edit(unet_dir, lambda t: t.__setitem__("extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(WeightsError, match=r"unexpected key extra\.weight"):
        load_unet(unet_dir)


def test_unknown_block_type(unet_dir):
    cfg = json.loads((unet_dir / "config.json").read_text())
    cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    (unet_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"config\.json: down_block_types"):
        load_unet(unet_dir)


def test_corrupt_safetensors(unet_dir):
    (unet_dir / UNET_FILE).write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_unet(unet_dir)


def test_sharded_index_loads_and_missing_shard_is_named(pipe_dir, unet_dir):
    tensors = load_file(str(unet_dir / UNET_FILE))
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(unet_dir / name))
    (unet_dir / UNET_FILE).unlink()
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _same(load_unet(unet_dir), load_unet(pipe_dir / "unet"))
    (unet_dir / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="names shard diffusion_pytorch_model-00002-of-00002.safetensors, which is missing"):
        load_unet(unet_dir)


def test_fp16_variant(pipe_dir, unet_dir):
    tensors = {k: v.astype(np.float16) for k, v in load_file(str(unet_dir / UNET_FILE)).items()}
    save_file(tensors, str(unet_dir / "diffusion_pytorch_model.fp16.safetensors"))
    (unet_dir / UNET_FILE).unlink()
    ref = load_unet(pipe_dir / "unet")
    for unet in (load_unet(unet_dir), load_unet(unet_dir, variant="fp16")):
        for k, v in _leaves(unet).items():
            assert v.dtype == np.float32
            np.testing.assert_allclose(v, _leaves(ref)[k], atol=2e-3, rtol=2e-3)


def test_text_encoder_with_and_without_prefix(pipe_dir, tmp_path):
    te_dir = shutil.copytree(pipe_dir / "text_encoder", tmp_path / "te")
    name = "model.safetensors"
    tensors = load_file(str(te_dir / name))
    assert all(k.startswith("text_model.") for k in tensors)  # what real SD checkpoints carry
    stripped = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    stripped["embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # buffer of older files
    save_file(stripped, str(te_dir / name))
    _same(load_text_encoder(te_dir), load_text_encoder(pipe_dir / "text_encoder"))


def test_vae_old_attention_names(pipe_dir, tmp_path):
    vae_dir = shutil.copytree(pipe_dir / "vae", tmp_path / "vae")
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(t):
        for k in [k for k in t if "attentions" in k]:
            new = k
            for a, b in old.items():
                new = new.replace(a, b)
            v = t.pop(k)
            t[new] = v[:, :, None, None] if v.ndim == 2 else v  # old files store these as 1x1 convs
    _edit(vae_dir, rename)
    assert any(".query." in k for k in load_file(str(vae_dir / UNET_FILE)))
    _same(load_vae(vae_dir), load_vae(pipe_dir / "vae"))


def test_pipeline_missing_subfolder(pipe_dir, tmp_path):
    broken = shutil.copytree(pipe_dir, tmp_path / "p")
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(WeightsError, match=r"scheduler: missing pipeline subfolder scheduler/"):
        load_pipeline(broken)


def test_bf16_load(pipe_dir):
    import jax.numpy as jnp
    pipe = load_pipeline(pipe_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in _leaves(pipe.unet).values())
