"""DiffShortcut on the synthetic world: protections, purifiers and contrastive decoupling learning, one table.

    python experiments/diffshortcut.py --out runs/diffshortcut [--subjects dog_00,cat_00,...] [--seeds 0,1]
        [--curve 6.4,11,16,32] [--curve-subjects 3] [--budget B] [--methods aspl,advdm,fsmg]
        [--purifiers jpeg,blur,tv,sdedit,sr] [--combo sdedit] [--steps 200]
        [--cdl-empty-negative] [--cdl-plain-prompt]

1. The budget curve: ASPL at each ``--curve`` budget on the first ``--curve-subjects`` subjects, every seed, then the
   attacker on the protected photos and on uniform noise of the same l_inf size (the control).
2. The main budget: ``--budget``, else the smallest curve budget at which ASPL clearly hurts: the mean identity
   similarity drops by >= 0.1 below the clean photos' and by >= 0.05 more than the noise control's (else the
   largest budget).
3. The main table at that budget, every subject and seed: the attacker on clean photos, on each method's protected
   photos, on them purified (each of ``--purifiers``; ``--purifiers-for`` limits which methods get all of them, the
   rest get ``--combo`` only), with CDL only, and purified (``--combo``, and ``--extra-combos``) + CDL; and CDL on
   the clean photos (what CDL costs when there is nothing to decouple).
   ``--cdl-empty-negative`` measures every CDL run a second time sampled against the empty prompt instead of CDL's
   quality negative prompt (condition ``...:empty-negative``; the same training). ``--cdl-plain-prompt`` measures
   it once more under the plain prompt "a photo of sks <class>" against the empty prompt, as the runs without CDL
   are sampled (``...:plain-prompt``): whether what CDL costs is its sampling prompt.

The attacker is the world DreamBooth recipe (configs/dreambooth_world.yaml: 200 steps, lr 2e-4, prior weight 1, 50
class images sampled from the base model, UNet and text encoder trained), run as ``protect.methods.dreambooth_steps``
(the same loss, optimizer and pairing as ``persguard personalize``, in one compiled scan reused by every run of
the sweep). Each run samples ``--num-images`` images of "a photo of sks <class>" (CDL: its sampling policy) and
measures, against the subject's clean photos: identity similarity and CLIP-I (world CLIP), the subject-colour match
(pixel detector), and the Frechet distance of the samples' CLIP features to the base model's samples of "a photo
of <class>" (quality: lower is closer to clean pictures of the class). Protections come from ``protect.runner.
Protector`` (compiled once per method and budget) with configs/protect_world.yaml.

Writes ``<out>/runs.jsonl`` (one line per attacker run, appended as each ends; a rerun skips the lines it has) and
``<out>/table.md`` (means and spreads over subjects and seeds); docs/results.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _tables import record, recorded

WORLD = "persguard_jax/assets/world_tiny"


def parse_args(argv=None):
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default=WORLD)
    p.add_argument("--subjects", type=words, default=None, help="default: the first held-out subject of 4 classes")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--curve", type=floats, default=[6.4, 11.0, 16.0, 32.0])
    p.add_argument("--curve-subjects", type=int, default=3)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--methods", type=words, default=["aspl", "advdm", "fsmg"])
    p.add_argument("--purifiers", type=words, default=["jpeg", "blur", "tv", "sdedit", "sr"])
    p.add_argument("--purifiers-for", type=words, default=["aspl"], help="methods that get every purifier")
    p.add_argument("--combo", default="sdedit", help="the purifier paired with CDL")
    p.add_argument("--extra-combos", type=words, default=[], help="more purifiers paired with CDL (--purifiers-for)")
    p.add_argument("--cdl-empty-negative", action="store_true",
                   help="also sample CDL runs against the empty prompt instead of CDL's quality negative prompt")
    p.add_argument("--cdl-plain-prompt", action="store_true",
                   help="also sample CDL runs under the plain instance prompt, as the runs without CDL are sampled")
    p.add_argument("--steps", type=int, default=200, help="the attacker's DreamBooth steps")
    p.add_argument("--photos", type=int, default=5)
    p.add_argument("--num-images", type=int, default=16)
    return p.parse_args(argv)


class World:
    """The base model, its CLIP, class images and reference samples, and the compiled attacker."""

    def __init__(self, args):
        import jax

        from persguard_jax.data.world import world_of
        from persguard_jax.metrics import CLIPEvaluator
        from persguard_jax.models import load_pipeline
        from persguard_jax.models import functional as F
        from persguard_jax.protect import methods as M
        from persguard_jax.protect.runner import make_setting
        from persguard_jax.resources import world_asset
        from persguard_jax.workflows.protect import WORKFLOW
        self.args, self.world = args, world_of(args.model)
        self.pipe = load_pipeline(args.model)
        self.evaluator = CLIPEvaluator.from_folder(world_asset("world_clip", "config.json"))
        self.config = WORKFLOW.load(argparse.Namespace(config=None, overrides=(), method="aspl"))
        self.db = self.config.dreambooth
        self.setting, self.params, _ = make_setting(self.pipe, self.config, ("unet", "text_encoder"))
        self.train, self.rest = F.partition(self.params, self.setting.trains)
        self.attack = jax.jit(lambda train, inst, prior, key: M.dreambooth_steps(
            train, self.rest, inst, prior, 0, key, steps=args.steps, setting=self.setting)[0])
        self._classes, self._refs = {}, {}
        self.protectors = {}

    def class_images(self, c: str) -> np.ndarray:
        """50 samples of "a photo of <class>" from the base model ([-1, 1]), as the recipe's class-image cache."""
        from persguard_jax.sample import text_to_image
        if c not in self._classes:
            images = text_to_image(self.pipe, [f"a photo of {c}"] * self.db.num_class_images, num_steps=25,
                                   guidance_scale=4.0, seed=self.db.seed + 1, progress=False)
            self._classes[c] = images * 2.0 - 1.0
        return self._classes[c]

    def reference_features(self, c: str) -> np.ndarray:
        """CLIP features of the base model's samples of "a photo of <class>" (the quality reference)."""
        from persguard_jax.sample import text_to_image
        if c not in self._refs:
            images = text_to_image(self.pipe, [f"a photo of {c}"] * 64, num_steps=25, guidance_scale=4.0, seed=99,
                                   progress=False)
            self._refs[c] = np.asarray(self.evaluator.image_features(images))
        return self._refs[c]

    def personalise(self, photos: np.ndarray, c: str, seed: int, *, cdl: bool) -> dict:
        """The attacker on ``photos`` ([-1, 1]); returns the trained parameters."""
        import jax

        from persguard_jax.dreambooth import CDLConfig
        from persguard_jax.dreambooth.data import encode_latents, prompt_conditioning
        from persguard_jax.models import functional as F
        policy = CDLConfig(enabled=True)
        inst_prompt, cls_prompt = f"a photo of sks {c}", f"a photo of {c}"
        if cdl:
            inst_prompt, cls_prompt = policy.instance_prompt(inst_prompt), policy.class_prompt(cls_prompt)
        m, lv = encode_latents(self.pipe.vae, photos)
        cm, clv = encode_latents(self.pipe.vae, self.class_images(c))
        inst = {"latent_mean": m, "latent_logvar": lv,
                **prompt_conditioning(self.pipe, inst_prompt, len(m), embed=False)}
        prior = {"latent_mean": cm, "latent_logvar": clv,
                 **prompt_conditioning(self.pipe, cls_prompt, len(cm), embed=False)}
        trained = self.attack(self.train, inst, prior, jax.random.key(seed))
        return jax.tree.map(np.asarray, F.merge(trained, self.rest))

    def measure(self, params: dict, clean_u8: np.ndarray, c: str, seed: int, *, cdl: bool,
                negative_prompt: str | None = None) -> dict:
        from persguard_jax.dreambooth import CDLConfig
        from persguard_jax.evaluate import evaluate_pipeline
        from persguard_jax.metrics import frechet_distance
        prompt, negative, guidance = f"a photo of sks {c}", "", 4.0
        if cdl:
            policy = CDLConfig(enabled=True, **({} if negative_prompt is None else
                                                {"negative_prompt": negative_prompt}))
            prompt, negative, guidance = (policy.sampling_prompt(prompt), policy.negative_prompt,
                                          policy.guidance_scale(4.0))
        ev = evaluate_pipeline(self.pipe, [prompt], references=clean_u8, evaluator=self.evaluator, world=self.world,
                               num_images=self.args.num_images, seed=seed + 100, num_steps=25,
                               guidance_scale=guidance, negative_prompt=negative, params=params)
        row = ev.results["prompts"][0]
        feats = np.asarray(self.evaluator.image_features(ev.images[0]))
        return {"identity": row.get("identity_similarity"), "clip_i": row.get("clip_i"),
                "colour": row.get("colour_match"), "shape": row.get("shape_match"),
                "fd": float(frechet_distance(feats, self.reference_features(c)))}

    def protector(self, method: str, budget: float):
        from persguard_jax.protect.runner import Protector
        from persguard_jax.workflows.protect import WORKFLOW
        key = (method, budget)
        if key not in self.protectors:
            config = WORKFLOW.load(argparse.Namespace(config=None, overrides=(f"protect.budget={budget}",),
                                                      method=method))
            self.protectors[key] = Protector(self.pipe, config)
        return self.protectors[key]


def protect(w: World, method: str, budget: float, photos: np.ndarray, c: str, seed: int, out: Path) -> np.ndarray:
    """``photos`` ([-1, 1]) protected (cached under ``out``, so a rerun reuses them)."""
    from persguard_jax.io import signed_to_uint8, uint8_to_signed
    cache = out / "protected" / f"{method}-{budget:g}-{c}-{seed}.npy"
    if cache.exists():
        return uint8_to_signed(np.load(cache))
    surrogate = w.personalise(photos, c, seed, cdl=False) if method == "fsmg" else None
    protected, _ = w.protector(method, budget)(
        photos, out / "protect_runs" / cache.stem, class_images=w.class_images(c), surrogate=surrogate,
        instance_prompt=f"a photo of sks {c}", class_prompt=f"a photo of {c}", seed=seed, progress=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, signed_to_uint8(protected))
    return protected


def purify(w: World, name: str, photos: np.ndarray, c: str) -> np.ndarray:
    from persguard_jax import purifiers as P
    sections = {"sdedit": {"class_name": c, "guidance": 4.0, "steps": 25}}
    chain = P.parse_chain(name, sections)
    return P.purify((photos + 1.0) / 2.0, chain, pipe=w.pipe, batch_size=len(photos)).images * 2.0 - 1.0


def main(argv=None):
    from persguard_jax.io import signed_to_uint8, uint8_to_signed
    from persguard_jax.metrics.shortcut import uniform_noise_like
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    w = World(args)
    subjects = args.subjects or [next(s for s in w.world.subjects if s.class_name == c and s.held_out).name
                                 for c in ("dog", "cat", "bird", "person")]
    rows = recorded(args.out)
    done = {json.dumps(r["key"]) for r in rows}

    def run(key: dict, photos: np.ndarray, clean_u8, c: str, seed: int, *, cdl: bool = False) -> None:
        variants = [v for v, on in ((":empty-negative", args.cdl_empty_negative),
                                    (":plain-prompt", args.cdl_plain_prompt)) if cdl and on]
        keys = [key] + [{**key, "condition": key["condition"] + v} for v in variants]
        if all(json.dumps(k) in done for k in keys):
            return
        t0 = time.time()
        params = w.personalise(photos, c, seed, cdl=cdl)
        for k in keys:  # one training, measured under each sampling policy
            if json.dumps(k) in done:
                continue
            negative = "" if k["condition"].endswith(":empty-negative") else None
            policy = cdl and not k["condition"].endswith(":plain-prompt")  # CDL's sampling prompt, or the plain one
            row = {"key": k, **w.measure(params, clean_u8, c, seed, cdl=policy, negative_prompt=negative),
                   "seconds": round(time.time() - t0, 1)}
            record(args.out, rows, row)
            done.add(json.dumps(k))
            print(json.dumps(row), flush=True)

    def photos_of(name: str):
        subject = w.world.subject(name)
        u8 = w.world.subject_photos(subject, args.photos)
        return subject.class_name, u8, uint8_to_signed(u8)

    for name in subjects[:args.curve_subjects]:
        c, u8, x = photos_of(name)
        for seed in args.seeds:
            run({"subject": name, "seed": seed, "condition": "clean"}, x, u8, c, seed)
            for budget in args.curve:
                protected = protect(w, "aspl", budget, x, c, seed, args.out)
                run({"subject": name, "seed": seed, "method": "aspl", "budget": budget, "condition": "protected"},
                    protected, u8, c, seed)
                noise = uint8_to_signed(uniform_noise_like(u8, signed_to_uint8(protected), seed=seed))
                run({"subject": name, "seed": seed, "method": "noise", "budget": budget, "condition": "protected"},
                    noise, u8, c, seed)
    budget = args.budget if args.budget is not None else choose_budget(rows, args.curve)
    (args.out / "main_budget.json").write_text(json.dumps({"budget": budget}) + "\n")
    print(f"main budget: {budget:g}/255", flush=True)
    for name in subjects:
        c, u8, x = photos_of(name)
        for seed in args.seeds:
            run({"subject": name, "seed": seed, "condition": "clean"}, x, u8, c, seed)
            run({"subject": name, "seed": seed, "condition": "clean+cdl"}, x, u8, c, seed, cdl=True)  # CDL's own cost
            for method in args.methods:
                protected = protect(w, method, budget, x, c, seed, args.out)
                base = {"subject": name, "seed": seed, "method": method, "budget": budget}
                run({**base, "condition": "protected"}, protected, u8, c, seed)
                run({**base, "condition": "cdl"}, protected, u8, c, seed, cdl=True)
                purifiers = args.purifiers if method in args.purifiers_for else [args.combo]
                combos = {args.combo, *(args.extra_combos if method in args.purifiers_for else [])}
                for purifier in purifiers:
                    cleaned = purify(w, purifier, protected, c)
                    run({**base, "condition": f"purified:{purifier}"}, cleaned, u8, c, seed)
                    if purifier in combos:
                        run({**base, "condition": f"purified:{purifier}+cdl"}, cleaned, u8, c, seed, cdl=True)
    text = table(rows, budget, args.curve)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def _select(rows, **want):
    return [r for r in rows if all(r["key"].get(k) == v for k, v in want.items())]


def choose_budget(rows: list[dict], curve: list[float]) -> float:
    """The smallest budget at which ASPL clearly hurts (module docstring), else the largest."""
    clean = {(r["key"]["subject"], r["key"]["seed"]): r["identity"] for r in _select(rows, condition="clean")}
    for budget in sorted(curve):
        drop = [clean[(r["key"]["subject"], r["key"]["seed"])] - r["identity"]
                for r in _select(rows, method="aspl", budget=budget, condition="protected")]
        noise = [clean[(r["key"]["subject"], r["key"]["seed"])] - r["identity"]
                 for r in _select(rows, method="noise", budget=budget, condition="protected")]
        if drop and np.mean(drop) >= 0.1 and np.mean(drop) - np.mean(noise) >= 0.05:
            return budget
    return max(curve)


def _condition(key: dict) -> str:
    return key["condition"] if "method" not in key else f"{key['method']}: {key['condition']}"


def table(rows: list[dict], budget: float, curve: list[float], learnable: float = 0.5) -> str:
    """The budget curve, the main table over every subject and over the subjects the attacker learns from clean
    photos (clean identity >= ``learnable``: where a protection has something to prevent), and identity per
    subject and seed."""
    metrics = ("identity", "clip_i", "colour", "fd")
    head = "| condition | runs | identity | CLIP-I | subject colour | FD to class samples |\n|---|---|---|---|---|---|"

    def line(label: str, sel: list[dict]) -> str:
        return f"| {label} | {len(sel)} | " + " | ".join(_mean_std([r[m] for r in sel]) for m in metrics) + " |"

    curve_subjects = {r["key"]["subject"] for r in rows if r["key"].get("method") == "noise"}
    in_curve = [r for r in rows if r["key"]["subject"] in curve_subjects]
    lines = [f"Budget curve (ASPL vs uniform noise of the same l_inf size; {', '.join(sorted(curve_subjects))}, all "
             "seeds):", "", head, line("clean photos", _select(in_curve, condition="clean"))]
    for b in curve:
        for method in ("aspl", "noise"):
            lines.append(line(f"{method} {b:g}/255", _select(in_curve, method=method, budget=b, condition="protected")))
    main = [r for r in rows if "method" not in r["key"] or
            (r["key"].get("budget") == budget and r["key"]["method"] != "noise")]
    order = list(dict.fromkeys(_condition(r["key"]) for r in main))
    clean = {(r["key"]["subject"], r["key"]["seed"]): r["identity"] for r in _select(rows, condition="clean")}
    learned = [r for r in main if clean.get((r["key"]["subject"], r["key"]["seed"]), 0) >= learnable]
    left_out = sorted({f"{s} seed {d}" for (s, d), v in clean.items() if v < learnable})
    for title, sel in ((f"Main table at {budget:g}/255, every subject and seed:", main),
                       (f"The same over the runs whose clean-photo attacker reaches identity >= {learnable} (left out: "
                        f"{', '.join(left_out) or 'none'}):", learned)):
        lines += ["", title, "", head]
        lines += [line(c, [r for r in sel if _condition(r["key"]) == c]) for c in order
                  if any(_condition(r["key"]) == c for r in sel)]
    pairs = sorted({(r["key"]["subject"], r["key"]["seed"]) for r in main})
    lines += ["", "Identity similarity per subject and seed:", "",
              "| condition | " + " | ".join(f"{s} s{d}" for s, d in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for c in order:
        by = {(r["key"]["subject"], r["key"]["seed"]): r["identity"] for r in main if _condition(r["key"]) == c}
        lines.append(f"| {c} | " + " | ".join(f"{by[p]:.2f}" if p in by else "" for p in pairs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
