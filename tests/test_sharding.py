"""Mesh construction, logical rules, and that declared specs are what the arrays carry."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from persguard_jax import sharding as shd
from persguard_jax.models import functional as F
from persguard_jax.models.tiny import tiny_pipeline
from persguard_jax.train import OptimizerConfig, create_state, make_optimizer


def mesh_2x4():
    cfg = shd.MeshConfig(data=2, fsdp=4, tensor=1, min_shard_size=256)
    return shd.make_mesh(cfg), cfg


def test_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    assert dict(shd.make_mesh(shd.MeshConfig(data=-1, fsdp=2)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(shd.make_mesh(shd.MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = shd.make_mesh(shd.MeshConfig(data=4, fsdp=2, dcn_data=2))  # hybrid: 2 "slices" of data=2 x fsdp=2
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        shd.make_mesh(shd.MeshConfig(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="3x1x1 = 3 devices, but 8 are available"):
        shd.make_mesh(shd.MeshConfig(data=3, fsdp=1))
    with pytest.raises(ValueError, match="unknown keys"):
        shd.MeshConfig.from_dict({"dat": 2})
    with pytest.raises(ValueError, match="unknown sharding layout"):
        shd.rules_for("zero3")


def test_spec_rules():
    mesh, cfg = mesh_2x4()
    rules = shd.rules_for("fsdp")
    assert shd.spec_for(("embed", "heads"), (32, 32), mesh, rules) == P("fsdp", None)
    assert shd.spec_for((None, None, "conv_in", "conv_out"), (3, 3, 64, 32), mesh, rules) == P(None, None, "fsdp", None)
    # conv_in of 4 latent channels cannot take fsdp=4... it can; 3 channels cannot: fsdp moves to conv_out
    assert shd.spec_for((None, None, "conv_in", "conv_out"), (3, 3, 3, 64), mesh, rules) == P(None, None, None, "fsdp")
    assert shd.spec_for(("norm",), (64,), mesh, rules, min_shard_size=1) == P("fsdp")
    assert shd.spec_for(("norm",), (64,), mesh, rules, min_shard_size=1024) == P(None)  # small: replicated
    assert shd.spec_for(("embed", "mlp"), (30, 30), mesh, rules, min_shard_size=1) == P(None, None)  # 30 % 4
    tp = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    assert shd.spec_for(("embed", "mlp"), (64, 256), tp, rules) == P("fsdp", "tensor")
    assert shd.spec_for(("mlp", "embed"), (256, 64), tp, rules) == P("tensor", "fsdp")
    assert shd.batch_spec(4, mesh, cfg) == P(("data", "fsdp"), None, None, None)
    assert shd.spec_for(("embed", "mlp"), (64, 64), mesh, shd.rules_for("data")) == P(None, None)


def test_declared_specs_are_what_the_arrays_carry():
    """UNet, VAE and CLIP params and AdamW moments on a 2 (data) x 4 (fsdp) mesh: each array's sharding is the
    spec its logical axes declare, every large weight is FSDP-sharded (GEGLU, norms, time embedding included)."""
    mesh, cfg = mesh_2x4()
    pipe = tiny_pipeline(0)
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    _, params = F.split_modules(modules)
    opt = make_optimizer(OptimizerConfig())
    state, shardings = create_state(params, logical, opt, mesh, cfg)
    flat_arrays, flat_logical = F.flatten(state.params), F.flatten(logical)
    flat_mu = F.flatten(state.opt_state[1][0].mu)
    rules = shd.rules_for("fsdp")
    for name, x in flat_arrays.items():
        expected = shd.spec_for(tuple(flat_logical[name]), x.shape, mesh, rules, min_shard_size=cfg.min_shard_size)
        assert x.sharding.spec == expected, name
        assert flat_mu[name].sharding.spec == expected, name  # optimizer state follows its parameter
        if x.size >= cfg.min_shard_size:
            assert "fsdp" in jax.tree.leaves(tuple(expected)), f"{name} {x.shape} is not FSDP-sharded"
    checks = {
        "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q/kernel": P("fsdp", None),
        "unet/down_blocks/0/attentions/0/transformer_blocks/0/ff/net/0/proj/kernel": P("fsdp", None),
        "unet/down_blocks/0/attentions/0/transformer_blocks/0/ff/net/2/kernel": P(None, "fsdp"),
        "unet/time_embedding/linear_1/kernel": P("fsdp", None),
        "unet/mid_block/resnets/0/conv1/kernel": P(None, None, "fsdp", None),
        "vae/encoder/down_blocks/1/resnets/0/conv2/kernel": P(None, None, "fsdp", None),
        "text_encoder/text_model/embeddings/token_embedding/embedding": P(None, "fsdp"),  # embed before vocab
        "text_encoder/text_model/encoder/layers/0/mlp/fc1/kernel": P("fsdp", None),
    }
    for name, spec in checks.items():
        assert flat_arrays[name].sharding.spec == spec, name
        # and the bytes on one device are 1/4 of the array (fsdp=4, replicated over data)
        shard = flat_arrays[name].addressable_shards[0].data
        assert shard.size * 4 == flat_arrays[name].size, name
    rows = shd.sharding_plan(state.params, shardings.params)
    text = shd.format_plan(rows, limit=5)
    assert "bytes per device" in text and len(rows) == len(flat_arrays)
    total_unsharded = sum(x.size * x.dtype.itemsize for x in flat_arrays.values())
    assert sum(r["bytes_per_device"] for r in rows) < total_unsharded / 4 * 1.05


def test_global_batch_from_process_shares():
    mesh, cfg = mesh_2x4()
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    batch = shd.global_batch(local, mesh, cfg)
    assert batch["x"].shape == (16, 3)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    assert shd.batch_divisor(mesh, cfg) == 8


def test_plan_command_sd15(capsys):
    """``persguard plan`` on the full-size SD 1.5 UNet, VAE and text encoder (abstract: no weights), fsdp=8."""
    from persguard_jax.cli import main
    assert main(["plan", "--arch", "sd15", "--fsdp", "8", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
    assert "text_encoder/text_model/embeddings/token_embedding/embedding" in out and "(49408, 768)" in out
    assert "unet/up_blocks/0/resnets/0/conv1/kernel" in out and "(3, 3, 2560, 1280)" in out and "'fsdp'" in out
    per_device = int(out.split(" arrays, ")[1].split(" bytes per device")[0].replace(",", ""))
    elements = int(out.split("bytes per device (")[1].split(" elements")[0].replace(",", ""))
    assert per_device <= elements * 4 / 8 * 1.01  # float32, 1/8 per device up to the small replicated arrays
    assert main(["plan", "--model", "/nonexistent/folder"]) == 2
