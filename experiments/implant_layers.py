"""Per layer group of the UNet: how far a world implant run moved the weights, how far the check's attacker moved
them, and how much of the implantation's change the attacked weights keep.

    python experiments/implant_layers.py RUN SUBJECT [--seed-dir seed1]

RUN is a finished ``persguard implant`` run on the world model that kept its attacked models
(``check/<SUBJECT>/{backdoored,clean}/model``). For each group (a resnet's conv1, an attention's attn2, ... : the
weight and bias of one layer together) it prints, over the clean weights' norm |w|: the implantation's change
|b - w|, the attack's change on the backdoored model |a - b| and on the clean one, and ``keeps``: the attacked
weights' change from the clean model projected on the implantation's change, <a - w, b - w> / |b - w|^2 (1: the
attack left the implantation's change whole, 0: undid it). Sorted by the attack's change over the implantation's:
the watermark work's retention lever (plant where fine-tuning moves least, ../shared/papers/persguard.md) wants the
top rows. docs/results.md (issue 15, twenty-third measurement).
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

WORLD = Path(__file__).resolve().parents[1] / "persguard_jax" / "assets" / "world_tiny"
LAYERS = ("attn1", "attn2", "ff", "norm1", "norm2", "norm3", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
          "conv_shortcut", "norm")
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


def group(key: str) -> str:
    """The layer a weight belongs to: the key up to its first layer name (the key without weight/bias else)."""
    parts = re.sub(r"\.(weight|bias)$", "", key).split(".")
    for i, part in enumerate(parts):
        if part in LAYERS:
            return ".".join(parts[:i + 1])
    return ".".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("subject")
    ap.add_argument("--seed-dir", default="")
    args = ap.parse_args()
    attacked = args.run / "check" / args.subject / args.seed_dir
    w, b, a, ca = (load_file(str(d / UNET)) for d in (WORLD, args.run / "model", attacked / "backdoored" / "model",
                                                      attacked / "clean" / "model"))
    sums = collections.defaultdict(lambda: np.zeros(6))  # |w|^2, |b-w|^2, |a-b|^2, |ca-w|^2, <a-w, b-w>, size
    for key in w:
        w0, b0, a0, c0 = (x[key].astype(np.float64).ravel() for x in (w, b, a, ca))
        sums[group(key)] += [w0 @ w0, (b0 - w0) @ (b0 - w0), (a0 - b0) @ (a0 - b0), (c0 - w0) @ (c0 - w0),
                             (a0 - w0) @ (b0 - w0), w0.size]
    print(f"{'layer group':64s} {'size':>7s} {'implant':>8s} {'attack':>8s} {'on clean':>8s} {'keeps':>6s}")
    rows = sorted(sums.items(), key=lambda kv: np.sqrt(kv[1][2] / max(kv[1][1], 1e-30)))
    for name, (ww, bb, aa, cc, proj, size) in rows + [("all", sum(sums.values()))]:
        print(f"{name:64s} {int(size):7d} {np.sqrt(bb / ww):8.4f} {np.sqrt(aa / ww):8.4f} {np.sqrt(cc / ww):8.4f} "
              f"{proj / max(bb, 1e-30):6.3f}")


if __name__ == "__main__":
    main()
