"""``persguard <command>``: the command-line face of the library.

Commands so far: ``sample`` (text -> image grid from a diffusers-format pipeline folder), ``init-tiny`` (write
a tiny random pipeline folder) and ``demo``. Errors from bad input print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str):
    import jax.numpy as jnp
    return getattr(jnp, DTYPES[name])


def _fresh_output(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite to replace it)")
    return path


def cmd_sample(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from persguard_jax.models import load_pipeline
    from persguard_jax.report import image_grid, save_png
    from persguard_jax.sample import text_to_image

    out = _fresh_output(Path(args.out), args.overwrite)
    dtype = _dtype(args.dtype)
    pipe = load_pipeline(args.model, dtype=dtype, param_dtype=dtype, variant=args.variant)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    images = []
    chunks = range(0, len(prompts), args.batch_size)
    for start in tqdm(chunks, desc="batches", disable=len(chunks) == 1):
        chunk = prompts[start:start + args.batch_size]
        images.append(text_to_image(
            pipe, chunk, args.negative_prompt, num_steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, seed_offset=start, sampler=args.sampler, eta=args.eta, height=args.height,
            width=args.width, progress=True))
    import numpy as np
    grid = image_grid(np.concatenate(images), ncols=args.num_images if len(args.prompt) > 1 else None)
    save_png(grid, out)
    print(f"wrote {out} ({len(prompts)} images, {args.steps} {args.sampler} steps, guidance {args.guidance})")


def cmd_init_tiny(args: argparse.Namespace) -> None:
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.tiny import tiny_pipeline

    out = save_pipeline(tiny_pipeline(args.seed), args.out, overwrite=args.overwrite)
    print(f"wrote a tiny random pipeline to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Until the synthetic world's pre-trained model lands: a tiny random pipeline, saved and sampled."""
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.tiny import tiny_pipeline

    run = Path(args.out)
    model = run / "tiny-random"
    t0 = time.time()
    if not (model / "model_index.json").is_file():
        save_pipeline(tiny_pipeline(0), model, overwrite=True)
        print(f"wrote a tiny random diffusers-format pipeline to {model}")
    grid = run / "samples.png"
    sample_args = build_parser().parse_args([
        "sample", "--model", str(model), "--prompt", "a photo of a red circle on a striped background",
        "--prompt", "a photo of sks dog", "--negative-prompt", "noisy, lowres, artifact, pattern",
        "--num-images", "4", "--steps", str(args.steps), "--guidance", "5", "--out", str(grid), "--overwrite"])
    cmd_sample(sample_args)
    print(f"demo done in {time.time() - t0:.0f} s: the grid is {grid} (random weights: expect noise until the "
          f"synthetic-world model lands). Real Stable Diffusion: persguard sample --model /path/to/sd-folder ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text -> image grid with classifier-free guidance")
    s.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json, unet/, vae/, ...)")
    s.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    s.add_argument("--negative-prompt", default="", help="guidance pushes away from this (default: empty)")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=7.5, help="diffusers guidance_scale")
    s.add_argument("--sampler", choices=("ddim", "dpmpp_2m"), default="ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--variant", help="weights variant to read, e.g. fp16")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_sample)

    t = sub.add_parser("init-tiny", help="write a tiny random pipeline folder (tests, smoke runs)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(fn=cmd_init_tiny)

    d = sub.add_parser("demo", help="the main job on the built-in tiny world")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=25)
    d.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from persguard_jax.models.convert import WeightsError
    try:
        args.fn(args)
    except (WeightsError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"persguard {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
