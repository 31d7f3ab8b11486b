"""Tiny UNet training step: JAX (this package) against PyTorch (diffusers), measured in one run.

One step = forward + backward + AdamW update of ``persguard_jax.models.tiny.tiny_unet_config()`` (SD 1.x
layout, block_out_channels (32, 64), 793k parameters) on batch 2, 16x16x4 latents and a 77x32 text context,
with the epsilon-prediction loss: random timesteps, DDPM-noised latents, MSE against the noise.

Both frameworks start from the same weights (the diffusers model's state dict loaded into ours with
``persguard_jax.models.convert.load_state_dict``) and see the same batches. The first-step loss of each is
reported (``loss_first_jax`` / ``loss_first_torch``) as a check that they compute the same thing.

JAX: the WHOLE step (``jax.value_and_grad`` + ``optax.adamw`` update) is one ``jax.jit`` with parameters and
optimizer state donated; each step ends with ``block_until_ready``. ``jax_dp2_step_s`` is the same step
data-parallel over 2 virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, batch sharded
over a 'data' mesh axis with ``NamedSharding``, parameters replicated, gradients averaged by XLA). It runs in
a subprocess of this script (the flag must be set before jax is imported and should not change the main
measurement); that subprocess times the single-device PyTorch baseline again, interleaved, and
``ratio_dp2`` is computed against that.

PyTorch baseline (``torch_step_s``, the denominator of ``ratio``): diffusers ``UNet2DConditionModel``, eager,
``torch.set_num_threads(2)``, ``torch.optim.AdamW(fused=True)`` (torch's fastest CPU optimizer; the default
AdamW on CPU is a per-tensor Python loop, reported as ``torch_default_adamw_step_s``). ``--torch-compile``
adds ``torch_compile_step_s``: the fused-AdamW step with the model under ``torch.compile`` (the strongest CPU
baseline, but it takes minutes to compile).

Timing: after warm-up, ``--rounds`` rounds each run a block of ``--block`` steps of every variant in turn
(JAX, torch fused, torch default, ...), so machine drift hits all of them alike; each figure is the median over
its ``rounds * block`` single-step times (default 8 x 4 = 32). ``ratio`` = jax_step_s / torch_step_s.

Run (from the repository root, the virtualenv having jax, flax, optax, torch==2.13.0 and diffusers)::

    .venv/bin/python benchmarks/unet_step.py --json          # one JSON line (make bench)
    .venv/bin/python benchmarks/unet_step.py                  # the same, pretty-printed
    .venv/bin/python benchmarks/unet_step.py --json --torch-compile --no-dp2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BATCH, LATENT, CONTEXT_LEN = 2, 16, 77
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 1e-2  # torch.optim.AdamW defaults, lr aside
NUM_TRAIN_TIMESTEPS = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    p.add_argument("--block", type=int, default=4, help="steps per variant per round (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, the cores here)")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (minutes to compile)")
    p.add_argument("--no-dp2", action="store_true", help="skip the 2-virtual-device data-parallel variant")
    p.add_argument("--no-default-adamw", action="store_true", help="skip torch's default (for-loop) AdamW")
    p.add_argument("--dp2-worker", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    return p.parse_args(argv)


# --------------------------------------------------------------------------- shared data

def make_batches(n: int, seed: int = 0):
    """``n`` batches of NCHW latents, noise, timesteps and text context (numpy, float32)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    from persguard_jax.models.tiny import tiny_unet_config
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


def make_jax_step(model, mesh=None):
    """``(step, params, opt_state, rest, put)``: ``step(params, opt_state, rest, *batch)`` -> (params, opt_state, loss).

    With ``mesh`` the batch is sharded over its 'data' axis and everything else replicated.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY)
    ac = jnp.asarray(alphas_cumprod())

    def loss_fn(params, rest, x0, noise, t, ctx):
        a = ac[t][:, None, None, None]
        noisy = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        pred = nnx.merge(graphdef, params, rest)(noisy, t, ctx)
        return jnp.mean(jnp.square(pred - noise))

    def step(params, opt_state, rest, x0, noise, t, ctx):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x0, noise, t, ctx)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(0, 1))
        put = jax.device_put
    else:
        from jax.sharding import NamedSharding, PartitionSpec as P
        repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        jitted = jax.jit(step, donate_argnums=(0, 1), in_shardings=(repl, repl, repl, data, data, data, data),
                         out_shardings=(repl, repl, repl))
        put = lambda x: jax.device_put(x, data)
        params, rest = jax.device_put(params, repl), jax.device_put(rest, repl)
    opt_state = tx.init(params)
    if mesh is not None:
        opt_state = jax.device_put(opt_state, NamedSharding(mesh, P()))
    return jitted, params, opt_state, rest, put


def jax_batches(batches, put):
    import numpy as np
    nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    return [tuple(put(a) for a in (nhwc(b["latents"]), nhwc(b["noise"]), b["timesteps"], b["context"]))
            for b in batches]


class JaxRunner:
    """Holds the donated state between calls; ``__call__(batch)`` runs one step and waits for it."""

    def __init__(self, model, mesh=None, batches=()):
        self.step, self.params, self.opt_state, self.rest, self.put = make_jax_step(model, mesh)
        self.batches = jax_batches(batches, self.put)
        t0 = time.perf_counter()
        self.compiled = self.step.lower(self.params, self.opt_state, self.rest, *self.batches[0]).compile()
        self.compile_s = time.perf_counter() - t0

    def __call__(self, batch):
        self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.rest, *batch)
        return float(loss.block_until_ready())


# --------------------------------------------------------------------------- timing

def interleaved(variants: dict, batches: dict, *, rounds: int, block: int, warmup: int) -> dict:
    """Median seconds per step of each variant, blocks of ``block`` steps interleaved over ``rounds`` rounds."""
    times = {name: [] for name in variants}
    first_loss = {}
    counters = dict.fromkeys(variants, 0)

    def run(name, record):
        fn, bs = variants[name], batches[name]
        b = bs[counters[name] % len(bs)]
        counters[name] += 1
        t0 = time.perf_counter()
        loss = fn(b)
        dt = time.perf_counter() - t0
        first_loss.setdefault(name, loss)
        if record:
            times[name].append(dt)

    for name in variants:
        for _ in range(warmup):
            run(name, False)
    for _ in range(rounds):
        for name in variants:
            for _ in range(block):
                run(name, True)
    return {name: statistics.median(ts) for name, ts in times.items()}, times, first_loss


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def dp2_worker(args) -> dict:
    """Runs in the subprocess with 2 virtual CPU devices: dp2 JAX vs the torch fused-AdamW baseline."""
    import jax
    import numpy as np
    from jax.sharding import Mesh
    assert jax.device_count() >= 2, "XLA_FLAGS did not take effect"
    tmodel = build_torch(args.threads)
    batches = make_batches(8)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    jr = JaxRunner(build_jax(torch_state_dict(tmodel)), mesh, batches)
    med, _, loss = interleaved({"jax_dp2": jr, "torch": make_torch_step(tmodel, fused=True)},
                               {"jax_dp2": jr.batches, "torch": torch_batches(batches)},
                               rounds=args.rounds, block=args.block, warmup=args.warmup)
    return {"jax_dp2_step_s": med["jax_dp2"], "torch_step_s_dp2_run": med["torch"],
            "ratio_dp2": med["jax_dp2"] / med["torch"], "jax_dp2_compile_s": jr.compile_s,
            "loss_first_jax_dp2": loss["jax_dp2"]}


def run_dp2_subprocess(args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--dp2-worker", "--rounds", str(args.rounds),
           "--block", str(args.block), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        return {"jax_dp2_error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dp2_worker:
        print(json.dumps(dp2_worker(args)))
        return {}

    import jax
    tmodel = build_torch(args.threads)
    model = build_jax(torch_state_dict(tmodel))
    batches = make_batches(8)
    jr = JaxRunner(model, None, batches)
    tb = torch_batches(batches)
    variants = {"jax": jr, "torch": make_torch_step(tmodel, fused=True)}
    if not args.no_default_adamw:
        variants["torch_default_adamw"] = make_torch_step(tmodel, fused=False)
    compile_s = None
    if args.torch_compile:
        variants["torch_compile"] = make_torch_step(tmodel, fused=True, compile=True)
        t0 = time.perf_counter()
        variants["torch_compile"](tb[0])
        compile_s = time.perf_counter() - t0
    med, _, loss = interleaved(variants, {k: (jr.batches if k == "jax" else tb) for k in variants},
                               rounds=args.rounds, block=args.block, warmup=args.warmup)

    result = {
        "benchmark": "tiny UNet training step (fwd+bwd+AdamW), batch 2, 16x16x4 latents, 77x32 context",
        "jax_step_s": med["jax"],
        "torch_step_s": med["torch"],
        "ratio": med["jax"] / med["torch"],
        "torch_baseline": f"diffusers UNet2DConditionModel eager, AdamW(fused=True), {args.threads} threads",
    }
    if "torch_default_adamw" in med:
        result["torch_default_adamw_step_s"] = med["torch_default_adamw"]
    if "torch_compile" in med:
        result["torch_compile_step_s"] = med["torch_compile"]
        result["torch_compile_compile_s"] = compile_s
        result["ratio_vs_torch_compile"] = med["jax"] / med["torch_compile"]
    if not args.no_dp2:
        result.update(run_dp2_subprocess(args))
    n_params = sum(p.numel() for p in tmodel.parameters())
    result.update({
        "jax_compile_s": jr.compile_s,
        "loss_first_jax": loss["jax"],
        "loss_first_torch": loss["torch"],
        "param_count": n_params,
        "steps_timed_per_variant": args.rounds * args.block,
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
        "device": device_info(),
        "torch_threads": args.threads,
        "versions": versions(),
        "config": {"batch": BATCH, "latent": [LATENT, LATENT, 4], "context": [CONTEXT_LEN, 32],
                   "unet": "persguard_jax.models.tiny.tiny_unet_config()", "block_out_channels": [32, 64],
                   "layers_per_block": 1, "attention_heads": 4, "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY}",
                   "loss": "epsilon MSE, random timesteps, scaled_linear DDPM schedule", "dtype": "float32"},
    })
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
