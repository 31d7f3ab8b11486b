"""Probe: does one AdamW over the raveled parameters speed up ASPL's DreamBooth steps on the CPU?

    .venv/bin/python benchmarks/aspl_flat_optimizer.py flat

Times ``protect.methods.dreambooth_steps`` (3 steps, the world model, dog_00's photos, one device) as shipped (AdamW
over the 322 parameter leaves) and with the trained parameters raveled into one vector (``jax.flatten_util``), so
clipping and AdamW are a handful of kernels instead of a few per leaf; prints compile time, median of 10 calls and
the largest difference of the results. Measured 2026-12-05 (docs/benchmarks.md, ASPL section): 71.7 ms against
70.5 ms, no gain.
"""
import argparse as ap
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persguard_jax.sharding import request_cpu_devices
request_cpu_devices(1)
import jax, jax.numpy as jnp, numpy as np
from jax.flatten_util import ravel_pytree
from persguard_jax.dreambooth.data import encode_latents, prompt_conditioning
from persguard_jax.io import uint8_to_signed
from persguard_jax.models import functional as F, load_pipeline
from persguard_jax.protect.runner import Protector
from persguard_jax.protect import methods as M
from persguard_jax.workflows.protect import WORKFLOW
import aspl as B
args = B.parse_args(["--devices", "1"])
photos, class_images, class_name = B.world_data(args)
config = WORKFLOW.load(ap.Namespace(config=None, method="aspl",
                                    overrides=(f"protect.class_name={class_name}", "protect.per_device=never")))
pipe = load_pipeline(args.model)
prot = Protector(pipe, config)
s = prot.setting
x = uint8_to_signed(photos)
cond = prompt_conditioning(pipe, config.dreambooth.instance_prompt, len(x), embed=False)
mean, logvar = encode_latents(pipe.vae, x)
c_mean, c_logvar = encode_latents(pipe.vae, uint8_to_signed(class_images))
clean = {"latent_mean": mean, "latent_logvar": logvar, **cond}
prior = {"latent_mean": c_mean, "latent_logvar": c_logvar,
         **prompt_conditioning(pipe, config.dreambooth.class_prompt, len(c_mean), embed=False)}
train, rest = F.partition(prot.params, s.trains)
print("leaves", len(jax.tree.leaves(train)), "params", sum(a.size for a in jax.tree.leaves(train)))
plain = jax.jit(functools.partial(M.dreambooth_steps, steps=3, setting=s))
flat0, unravel = ravel_pytree(train)
from persguard_jax import losses
from persguard_jax.train.unroll import unroll
def flat_steps(f, rest, instance, prior, offset, rng, steps=3, setting=s):
    idx = offset + jnp.arange(steps)
    def pick(examples):
        n = jax.tree.leaves(examples)[0].shape[0]
        return jax.tree.map(lambda a: jnp.asarray(a)[idx % n][:, None], examples)
    data = pick(instance)
    data = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 1), data, pick(prior))
    data["is_prior"] = jnp.tile(jnp.asarray([[0, 1]], jnp.int32), (steps, 1))
    db_loss = losses.bind(losses.dreambooth_loss, model=setting.model, schedule=setting.schedule,
                          cfg=setting.loss_cfg, prior_weight=setting.prior_weight)
    def loss(p, batch, key):
        return db_loss(F.merge(unravel(p), rest), batch, key)
    return unroll(loss, setting.optimizer, steps, order=1, per_step_data=True, scan_unroll=1)(f, data, rng)
def timeit(fn, *a):
    t0 = time.perf_counter(); o = fn(*a); jax.block_until_ready(o); c = time.perf_counter() - t0
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); o = fn(*a); jax.block_until_ready(o); ts.append(time.perf_counter() - t0)
    return c, float(np.median(ts)), o
rng = jax.random.key(0)
c, t, o1 = timeit(plain, train, rest, clean, prior, jnp.int32(0), rng)
print(f"plain compile {c:.1f}s step3 {t*1e3:.1f} ms")
if len(sys.argv) > 1:
    flat = jax.jit(flat_steps)
    c, t, o2 = timeit(flat, flat0, rest, clean, prior, jnp.int32(0), rng)
    print(f"flat compile {c:.1f}s step3 {t*1e3:.1f} ms")
    d = np.abs(np.asarray(ravel_pytree(o1[0])[0]) - np.asarray(o2[0])).max()
    print("max diff", d, "losses", o1[1], o2[1])
