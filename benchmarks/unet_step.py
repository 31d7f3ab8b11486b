"""Tiny UNet training step: JAX (this package) against PyTorch (diffusers), measured in one run.

One step = forward + backward + AdamW update of ``persguard_jax.models.tiny.tiny_unet_config()`` (SD 1.x
layout, block_out_channels (32, 64), 793k parameters) on batch 2, 16x16x4 latents and a 77x32 text context,
with the epsilon-prediction loss: random timesteps, DDPM-noised latents, MSE against the noise.

Both frameworks start from the same weights (the diffusers model's state dict loaded into ours with
``persguard_jax.models.convert.load_state_dict``) and see the same batches; the first-step losses
(``loss_first_*``) show they compute the same thing.

JAX (``jax_step_s``, the numerator of ``ratio``): the WHOLE step (``jax.value_and_grad`` + ``optax.adamw``
update) is one ``jax.jit``, parameters and optimizer state donated, ``block_until_ready`` after every step. The
parameters travel as ONE flat float32 vector (``jax.flatten_util.ravel_pytree``; the model sees them unravelled
inside the jit), so the AdamW update is a few large fusions, the analogue of torch's fused AdamW.
``jax_per_tensor_adamw_step_s`` is the same step with the parameters as a list of per-tensor arrays (optax's
per-leaf update, ~650 small fusions). Neither passes ``nnx.State`` across the jit boundary: unwrapping and
rebuilding ~600 nnx Variables costs ~8 ms of Python per call here.

``jax_dp2_step_s``: the same step data-parallel over 2 virtual CPU devices, batch sharded over a 'data' mesh
axis with ``NamedSharding``, parameters and optimizer state replicated. Each device computes its gradients
under ``jax.shard_map`` and ONE ``pmean`` averages the flat gradient vector (left to the GSPMD partitioner,
every parameter's gradient is all-reduced on its own, ~200 rendezvous per step, slower than one device).
XLA on CPU keeps about one core busy; two devices use both. This needs
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before jax is imported, so ``main`` sets it (unless
XLA_FLAGS already names a device count) and the whole benchmark runs with 2 CPU devices: the single-device
variants use the first one (measured: the 1-device figure and its ratio are the same either way).

PyTorch baseline (``torch_step_s``, the denominator of ``ratio``): diffusers ``UNet2DConditionModel``, eager,
``torch.set_num_threads(2)``, ``torch.optim.AdamW(fused=True)`` (torch's fastest CPU optimizer; the default
AdamW on CPU is a per-tensor loop, reported as ``torch_default_adamw_step_s``). ``--torch-compile`` adds
``torch_compile_step_s``: the fused-AdamW step with the model under ``torch.compile`` (the strongest CPU
baseline; compiling takes minutes).

Timing: after warm-up, ``--rounds`` rounds each run a block of ``--block`` steps of every variant in turn, so
machine drift hits all of them alike; each figure is the median of its ``rounds * block`` single-step times
(default 8 x 4 = 32). ``ratio`` = jax_step_s / torch_step_s, ``ratio_dp2`` = jax_dp2_step_s / torch_step_s.
``load_avg_1min`` (before timing) and ``cpu_steal_pct`` (time the hypervisor gave to other guests while timing)
flag a busy machine: other jobs make every figure slower and noisier, torch's (2 busy threads) most.

Run (from the repository root, the virtualenv having jax, flax, optax, torch==2.13.0 and diffusers)::

    .venv/bin/python benchmarks/unet_step.py --json          # one JSON line (make bench), ~3 minutes
    .venv/bin/python benchmarks/unet_step.py                  # the same, pretty-printed
    .venv/bin/python benchmarks/unet_step.py --json --torch-compile
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported rather than run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_timing_args, cpu_times, device_info, interleaved, steal_pct, versions

BATCH, LATENT, CONTEXT_LEN = 2, 16, 77
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 1e-2  # torch.optim.AdamW defaults, lr aside
NUM_TRAIN_TIMESTEPS = 1000
DP_DEVICES = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_timing_args(p)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (minutes to compile)")
    p.add_argument("--no-dp2", action="store_true", help="skip the 2-device data-parallel variant")
    p.add_argument("--no-extra", action="store_true",
                   help="only the main pair (+dp2): skip per-tensor AdamW (JAX) and default AdamW (torch)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- shared data

def make_batches(n: int, seed: int = 0):
    """``n`` batches of NCHW latents, noise, timesteps and text context (numpy, float32)."""
    import numpy as np
    from persguard_jax.models.tiny import tiny_unet_config
    rng = np.random.default_rng(seed)
    cfg = tiny_unet_config()
    out = []
    for _ in range(n):
        out.append({
            "latents": rng.standard_normal((BATCH, cfg.in_channels, LATENT, LATENT)).astype(np.float32),
            "noise": rng.standard_normal((BATCH, cfg.in_channels, LATENT, LATENT)).astype(np.float32),
            "timesteps": rng.integers(0, NUM_TRAIN_TIMESTEPS, (BATCH,)).astype(np.int32),
            "context": rng.standard_normal((BATCH, CONTEXT_LEN, cfg.cross_attention_dim)).astype(np.float32),
        })
    return out


def alphas_cumprod():
    """The SD 1.x 'scaled_linear' DDPM schedule (beta 0.00085 -> 0.012), float32."""
    import numpy as np
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


# --------------------------------------------------------------------------- PyTorch

def build_torch(threads: int):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from persguard_jax.models.tiny import tiny_unet_config
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TorchUNet.from_config(tiny_unet_config().to_dict()).train()
    with torch.no_grad():  # diffusers zero-initialises conv_out and proj_out: give every weight a value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_state_dict(model):
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def make_torch_step(model, *, fused: bool, compile: bool = False):
    import torch
    import torch.nn.functional as F
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                            fused=fused or None)
    ac = torch.from_numpy(alphas_cumprod())
    fwd = torch.compile(model) if compile else model

    def step(batch):
        x0, noise, t, ctx = batch
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(fwd(noisy, t, ctx).sample, noise)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def torch_batches(batches):
    import torch
    return [(torch.from_numpy(b["latents"]), torch.from_numpy(b["noise"]), torch.from_numpy(b["timesteps"]).long(),
             torch.from_numpy(b["context"])) for b in batches]


# --------------------------------------------------------------------------- JAX

def build_jax(state_dict):
    from flax import nnx
    from persguard_jax.models import convert
    from persguard_jax.models.tiny import tiny_unet_config
    from persguard_jax.models.unet import UNet2DConditionModel
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(tiny_unet_config(), rngs=nnx.Rngs(0)))
    return convert.load_state_dict(abstract, state_dict, source="diffusers UNet2DConditionModel")


def make_jax_step(model, mesh=None, *, flat_params: bool = True, dp: str = "shard_map"):
    """``(step, params, opt_state, rest, put)``: ``step(params, opt_state, rest, *batch)`` -> (params, opt_state, loss).

    ``flat_params``: parameters as one flat vector (else a list of per-tensor arrays). With ``mesh`` the batch
    is sharded over its 'data' axis and everything else replicated; ``dp="shard_map"`` averages the gradients
    with one ``pmean`` of the flat gradient vector, ``dp="gspmd"`` leaves the reduction to XLA's partitioner
    (one all-reduce per parameter tensor; kept for comparison).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.flatten_util import ravel_pytree

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if flat_params:
        params, unravel = ravel_pytree(params)
    else:
        params, params_def = jax.tree.flatten(params)
        unravel = lambda leaves: jax.tree.unflatten(params_def, leaves)
    rest, rest_def = jax.tree.flatten(rest)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    ac = jnp.asarray(alphas_cumprod())

    def loss_fn(params, rest, x0, noise, t, ctx):
        a = ac[t][:, None, None, None]
        noisy = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        model = nnx.merge(graphdef, unravel(params), jax.tree.unflatten(rest_def, rest))
        return jnp.mean(jnp.square(model(noisy, t, ctx) - noise))

    grad_fn = value_and_grad = jax.value_and_grad(loss_fn)
    if mesh is not None and dp == "shard_map":
        from jax.sharding import PartitionSpec as P

        def local(params, rest, x0, noise, t, ctx):
            # Replicated ("invariant") parameters would make autodiff all-reduce every gradient tensor on its
            # own; cast to "varying", the gradients stay local and are averaged below in one pmean.
            params = jax.lax.pcast(params, "data", to="varying")
            loss, grads = value_and_grad(params, rest, x0, noise, t, ctx)  # this device's examples only
            flat, unravel_grads = ravel_pytree(grads)
            return jax.lax.pmean(loss, "data"), unravel_grads(jax.lax.pmean(flat, "data"))

        grad_fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P()) + (P("data"),) * 4, out_specs=(P(), P()))

    def step(params, opt_state, rest, x0, noise, t, ctx):
        loss, grads = grad_fn(params, rest, x0, noise, t, ctx)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        device = jax.devices()[0]
        jitted = jax.jit(step, donate_argnums=(0, 1))
        put = lambda x: jax.device_put(x, device)
    else:
        from jax.sharding import NamedSharding, PartitionSpec as P
        device = repl = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P("data"))
        jitted = jax.jit(step, donate_argnums=(0, 1), in_shardings=(repl, repl, repl, data, data, data, data),
                         out_shardings=(repl, repl, repl))
        put = lambda x: jax.device_put(x, data)
    params, rest = jax.device_put(params, device), jax.device_put(rest, device)
    opt_state = jax.device_put(tx.init(params), device)
    return jitted, params, opt_state, rest, put


def jax_batches(batches, put):
    import numpy as np
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    return [tuple(put(a) for a in (nhwc(b["latents"]), nhwc(b["noise"]), b["timesteps"], b["context"]))
            for b in batches]


class JaxRunner:
    """Compiles the step ahead of time and holds the donated state; ``__call__(batch)`` runs one step and waits."""

    def __init__(self, model, mesh=None, batches=(), **kw):
        self.step, self.params, self.opt_state, self.rest, self.put = make_jax_step(model, mesh, **kw)
        self.batches = jax_batches(batches, self.put)
        t0 = time.perf_counter()
        self.compiled = self.step.lower(self.params, self.opt_state, self.rest, *self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t0

    def __call__(self, batch):
        self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.rest, *batch)
        return float(loss.block_until_ready())


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.no_dp2:
        from persguard_jax.sharding import request_cpu_devices
        request_cpu_devices(DP_DEVICES)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    tmodel = build_torch(args.threads)
    state_dict = torch_state_dict(tmodel)
    batches = make_batches(8)
    tb = torch_batches(batches)

    variants, data, compile_s = {}, {}, {}

    def add_jax(name, mesh=None, **kw):
        runner = JaxRunner(build_jax(state_dict), mesh, batches, **kw)
        variants[name], data[name], compile_s[name] = runner, runner.batches, runner.compile_s

    def add_torch(name, **kw):
        variants[name], data[name] = make_torch_step(tmodel, **kw), tb

    add_jax("jax")
    add_torch("torch", fused=True)
    dp2_skipped = None
    if not args.no_dp2:
        if jax.device_count() >= DP_DEVICES:
            add_jax("jax_dp2", Mesh(np.array(jax.devices()[:DP_DEVICES]), ("data",)))
        else:
            dp2_skipped = (f"only {jax.device_count()} device(s): jax's CPU backend started before "
                           f"--xla_force_host_platform_device_count={DP_DEVICES} could be set")
    if not args.no_extra:
        add_jax("jax_per_tensor_adamw", flat_params=False)
        add_torch("torch_default_adamw", fused=False)
    torch_compile_s = compile_loss = None
    if args.torch_compile:
        add_torch("torch_compile", fused=True, compile=True)
        t0 = time.perf_counter()
        compile_loss = variants["torch_compile"](tb[0])  # this first (compiling) call is a training step too
        torch_compile_s = time.perf_counter() - t0

    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu0 = cpu_times()
    med, _, loss = interleaved(variants, data, rounds=args.rounds, block=args.block, warmup=args.warmup)
    cpu1 = cpu_times()
    if compile_loss is not None:
        loss["torch_compile"] = compile_loss

    result = {
        "benchmark": "tiny UNet training step (fwd+bwd+AdamW), batch 2, 16x16x4 latents, 77x32 context",
        "jax_step_s": med["jax"],
        "torch_step_s": med["torch"],
        "ratio": med["jax"] / med["torch"],
        "jax_setup": "whole step in one jax.jit, params (one flat vector) and AdamW state donated, 1 CPU device",
        "torch_baseline": f"diffusers UNet2DConditionModel eager, AdamW(fused=True), {args.threads} threads",
    }
    if "jax_dp2" in med:
        result.update({"jax_dp2_step_s": med["jax_dp2"], "ratio_dp2": med["jax_dp2"] / med["torch"],
                       "jax_dp2_setup": f"{DP_DEVICES} virtual CPU devices, batch sharded over 'data' "
                                        "(NamedSharding), params replicated, one pmean of the flat gradients"})
    elif dp2_skipped:
        result["jax_dp2_skipped"] = dp2_skipped
    if "jax_per_tensor_adamw" in med:
        result["jax_per_tensor_adamw_step_s"] = med["jax_per_tensor_adamw"]
        result["torch_default_adamw_step_s"] = med["torch_default_adamw"]
    if "torch_compile" in med:
        result.update({"torch_compile_step_s": med["torch_compile"], "torch_compile_compile_s": torch_compile_s,
                       "ratio_vs_torch_compile": med["jax"] / med["torch_compile"]})
    result.update({
        "jax_compile_s": compile_s["jax"],
        **({"jax_dp2_compile_s": compile_s["jax_dp2"]} if "jax_dp2" in compile_s else {}),
        **{f"loss_first_{k}": v for k, v in loss.items()},
        "param_count": sum(p.numel() for p in tmodel.parameters()),
        "steps_timed_per_variant": args.rounds * args.block,
        "load_avg_1min": load_avg,
        "cpu_steal_pct": steal_pct(cpu0, cpu1),
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "device": device_info(),
        "torch_threads": args.threads,
        "versions": versions(),
        "config": {"batch": BATCH, "latent": [LATENT, LATENT, 4], "context": [CONTEXT_LEN, 32],
                   "unet": "persguard_jax.models.tiny.tiny_unet_config()", "block_out_channels": [32, 64],
                   "layers_per_block": 1, "attention_heads": 4, "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY}",
                   "loss": "epsilon MSE, random timesteps, scaled_linear DDPM schedule", "dtype": "float32"},
    })
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
