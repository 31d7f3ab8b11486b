"""``Protector`` / ``protect``: run a protection on photos on the engine's mesh, with progress, checkpoints and
measurements.

The compiled pieces are ``protect.methods``'; here they are driven: AdvDM and FSMG run their PGD steps in compiled
chunks of ``protect.chunk`` steps (one progress tick each; PGD has no state, so chunking changes nothing), ASPL one
compiled iteration per tick (surrogate, PGD and model steps inside, no host round trip per step). FSMG's surrogate
is the ``persguard personalize`` recipe itself, trained on the clean photos into ``<out>/surrogate``.

The photos are split over the mesh's batch axes when their number divides it (``sharding.batch_sharding``), the
model as its logical axes say; every process holds the same photos (``sharding.put_global``). With replicated
parameters and ``protect.per_device`` (on GPUs and TPUs by default) the compiled pieces compute per device on a
share of the photos whatever their number (``protect.methods``); on the CPU in one process ``auto`` runs on one
device instead, since further devices there only repeat its work on the same cores. The state (the photos, and
ASPL's model) is checkpointed with Orbax every ``protect.checkpoint_every`` ticks, so ``--resume`` continues a
killed run.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from persguard_jax.protect import methods as M


def make_setting(pipe, config, trains: tuple[str, ...]) -> tuple[M.Setting, dict, dict]:
    """(setting, params, logical axes) of the pipeline's UNet, text encoder and VAE under a protect config (its
    ``protect``, ``dreambooth``, ``optimizer`` and ``loss`` sections)."""
    from persguard_jax import losses
    from persguard_jax import sharding as shd
    from persguard_jax.models import functional as F
    from persguard_jax.schedulers import SchedulerConfig, make_schedule
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    logical = {k: shd.logical_axes(m) for k, m in modules.items()}
    model, params = F.split_modules(modules)
    scheduler_cfg = SchedulerConfig.from_dict(pipe.scheduler_config)
    loss_cfg = losses.pipeline_loss_config(pipe, config.loss)
    db = config.dreambooth
    setting = M.Setting(model=model, schedule=make_schedule(scheduler_cfg), loss_cfg=loss_cfg, trains=trains,
                        prior_weight=db.prior_weight if db.use_prior else 0.0, optimizer=config.optimizer,
                        cfg=config.protect)
    return setting, params, logical


def _replicated(shardings: Any) -> bool:
    return all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


def _per_device(choice: str, shardings: Any) -> bool:
    """Whether the protection runs per device (``ProtectConfig.per_device``): only with replicated parameters."""
    if choice == "never" or not _replicated(shardings):
        return False
    return choice == "always" or jax.local_devices()[0].platform != "cpu"


def _one_device(choice: str, shardings: Any) -> bool:
    """``per_device: auto`` on the CPU in one process with replicated parameters: the protection runs on one
    device. Every further device would only repeat its work on the same cores (ASPL on 2 devices: 0.43 s per
    iteration against 0.29 s on one, compilation 74 against 66 s; docs/benchmarks.md). Several processes keep the
    global mesh, so that every process runs the same program."""
    return (choice == "auto" and jax.local_devices()[0].platform == "cpu" and jax.process_count() == 1
            and len(jax.devices()) > 1 and _replicated(shardings))


def _target_latents(pipe, path: str, resolution: int, n: int, scaling: float) -> np.ndarray:
    from persguard_jax.data.images import load_image
    from persguard_jax.dreambooth import encode_latents
    mean, _ = encode_latents(pipe.vae, load_image(path, resolution)[None])
    return np.repeat(mean * scaling, n, 0)


class _Progress:
    """Checkpoints of the protection's state every ``every`` ticks (Orbax, atomic) and the tick to resume from."""

    def __init__(self, out: Path, every: int, abstract: Any):
        from persguard_jax.train.checkpoint import Checkpointer
        self.ckpt = Checkpointer(out / "checkpoints", max_to_keep=1, save_every=every)
        restored = self.ckpt.restore(abstract)
        self.state, _, self.start = restored if restored is not None else (None, {}, 0)
        self.resumed_from = None if restored is None else self.start  # as the training loop reports it

    def save(self, tick: int, state: Any, *, last: bool) -> None:
        self.ckpt.save(tick, state, force=last)

    def close(self) -> None:
        self.ckpt.close()


class Protector:
    """A protection compiled once for a pipeline and a protect config, then run on any number of photo sets of one
    size and count (the experiment protects every subject with the same compiled programs)."""

    def __init__(self, pipe, config):
        from persguard_jax import sharding as shd
        self.pipe, self.config = pipe, config
        db = config.dreambooth
        self.trains = ("unet", "text_encoder") if db.train_text_encoder else ("unet",)
        self.setting, params, logical = make_setting(pipe, config, self.trains)
        mesh_cfg = config.mesh
        self.mesh = shd.make_mesh(mesh_cfg)
        self.shardings = shd.param_shardings(logical, params, self.mesh, mesh_cfg)
        if _one_device(config.protect.per_device, self.shardings):
            mesh_cfg = dataclasses.replace(mesh_cfg, data=1, fsdp=1, tensor=1, dcn_data=1)
            self.mesh = shd.make_mesh(mesh_cfg, jax.devices()[:1])
            self.shardings = shd.param_shardings(logical, params, self.mesh, mesh_cfg)
        self.put = functools.partial(shd.put_global, mesh=self.mesh, cfg=mesh_cfg)
        self.params = shd.put_global(params, mesh=self.mesh, shardings=self.shardings)
        if _per_device(config.protect.per_device, self.shardings):
            # replicated parameters: the photos and each DreamBooth step's examples go per device (methods)
            self.setting = dataclasses.replace(self.setting, mesh=self.mesh,
                                               batch_axes=shd.batch_axes(self.mesh, mesh_cfg))
        setting = self.setting
        self.iteration = jax.jit(functools.partial(M.aspl_iteration, setting=setting))
        self.measure = jax.jit(functools.partial(M.denoising_losses, setting=setting))

        @functools.partial(jax.jit, static_argnames="steps")
        def chunk(params, images, origin, condition, key, *, steps):
            return M.pgd(M.protection_objective(params, setting), images, origin,
                         M.encoded_condition(params, condition, setting), key, steps=steps, setting=setting)
        self.chunk = chunk

    def __call__(self, photos: np.ndarray, out: str | Path, *, class_images: np.ndarray | None = None,
                 surrogate: dict | None = None, instance_prompt: str | None = None, class_prompt: str | None = None,
                 seed: int | None = None, progress: bool = True) -> tuple[np.ndarray, dict]:
        """Protect ``photos`` (float32 ``(N, S, S, 3)`` in [-1, 1]) into the run folder ``out`` (its checkpoints).
        ``class_images`` (same range): the surrogate's prior-preservation images (ASPL with
        ``dreambooth.prior_weight`` > 0). ``surrogate``: FSMG's fixed model (the networks a DreamBooth run on the
        clean photos trained; the VAE stays the pipeline's). Prompts and seed default to the config's. Returns the
        protected photos (same range, on the 8-bit grid the PNGs hold) and the measurements."""
        from persguard_jax.dreambooth.data import encode_latents, prompt_conditioning
        from persguard_jax.io import signed_to_uint8, uint8_to_signed
        from persguard_jax.train.distributed import to_host
        pipe, put, setting = self.pipe, self.put, self.setting
        cfg, db = self.config.protect, self.config.dreambooth
        instance_prompt, class_prompt = instance_prompt or db.instance_prompt, class_prompt or db.class_prompt
        seed = cfg.seed if seed is None else seed
        out = Path(out)
        t0 = time.time()
        n = len(photos)
        embed = "text_encoder" not in self.trains
        plain = prompt_conditioning(pipe, instance_prompt, n, embed=embed)
        condition = dict(plain)
        if cfg.target_image:
            condition["target_latents"] = _target_latents(pipe, cfg.target_image, db.resolution, n,
                                                          setting.loss_cfg.scaling_factor)
        origin, condition, plain = put(photos.astype(np.float32)), put(condition), put(plain)
        rng = jax.random.key(seed)
        results: dict[str, Any] = {"method": cfg.method, "budget": cfg.budget, "step_size": cfg.step_size,
                                   "targeted": bool(cfg.target_image), "eot": cfg.eot, "photos": n, "seed": seed,
                                   "devices": int(self.mesh.devices.size),
                                   "per_device": setting.mesh is not None}
        if cfg.method == "aspl":
            mean, logvar = encode_latents(pipe.vae, photos)
            clean = put({"latent_mean": mean, "latent_logvar": logvar, **prompt_conditioning(pipe, instance_prompt, n,
                                                                                       embed=embed)})
            prior = None
            if class_images is not None and setting.prior_weight > 0:
                c_mean, c_logvar = encode_latents(pipe.vae, class_images)
                prior = put({"latent_mean": c_mean, "latent_logvar": c_logvar,
                             **prompt_conditioning(pipe, class_prompt, len(class_images), embed=embed)})
            images, attacked, extra = self._aspl(origin, clean, prior, condition, rng, out, progress)
        else:
            attacked = self.params
            if cfg.method == "fsmg":
                if surrogate is None:
                    raise ValueError("protect.method fsmg: needs the surrogate model trained on the clean photos")
                tuned = {k: v for k, v in surrogate.items() if k in self.params}
                placed = self.put(tuned, shardings={k: self.shardings[k] for k in tuned})
                attacked = {**self.params, **placed}
            images, extra = self._pgd_chunks(attacked, origin, condition, rng, out, progress)
        results.update(extra)

        key = jax.random.key(seed + 1)
        protected = uint8_to_signed(signed_to_uint8(to_host(images)))  # on the 8-bit grid the PNGs hold
        before = np.asarray(to_host(self.measure(attacked, origin, plain, key)))
        after = np.asarray(to_host(self.measure(attacked, put(protected), plain, key)))
        results["surrogate_loss"] = {"clean": float(before.mean()), "protected": float(after.mean()),
                                     "per_photo_clean": before.tolist(), "per_photo_protected": after.tolist()}
        results["protect_s"] = round(time.time() - t0, 1)
        results["seconds_per_photo"] = round(results["protect_s"] / n, 2)
        return protected, results

    def _pgd_chunks(self, attacked, origin, condition, rng, out: Path, progress: bool):
        """AdvDM / FSMG: ``attack_steps`` of PGD against fixed parameters, ``chunk`` steps per compiled call."""
        from tqdm.auto import tqdm
        cfg = self.setting.cfg
        sizes = [min(cfg.chunk, cfg.attack_steps - s) for s in range(0, cfg.attack_steps, cfg.chunk)]
        state = _Progress(out, cfg.checkpoint_every, {"images": _abstract(origin)})
        images = origin if state.state is None else state.state["images"]
        history = []
        with tqdm(total=len(sizes), initial=state.start, desc=f"{cfg.method} PGD", unit="chunk",
                  disable=not progress) as bar:
            for i in range(state.start, len(sizes)):
                images, values = self.chunk(attacked, images, origin, condition, jax.random.fold_in(rng, i),
                                            steps=sizes[i])
                history.append({"chunk": i + 1, "pgd_steps": sum(sizes[:i + 1]), "objective": float(values[-1])})
                state.save(i + 1, {"images": images}, last=i + 1 == len(sizes))
                bar.set_postfix(objective=f"{history[-1]['objective']:.4f}")
                bar.update()
        state.close()
        return images, {"pgd_steps": cfg.attack_steps, "history": history, "resumed_from": state.resumed_from}

    def _aspl(self, origin, clean, prior, condition, rng, out: Path, progress: bool):
        """ASPL: ``iterations`` compiled iterations (``methods.aspl_iteration``); the state checkpointed is the
        photos, the model and the latest surrogate (what the measurement attacks)."""
        from tqdm.auto import tqdm

        from persguard_jax.models import functional as F
        cfg = self.setting.cfg
        train, rest = F.partition(self.params, self.setting.trains)
        abstract = jax.tree.map(_abstract, {"images": origin, "model": train, "surrogate": train})
        state = _Progress(out, cfg.checkpoint_every, abstract)
        if state.state is None:
            images, surrogate = origin, train
        else:
            images, train, surrogate = state.state["images"], state.state["model"], state.state["surrogate"]
        history = []
        with tqdm(total=cfg.iterations, initial=state.start, desc="aspl", unit="it", disable=not progress) as bar:
            for i in range(state.start, cfg.iterations):
                train, images, surrogate, metrics = self.iteration(train, rest, images, origin, clean, prior,
                                                                   condition, i, rng)
                history.append({"iteration": i + 1, **{k: float(v) for k, v in metrics.items()}})
                state.save(i + 1, {"images": images, "model": train, "surrogate": surrogate},
                           last=i + 1 == cfg.iterations)
                bar.set_postfix(objective=f"{history[-1]['objective']:.4f}")
                bar.update()
        state.close()
        extra = {"iterations": cfg.iterations, "steps_per_iteration": {"surrogate": cfg.surrogate_steps,
                 "pgd": cfg.pgd_steps, "model": cfg.model_steps}, "history": history, "resumed_from": state.resumed_from}
        return images, F.merge(surrogate, rest), extra


def protect(pipe, photos: np.ndarray, config, out: str | Path, *, class_images: np.ndarray | None = None,
            surrogate: dict | None = None, progress: bool = True) -> tuple[np.ndarray, dict]:
    """One protection run (``Protector``, compiled for this call): ``persguard protect``'s."""
    return Protector(pipe, config)(photos, out, class_images=class_images, surrogate=surrogate, progress=progress)


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
