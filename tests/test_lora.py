"""LoRA as a pure transform of the parameter tree: identity at init, only targeted kernels change, the B-only first
gradient, training through the unchanged engine step, the merge formula, sharding of the LoRA tree.

Two UNet compiles in all: the forward (``unet_fwd``) and one scan of SGD steps (``sgd_run``)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from persguard_jax import lora as L
from persguard_jax import sharding as shd
from persguard_jax.models import functional as F
from persguard_jax.train.step import StepConfig, loss_and_grads

RANK = 4
N_STEPS = 6
LR = 5.0


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"latents": rng.normal(size=(2, 8, 8, 4)).astype(np.float32),
            "timesteps": np.array([10, 500], np.int32),
            "context": rng.normal(size=(2, 8, 16)).astype(np.float32),
            "target": rng.normal(size=(2, 8, 8, 4)).astype(np.float32)}


def unet_out(model, params, batch):
    return model.bind(params, "unet")(batch["latents"], batch["timesteps"], batch["context"])


def mse_loss(model):
    """A denoising-style objective with no randomness: MSE of the UNet output to a fixed target."""
    def loss(params, batch, rng):
        per = jnp.mean((unet_out(model, params, batch) - batch["target"]) ** 2, axis=(1, 2, 3))
        return per.mean(), {"per_example": per}
    return loss


def random_b(lora, seed=1, std=0.1):
    """``lora`` with every B drawn from N(0, std^2) (numpy: fast), A kept."""
    rng = np.random.default_rng(seed)
    def draw(ab):
        return {"lora_A": ab["lora_A"], "lora_B": jnp.asarray(std * rng.normal(size=ab["lora_B"].shape), jnp.float32)}
    return _map_adapters(lora, draw)


def _map_adapters(tree, fn):
    if set(tree) == {"lora_A", "lora_B"}:
        return fn(tree)
    return {k: _map_adapters(v, fn) for k, v in tree.items()}


# --------------------------------------------------------------------------- config and selection (no UNet)

def test_config():
    cfg = L.LoRAConfig()
    assert cfg.scale == 1.0 and len(cfg.targets) == 8
    assert L.LoRAConfig(rank=8, alpha=4).scale == 0.5
    assert L.LoRAConfig.from_dict({"rank": 2, "targets": ["unet/*/attn2/to_k"]}).targets == ("unet/*/attn2/to_k",)
    assert L.LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        L.LoRAConfig.from_dict({"rnak": 4})
    with pytest.raises(ValueError, match="rank"):
        L.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="init"):
        L.LoRAConfig(init="xavier")


def test_only_targeted_kernels_change(micro):
    _, params, _ = micro
    cfg = L.LoRAConfig(rank=RANK, alpha=2.0)
    lora = L.init_lora(params, cfg, jax.random.key(0))
    targets = L.lora_targets(params, cfg)
    # micro UNet: 4 transformer blocks (down, mid, 2 up) x attn1/attn2 x q, k, v, out
    assert len(targets) == 32 and all("/attn" in t for t in targets)
    assert L.count(lora) == 32 * RANK * (16 + 16)
    assert F.flatten(lora).keys() == {f"{t}/{f}" for t in targets for f in ("lora_A", "lora_B")}
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)  # abstract params work too
    assert jax.tree.structure(L.init_lora(shapes, cfg, jax.random.key(0))) == jax.tree.structure(lora)

    a = lora["unet"]["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_out"][0]["lora_A"]
    b = lora["unet"]["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_out"][0]["lora_B"]
    assert a.shape == (16, RANK) and b.shape == (RANK, 16) and a.dtype == jnp.float32
    assert not np.any(np.asarray(b))
    bound = 1 / math.sqrt(16)  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
    all_a = np.concatenate([np.ravel(v) for k, v in F.flatten(lora).items() if k.endswith("lora_A")])
    assert np.abs(all_a).max() <= bound and np.abs(all_a).max() > 0.95 * bound
    assert abs(all_a.std() - bound / math.sqrt(3)) < 0.01
    g = L.init_lora(params, L.LoRAConfig(rank=RANK, init="gaussian"), jax.random.key(0))
    g_a = np.concatenate([np.ravel(v) for k, v in F.flatten(g).items() if k.endswith("lora_A")])
    assert abs(g_a.std() - 1 / RANK) < 0.01

    lora = random_b(lora)
    new = L.apply_lora(params, lora, cfg)
    flat_old, flat_new = F.flatten(params), F.flatten(new)
    assert flat_old.keys() == flat_new.keys()
    changed = {p for p in flat_old if flat_new[p] is not flat_old[p]}
    assert changed == {f"{t}/kernel" for t in targets}
    flat_lora = F.flatten(lora)
    for t in targets:
        w, a, b = (np.asarray(x, np.float64) for x in (flat_old[f"{t}/kernel"], flat_lora[f"{t}/lora_A"],
                                                       flat_lora[f"{t}/lora_B"]))
        np.testing.assert_allclose(np.asarray(flat_new[f"{t}/kernel"]), w + 2.0 / RANK * a @ b, rtol=1e-6, atol=1e-6)
    # subtrees without adapters are shared, not copied; the input is not modified
    assert new["text_encoder"] is params["text_encoder"]
    assert new["unet"]["conv_in"] is params["unet"]["conv_in"]
    assert all(x is y for x, y in zip(jax.tree.leaves(params), flat_old.values()))


def test_selection_errors(micro):
    _, params, _ = micro
    with pytest.raises(ValueError, match=r"match no 2-D kernel.*unet/down_blocks/0/.*/attn1/to_k"):
        L.init_lora(params, L.LoRAConfig(targets=("unet/*/attn3/to_q",)), jax.random.key(0))
    with pytest.raises(ValueError, match="non-Linear kernels"):
        L.init_lora(params, L.LoRAConfig(targets=("unet/conv_in",)), jax.random.key(0))
    # prefix, glob and regex forms; the text encoder's attention too
    assert len(L.lora_targets(params, L.LoRAConfig(targets=("re:attn2/to_(q|v)$",)))) == 8
    assert L.lora_targets(params, L.LoRAConfig(targets=L.TEXT_ENCODER_ATTENTION)) == [
        f"text_encoder/text_model/encoder/layers/0/self_attn/{p}" for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    assert len(L.lora_targets(params, L.LoRAConfig(targets=("unet/mid_block",)))) > 8  # incl. ff/proj_out
    lora = L.init_lora(params, L.LoRAConfig(), jax.random.key(0))
    bad = {"unet": {"nope": lora["unet"]["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]}}
    with pytest.raises(KeyError, match="unet/nope"):
        L.apply_lora(params, bad, 1.0)


# --------------------------------------------------------------------------- one Linear layer (no UNet)

def test_merge_formula_one_linear():
    from flax import nnx

    from persguard_jax.models import layers
    k = jax.random.split(jax.random.key(3), 4)
    model, params = F.split_modules({"lin": layers.Linear(24, 40, axes=("embed", "heads"), rngs=nnx.Rngs(0))})
    cfg = L.LoRAConfig(rank=3, alpha=6.0, targets=("lin",))
    lora = L.init_lora(params, cfg, k[0])
    lora["lin"]["lora_B"] = jax.random.normal(k[1], (3, 40))
    x = jax.random.normal(k[2], (5, 24))
    w, b = params["lin"]["kernel"], params["lin"]["bias"]
    a_, b_ = lora["lin"]["lora_A"], lora["lin"]["lora_B"]
    hi = jax.lax.Precision.HIGHEST
    merged = model.bind(L.merge_lora_into(params, lora, cfg), "lin")(x)
    side = jnp.dot(x, w, precision=hi) + b + cfg.scale * jnp.dot(jnp.dot(x, a_, precision=hi), b_, precision=hi)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(side), rtol=1e-5, atol=1e-5)
    # bf16 base: the merged kernel stays bf16 (the sum is formed in float32)
    p16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    m16 = L.apply_lora(p16, lora, cfg)["lin"]["kernel"]
    assert m16.dtype == jnp.bfloat16
    ref = (np.asarray(w.astype(jnp.bfloat16), np.float32) + 2.0 * np.asarray(a_) @ np.asarray(b_))
    np.testing.assert_allclose(np.asarray(m16, np.float32), ref.astype(jnp.bfloat16).astype(np.float32), rtol=1e-2)


# --------------------------------------------------------------------------- the UNet

@pytest.fixture(scope="module")
def unet_fwd(micro):
    model, _, _ = micro
    return jax.jit(lambda p, b: unet_out(model, p, b))


def test_identity_at_init(micro, batch, unet_fwd):
    _, params, _ = micro
    cfg = L.LoRAConfig(rank=RANK)
    lora = L.init_lora(params, cfg, jax.random.key(0))
    adapted = L.apply_lora(params, lora, cfg)
    assert all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(adapted)))
    base_out, lora_out = unet_fwd(params, batch), unet_fwd(adapted, batch)
    np.testing.assert_array_equal(np.asarray(base_out), np.asarray(lora_out))
    # with B != 0 the output moves (same compiled function: the shapes are unchanged)
    moved = unet_fwd(L.apply_lora(params, random_b(lora), cfg), batch)
    assert float(jnp.abs(moved - base_out).max()) > 1e-3


@pytest.fixture(scope="module")
def sgd_run(micro, batch):
    """N_STEPS of SGD on the LoRA tree through the engine's ``loss_and_grads``: the step hands the loss
    ``merge(lora, frozen)`` and ``with_lora`` splits and applies it. Returns (lora0, frozen copy, losses,
    grads of every step, final lora, frozen after)."""
    model, params, _ = micro
    cfg = L.LoRAConfig(rank=RANK)
    lora0 = L.init_lora(params, cfg, jax.random.key(0))
    loss = L.with_lora(mse_loss(model), cfg)
    frozen_before = jax.tree.map(np.array, params)

    @jax.jit
    def run(lora, frozen, batch):
        def body(p, _):
            value, _, grads = loss_and_grads(loss, p, frozen, batch, jax.random.key(0), StepConfig())
            return jax.tree.map(lambda x, g: x - LR * g, p, grads), (value, grads)
        return jax.lax.scan(body, lora, None, length=N_STEPS)

    final, (losses, grads) = run(lora0, params, batch)
    return lora0, frozen_before, np.asarray(losses), grads, final, params


def test_first_gradient_is_b_only(sgd_run):
    lora0, _, _, grads, _, _ = sgd_run
    g0 = jax.tree.map(lambda g: np.asarray(g[0]), grads)
    assert jax.tree.structure(g0) == jax.tree.structure(lora0)  # gradients for the LoRA tree only
    flat = F.flatten(g0)
    a_grads = {k: v for k, v in flat.items() if k.endswith("lora_A")}
    b_grads = {k: v for k, v in flat.items() if k.endswith("lora_B")}
    # B = 0 at init: dL/dA = s (dL/dW) B^T = 0 exactly, dL/dB = s A^T dL/dW != 0 for every adapter
    assert all(not np.any(v) for v in a_grads.values())
    assert all(np.abs(v).max() > 0 for v in b_grads.values()), [k for k, v in b_grads.items() if not np.any(v)]
    # after one step B != 0, so A gets gradients too
    g1 = F.flatten(jax.tree.map(lambda g: np.asarray(g[1]), grads))
    assert sum(np.abs(v).max() > 0 for k, v in g1.items() if k.endswith("lora_A")) == len(a_grads)


def test_sgd_on_lora_reduces_loss_base_untouched(sgd_run):
    lora0, frozen_before, losses, _, final, frozen_after = sgd_run
    assert np.all(np.isfinite(losses))
    assert np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.9 * losses[0], losses  # 1.196 -> 0.860 when written
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(lora0), jax.tree.leaves(final)))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(before, np.asarray(after))


# --------------------------------------------------------------------------- sharding

def test_lora_logical_axes_shard(micro):
    _, params, logical = micro
    targets = L.UNET_ATTENTION + L.TEXT_ENCODER_ATTENTION
    lora = L.init_lora(params, L.LoRAConfig(rank=RANK, targets=targets), jax.random.key(0))
    # B starts at zero (the adapter is the identity at init): give it values, or a wrongly sharded A would
    # still apply to the base kernel unchanged and the check below could not fail
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    specs = L.lora_logical_axes(logical, lora)
    assert jax.tree.structure(specs, is_leaf=lambda s: isinstance(s, P)) == jax.tree.structure(lora)
    q = specs["unet"]["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]
    assert q["to_q"] == {"lora_A": P("embed", None), "lora_B": P(None, "heads")}
    assert q["to_out"][0] == {"lora_A": P("heads", None), "lora_B": P(None, "embed")}

    mesh_cfg = shd.MeshConfig(data=2, fsdp=4, min_shard_size=1)
    mesh = shd.make_mesh(mesh_cfg, jax.devices()[:8])
    shardings = shd.param_shardings(specs, lora, mesh, mesh_cfg)
    flat = F.flatten(shardings)
    assert all(isinstance(s, NamedSharding) for s in flat.values())
    a_spec = flat["unet/mid_block/attentions/0/transformer_blocks/0/attn1/to_q/lora_A"].spec
    b_spec = flat["unet/mid_block/attentions/0/transformer_blocks/0/attn1/to_q/lora_B"].spec
    assert a_spec == P("fsdp", None) and b_spec == P(None, "fsdp")  # (16, r): embed -> fsdp; (r, 16): heads -> fsdp
    placed = jax.device_put(lora, shardings)
    leaf = placed["unet"]["mid_block"]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["lora_A"]
    assert leaf.addressable_shards[0].data.shape == (4, RANK)
    # the sharded tree still applies (eagerly here) and matches the unsharded result, every targeted kernel
    cfg = L.LoRAConfig(rank=RANK, targets=targets)
    sharded, plain = F.flatten(L.apply_lora(params, placed, cfg)), F.flatten(L.apply_lora(params, lora, cfg))
    base = F.flatten(params)
    changed = [k for k in plain if not np.array_equal(np.asarray(plain[k]), np.asarray(base[k]))]
    assert len(changed) == len(F.flatten(lora)) // 2  # one merged kernel per (A, B) pair, each one moved
    for key in plain:
        np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(plain[key]), rtol=1e-6, atol=1e-6,
                                   err_msg=key)


# --------------------------------------------------------------------------- optional: PEFT parity

def test_peft_parity():
    """Our merged Linear equals PEFT's LoRA Linear with the same factors (skipped without peft)."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(24, 40))
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin"]), model)
    lin = model.lin
    a_t, b_t = lin.lora_A["default"].weight, lin.lora_B["default"].weight  # (r, in), (out, r)
    assert float(a_t.abs().max()) <= 1 / math.sqrt(24) and not torch.any(b_t)  # PEFT's init, as ours
    with torch.no_grad():
        b_t.normal_()
    params = {"lin": {"kernel": jnp.asarray(lin.base_layer.weight.detach().numpy().T),
                      "bias": jnp.asarray(lin.base_layer.bias.detach().numpy())}}
    lora = {"lin": {"lora_A": jnp.asarray(a_t.detach().numpy().T), "lora_B": jnp.asarray(b_t.detach().numpy().T)}}
    merged = L.merge_lora_into(params, lora, L.LoRAConfig(rank=3, alpha=6.0, targets=("lin",)))["lin"]
    x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    ours = np.asarray(jnp.dot(x, merged["kernel"], precision="highest") + merged["bias"])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
