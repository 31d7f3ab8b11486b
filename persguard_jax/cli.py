"""``persguard <command>``: the command-line face of the library.

Commands: ``sample`` (text -> image grid from a diffusers-format pipeline folder), ``init-tiny`` (write a tiny
random pipeline folder), ``plan`` (how a model's parameters shard over a mesh), ``evaluate`` (sample with fixed
seeds, measure), and the training workflows of the ``WORKFLOWS`` table: ``personalize`` (DreamBooth), ``pretrain``
and ``train-clip`` (the synthetic world's models) and ``demo``. Every command first sets up the process
(``runtime.setup_process``: CPU devices, ``jax.distributed`` when launched as one of several processes, the
compilation cache). Errors from bad input (``errors.USER_ERRORS``) print one line and exit with status 2
(``PERSGUARD_TRACEBACK=1``: the traceback instead).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals as one line (the usage stays behind ``--help``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float | None = None, *, high: float | None = None, finite: bool = True,
            name: str = ""):
    """An argparse type: ``kind`` (int or float), finite, at least ``low`` and at most ``high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if finite and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value
    parse.__name__ = name or kind.__name__
    return parse


POSITIVE, NON_NEGATIVE, NUMBER = _number(int, 1), _number(int, 0), _number(float)
# an image side in pixels: 16384 is 4x SDXL's largest; beyond it XLA's buffer sizes overflow (and nothing fits)
IMAGE_SIDE = _number(int, 1, high=16384, name="pixels")


def WORKFLOWS() -> tuple:  # noqa: N802 (the table, read like a constant)
    """The training commands, one ``runs.Workflow`` entry each: parsing, output folder, preemption and the
    subcommand come from the entry (workflows/runs.py)."""
    from persguard_jax.workflows import demo, diagnose, implant, personalize, pretrain, protect, purify, world_clip
    return (personalize.WORKFLOW, implant.WORKFLOW, protect.WORKFLOW, purify.WORKFLOW, diagnose.WORKFLOW,
            pretrain.WORKFLOW, world_clip.WORKFLOW, demo.DEMO)


def _dtype(name: str):
    import jax.numpy as jnp
    return getattr(jnp, DTYPES[name])


def _fresh_output(path: Path, overwrite: bool) -> Path:
    from persguard_jax.io import check_creatable
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; --out names the PNG file to write")
    check_creatable(path)
    return path


def _output_checked(command: str) -> bool:
    """Call once every process has checked ``--out``; returns whether this process writes the outputs.

    Launched as several processes, each runs the whole command (the same samples from the same seeds) and checks
    ``--out`` alike, but only process 0 writes: without the barrier, a process that starts late would find
    process 0's files and refuse ``--out`` as taken (the workflows do the same in ``runs.prepare_output``)."""
    from persguard_jax.train.distributed import barrier, is_writer
    barrier(f"persguard {command}: --out checked")
    return is_writer()


def cmd_sample(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from persguard_jax.models import load_pipeline
    from persguard_jax.report import image_grid, save_png
    from persguard_jax.sample import text_to_image

    if Path(args.model).resolve() in Path(args.out).resolve().parents:  # --overwrite would replace a model file
        raise ValueError(f"--out {args.out}: is inside --model {args.model}, which is only read; write elsewhere")
    out = _fresh_output(Path(args.out), args.overwrite)
    writer = _output_checked("sample")
    dtype = _dtype(args.dtype)
    pipe = load_pipeline(args.model, dtype=dtype, param_dtype=dtype, variant=args.variant)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    images = []
    chunks = range(0, len(prompts), args.batch_size)
    with tqdm(chunks, desc="batches", disable=len(chunks) == 1) as bar:
        for start in bar:
            chunk = prompts[start:start + args.batch_size]
            images.append(text_to_image(
                pipe, chunk, args.negative_prompt, num_steps=args.steps, guidance_scale=args.guidance,
                seed=args.seed, seed_offset=start, sampler=args.sampler, eta=args.eta, height=args.height,
                width=args.width, progress=True))
    import numpy as np
    grid = image_grid(np.concatenate(images), ncols=args.num_images if len(args.prompt) > 1 else None)
    if writer:
        save_png(grid, out)
        print(f"wrote {out} ({len(prompts)} images, {args.steps} {args.sampler} steps, guidance {args.guidance})")


def cmd_init_tiny(args: argparse.Namespace) -> None:
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.pretrained import check_pipeline_output
    from persguard_jax.models.tiny import tiny_pipeline

    out = check_pipeline_output(args.out, overwrite=args.overwrite)
    if _output_checked("init-tiny"):
        save_pipeline(tiny_pipeline(args.seed), out, overwrite=args.overwrite)
        print(f"wrote a tiny random pipeline to {out}")


def _model_resolution(model: Path) -> int:
    """A pipeline folder's native image side, from its configs alone (so bad references fail before loading)."""
    from persguard_jax.models import pretrained
    from persguard_jax.models.convert import read_json
    from persguard_jax.models.unet import native_latent_side
    unet_path, vae_path = model / "unet" / "config.json", model / "vae" / "config.json"
    unet = pretrained.UNET.config_cls.from_dict(read_json(unet_path), source=str(unet_path))
    vae = pretrained.VAE.config_cls.from_dict(read_json(vae_path), source=str(vae_path))
    return native_latent_side(unet, str(unet_path)) * 2 ** (len(vae.block_out_channels) - 1)


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Sample a model on each prompt with fixed seeds and measure it against reference photos (evaluate.py)."""
    from persguard_jax.data.images import load_folder
    from persguard_jax.evaluate import evaluate_pipeline, evaluation_table, write_evaluation
    from persguard_jax.data.world import WORLD_FILE, world_of
    from persguard_jax.workflows.pretrain import PretrainConfig
    from persguard_jax.workflows.world_assets import world_clip

    out, model = Path(args.out), Path(args.model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: --out must be a new or empty folder")
    if not (model / "model_index.json").is_file():  # say so, not "not a world model" (below)
        raise FileNotFoundError(f"{model}: not a pipeline folder (no model_index.json; the diffusers layout)")
    is_world = (model / WORLD_FILE).is_file()
    if not (args.clip or is_world):
        raise ValueError(f"{model}: not a world model (no {WORLD_FILE}), so there is no default CLIP; "
                         f"pass --clip with a CLIP folder")
    clip_dir = Path(args.clip) if args.clip else world_clip(build=False)
    # every input is checked (references decoded) before the slow loads and before --out is created
    references = (load_folder(args.references, args.resolution or _model_resolution(model)) + 1.0) / 2.0
    if not out.exists():  # an --out that cannot be made fails now, not after the sampling
        from persguard_jax.io import check_creatable
        check_creatable(out)
    writer = _output_checked("evaluate")

    from persguard_jax.metrics import CLIPEvaluator
    from persguard_jax.models import load_pipeline
    evaluator = CLIPEvaluator.from_folder(clip_dir)
    pipe = load_pipeline(model)
    # a world model was tuned to sample at its pre-training evaluation's scale; 7.5 is diffusers' default
    guidance = args.guidance if args.guidance is not None else PretrainConfig.eval_guidance if is_world else 7.5
    evaluation = evaluate_pipeline(
        pipe, args.prompt, references=references, evaluator=evaluator, world=world_of(model) if is_world else None,
        num_images=args.num_images, seed=args.seed, num_steps=args.steps, guidance_scale=guidance,
        negative_prompt=args.negative_prompt)
    evaluation.results.update(model=str(model), clip=str(clip_dir), references_dir=str(args.references))
    if writer:
        paths = write_evaluation(out, evaluation, title=f"persguard evaluate: {model}", references=references)
        print(evaluation_table(evaluation.results))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _plan_models(args: argparse.Namespace) -> dict:
    """Abstract models (shapes only, no weights read) for ``persguard plan``."""
    from persguard_jax.models import pretrained
    from persguard_jax.models.convert import read_json
    from persguard_jax.models.unet import unet_config_sd15, unet_config_sd21
    from persguard_jax.models.vae import vae_config_sd

    kinds = {"unet": pretrained.UNET, "vae": pretrained.VAE, "text_encoder": pretrained.TEXT}
    if args.model:
        folder = Path(args.model)
        parts = [p for p in kinds if (folder / p / "config.json").is_file()]
        if (folder / "config.json").is_file():  # a single model folder: guess its kind from the config
            config = read_json(folder / "config.json")
            kind = "unet" if "down_block_types" in config and "cross_attention_dim" in config else \
                "vae" if "latent_channels" in config else \
                "text_encoder" if "hidden_size" in config or "text_config" in config else None
            if kind is None:  # e.g. a scheduler's or an unrelated config: not planned as a default CLIP
                raise ValueError(f"{folder / 'config.json'}: not a UNet, VAE or CLIP text encoder config (none of "
                                 f"down_block_types, latent_channels, hidden_size, text_config)")
            return {kind: _abstract(kinds[kind], config, folder / "config.json")}
        if not parts:
            raise FileNotFoundError(f"{folder}: no config.json and no unet/, vae/ or text_encoder/ subfolder with one")
        return {p: _abstract(kinds[p], read_json(folder / p / "config.json"), folder / p / "config.json")
                for p in parts}
    from persguard_jax.models.clip import text_config_sd15, text_config_sd21
    unet_cfg = {"sd15": unet_config_sd15, "sd21": unet_config_sd21,
                "sd21-base": lambda: unet_config_sd21(base=True)}[args.arch]()
    text_cfg = text_config_sd15() if args.arch == "sd15" else text_config_sd21()
    return {"unet": pretrained.abstract_model(pretrained.UNET.model_cls, unet_cfg),
            "vae": pretrained.abstract_model(pretrained.VAE.model_cls, vae_config_sd()),
            "text_encoder": pretrained.abstract_model(pretrained.TEXT.model_cls, text_cfg)}


def _abstract(kind, config: dict, source: Path):
    from persguard_jax.models import pretrained
    return pretrained.abstract_model(kind.model_cls, kind.config_cls.from_dict(config, source=str(source)))


def _say(*args, **kwargs) -> None:
    """``print`` on process 0 only: a multi-host command's report is the same on every process."""
    from persguard_jax.train.distributed import is_writer
    if is_writer():
        print(*args, **kwargs)


def cmd_plan(args: argparse.Namespace) -> None:
    import jax

    from persguard_jax import sharding as shd

    mesh_cfg = shd.MeshConfig(data=args.data, fsdp=args.fsdp, tensor=args.tensor, layout=args.layout,
                              min_shard_size=args.min_shard_size)
    mesh = shd.make_mesh(mesh_cfg)
    models = _plan_models(args)
    missing = [p for p in ("unet", "vae", "text_encoder") if p not in models]
    if args.step and missing:  # before the plan is printed, not after: a refused command prints nothing
        raise ValueError(f"--step {args.step} needs a whole pipeline (unet/, vae/, text_encoder/); "
                         f"{args.model or args.arch} lacks {', '.join(missing)}")
    rows = []
    for name, model in models.items():
        from flax import nnx
        shapes = nnx.state(model, nnx.Param).to_pure_dict()
        sh = shd.param_shardings(shd.logical_axes(model), shapes, mesh, mesh_cfg)
        rows += [dict(r, name=f"{name}/{r['name']}") for r in shd.sharding_plan(shapes, sh)]
    _say(f"mesh {dict(mesh.shape)} on {len(jax.devices())} {jax.default_backend()} devices, layout {args.layout!r}")
    _say(shd.format_plan(rows, limit=args.limit))
    per_device = sum(r["bytes_per_device"] for r in rows)
    full = sum(int(math.prod(r["shape"])) * 4 for r in rows)
    _say(f"float32 parameters: {full / 2**30:.2f} GiB unsharded, {per_device / 2**30:.3f} GiB per device; "
         f"with AdamW state x3: {3 * per_device / 2**30:.3f} GiB per device")
    if args.step:
        _plan_step(args, models, mesh, mesh_cfg)


def _plan_step(args: argparse.Namespace, models: dict, mesh, mesh_cfg) -> None:
    """``persguard plan --step``: compile the workflow's step ahead of time and print its bytes per device."""
    import json

    from persguard_jax.models.convert import read_json
    from persguard_jax.plan import StepPlan, format_memory, plan_memory
    scheduler = Path(args.model or "") / "scheduler" / "scheduler_config.json"
    plan = StepPlan(step=args.step, batch=args.batch, resolution=args.resolution, remat=args.remat,
                    compute_dtype=None if args.compute_dtype == "float32" else args.compute_dtype,
                    train_text_encoder=not args.freeze_text_encoder, prior=not args.no_prior,
                    retention_steps=args.k, retention_order=args.order, retention_replay=args.replay,
                    retention_dispatch=args.dispatch)
    _say(f"compiling the {args.step} step ahead of time (nothing is allocated; minutes for SD on a CPU)...",
         flush=True)
    result = plan_memory(models, plan, mesh, mesh_cfg, read_json(scheduler) if args.model and scheduler.is_file()
                         else None)
    _say(format_memory(result))
    if args.json:
        _say(json.dumps(result))


def build_parser() -> argparse.ArgumentParser:
    from persguard_jax.workflows.runs import prompt_argument
    parser = _Parser(prog="persguard", description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (also: PERSGUARD_NO_COMPILE_CACHE=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sample", help="text -> image grid with classifier-free guidance")
    s.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json, unet/, vae/, ...)")
    s.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    s.add_argument("--negative-prompt", default="", help="guidance pushes away from this (default: empty)")
    s.add_argument("--num-images", type=POSITIVE, default=4, help="images per prompt")
    s.add_argument("--batch-size", type=POSITIVE, default=8)
    s.add_argument("--steps", type=POSITIVE, default=50)
    s.add_argument("--guidance", type=NUMBER, default=7.5, help="diffusers guidance_scale")
    s.add_argument("--sampler", choices=("ddim", "dpmpp_2m"), default="ddim")
    s.add_argument("--eta", type=_number(float, 0.0), default=0.0, help="DDIM stochasticity (>= 0)")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0)
    s.add_argument("--height", type=IMAGE_SIDE, help="image height (default: the model's); a multiple of its "
                                                   "downsampling factor")
    s.add_argument("--width", type=IMAGE_SIDE, help="image width (default: the model's)")
    s.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    s.add_argument("--variant", help="weights variant to read, e.g. fp16")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_sample)

    t = sub.add_parser("init-tiny", help="write a tiny random pipeline folder (tests, smoke runs)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=NON_NEGATIVE, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(fn=cmd_init_tiny)

    p = sub.add_parser("plan", help="print how a model's parameters shard over a mesh (no weights read)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pipeline folder, or one model folder with config.json")
    src.add_argument("--arch", choices=("sd15", "sd21", "sd21-base"), help="a standard architecture (UNet + VAE)")
    p.add_argument("--data", type=_number(int, -1), default=-1, help="data-parallel size (-1: the devices left)")
    p.add_argument("--fsdp", type=_number(int, -1), default=1)
    p.add_argument("--tensor", type=_number(int, -1), default=1)
    p.add_argument("--layout", default="fsdp", help="rules table: fsdp or data")
    p.add_argument("--min-shard-size", type=POSITIVE, default=1)
    p.add_argument("--devices", type=POSITIVE, help="fake this many CPU devices (plan a pod on a laptop)")
    p.add_argument("--limit", type=NON_NEGATIVE, default=25, help="rows shown, largest first (0: all)")
    p.add_argument("--step", choices=("dreambooth", "implant", "aspl"),
                   help="also compile this workflow step ahead of time and print its bytes per device")
    p.add_argument("--batch", type=POSITIVE, default=8, help="--step: examples per step (global; aspl: photos)")
    p.add_argument("--resolution", type=POSITIVE, help="--step: image side in pixels (default: the model's)")
    p.add_argument("--remat", choices=("none", "dots_saveable", "full"), default="none", help="--step: remat policy")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="--step: compute dtype (master weights stay float32)")
    p.add_argument("--k", type=POSITIVE, default=2, help="--step implant: unrolled attacker steps")
    p.add_argument("--order", type=int, choices=(1, 2), default=1, help="--step implant: 1 first order, 2 exact")
    p.add_argument("--replay", action="store_true", help="--step implant --order 2: replay the attacker's steps "
                                                         "in the backward pass instead of storing them")
    p.add_argument("--dispatch", action="store_true", help="--step implant --order 1: the attacker's steps as "
                                                           "their own program ahead of the step "
                                                           "(implant.retention_dispatch)")
    p.add_argument("--no-prior", action="store_true", help="--step: no class (prior-preservation) examples")
    p.add_argument("--freeze-text-encoder", action="store_true", help="--step: train the UNet alone")
    p.add_argument("--json", action="store_true", help="--step: also print the report as one JSON line")
    p.set_defaults(fn=cmd_plan)

    e = sub.add_parser("evaluate", help="sample a model on prompts with fixed seeds; CLIP and detector metrics")
    e.add_argument("--model", required=True, help="diffusers pipeline folder")
    e.add_argument("--references", required=True, help="folder of reference photos (e.g. the subject's)")
    e.add_argument("--prompt", required=True, action="append", type=prompt_argument,
                   help="repeat for several prompts")
    e.add_argument("--clip", help="CLIP folder for the metrics (default for a world model: the world CLIP)")
    e.add_argument("--out", required=True, help="new or empty folder for results.json, results.md, grid.png")
    e.add_argument("--num-images", type=POSITIVE, default=4, help="samples per prompt")
    e.add_argument("--steps", type=POSITIVE, default=25, help="DDIM steps")
    e.add_argument("--guidance", type=NUMBER, help="guidance scale (default: 4.0 for a world model, else 7.5)")
    e.add_argument("--seed", type=NON_NEGATIVE, default=0, help="image j of every prompt starts from this seed's "
                                                               "noise j")
    e.add_argument("--negative-prompt", default="")
    e.add_argument("--resolution", type=IMAGE_SIDE, help="side the references are resized to (default: the model's)")
    e.set_defaults(fn=cmd_evaluate)

    for workflow in WORKFLOWS():
        workflow.add_to(sub).set_defaults(fn=workflow.main)
    return parser


def error_line(e: BaseException) -> str:
    """A user error as one line: an OSError as ``file: reason``, anything else its message's first line (a
    message a library wrapped over several lines is joined)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed after options too (``... --resume steps=10``):
    argparse gives a ``nargs="*"`` positional only the words before the first option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*(args.overrides or ()), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    from persguard_jax import runtime
    from persguard_jax.errors import USER_ERRORS
    try:
        # before any command touches a device: CPU device count (plan --devices fakes a pod's), jax.distributed,
        # the compilation cache
        runtime.setup_process(compile_cache=not args.no_compile_cache, cpu_devices=getattr(args, "devices", None))
        args.fn(args)
    except USER_ERRORS as e:
        if os.environ.get("PERSGUARD_TRACEBACK"):
            raise
        sys.stdout.flush()  # whatever the command printed comes first; the error is the last line
        print(f"persguard {args.command}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"\npersguard {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
