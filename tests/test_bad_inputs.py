"""Every command refuses bad input before any work: one line on stderr naming the file, key or value, exit status
2, and every earlier output left byte-identical.

The cases run in one process against one workspace (a tiny model, photos, an earlier run's folder); after each, the
workspace's bytes are compared with a snapshot taken before it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persguard_jax.cli import build_parser, main
from persguard_jax.workflows.runs import start_run


def _photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    for i in range(n):
        a = np.full((32, 32, 3), (30, 60, 200), np.uint8)
        a[4 + i:20 + i, 8:24] = (220, 30, 30)
        Image.fromarray(a).save(folder / f"p{i}.png")
    return folder


P = "personalize --model {model} --instance-dir {photos} --config dreambooth_tiny --out {new}"
S = "sample --model {model} --prompt cat --out {new}.png --steps 2 --num-images 1"
I = "implant --model {world} --protect SPEC --out {new}"

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: ``model`` (tiny pipeline), ``photos``, ``run`` (an earlier output folder with results),
    ``notrun`` (a folder of someone's files), ``file`` (a plain file) and bad model folders."""
    from persguard_jax.models import save_pipeline
    from persguard_jax.models.tiny import tiny_pipeline
    root = tmp_path_factory.mktemp("ws")
    model = save_pipeline(tiny_pipeline(0), root / "model")
    _photos(root / "photos")
    (root / "empty").mkdir()
    bad_photos = root / "bad_photos"
    bad_photos.mkdir()
    (bad_photos / "a.png").write_bytes(b"not an image")
    run = root / "run"  # a run the P line below started (its config), whose checkpoints are all unreadable
    args = build_parser().parse_args(P.format(model=model, photos=root / "photos", new=run).split())
    start_run(run, args.workflow.load(args).raw, overwrite=False, resume=False, command="personalize")
    (run / "results.json").write_text('{"steps": 3}\n')
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "checkpoints" / "3" / "garbage").write_bytes(b"\x00" * 64)
    notrun = root / "notrun"
    notrun.mkdir()
    (notrun / "thesis.tex").write_text("my thesis\n")
    (root / "file").write_text("a file\n")
    for name, edit in {
        "model_typo": lambda c: c.update(layers_per_block="two"),
        "model_negative": lambda c: c.update(block_out_channels=[-8, 16]),
        "model_null": lambda c: c.update(in_channels=None),
        "model_no_size": lambda c: c.pop("sample_size"),
    }.items():
        shutil.copytree(model, root / name)
        path = root / name / "unet" / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    broken = root / "model_broken_weights"
    shutil.copytree(model, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    for name, (part, text) in {  # model JSON files that parse but are not objects, a tokenizer's bad length
        "model_list_config": ("unet/config.json", "[1, 2]"),
        "model_list_vocab": ("tokenizer/vocab.json", "[1]"),
        "model_list_scheduler": ("scheduler/scheduler_config.json", "[]"),
        "model_wavy_scheduler": ("scheduler/scheduler_config.json", None),
        "model_max_length": ("tokenizer/tokenizer_config.json", None),
    }.items():
        shutil.copytree(model, root / name)
        path = root / name / part
        edit = {"tokenizer_config.json": {"model_max_length": 0}, "scheduler_config.json": {"beta_schedule": "wavy"}}
        path.write_text(text if text is not None else json.dumps({**json.loads(path.read_text()),
                                                                 **edit[path.name]}))
    relabelled = root / "model_int_weights"  # a float tensor's header says int32: same bytes, wrong values
    shutil.copytree(model, relabelled)
    weights = relabelled / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = data[8:8 + size].replace(b'"dtype":"F32"', b'"dtype":"I32"', 1)
    weights.write_bytes(data[:8] + header + data[8 + size:])
    yaml_bad = root / "bad.yaml"
    yaml_bad.write_text("dreambooth: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "types.yaml").write_text("dreambooth:\n  steps: ten\n")
    (root / "binary.yaml").write_bytes(b"\x89PNG\x00")
    (root / "twice.yaml").write_text("dreambooth:\n  steps: 3\n  steps: 4\n")
    (root / "empty_config").mkdir()  # a config.json of no model kind
    (root / "empty_config" / "config.json").write_text("{}")
    irun = root / "irun"  # an implantation's folder that holds the photos its next run reads
    args = build_parser().parse_args(["implant", "--model", str(model), "--protect", "world:dog_00:pattern",
                                      "--out", str(irun)])
    start_run(irun, args.workflow.load(args).raw, overwrite=False, resume=False, command="implant")
    _photos(irun / "photos")
    prun = root / "prun"  # a purification's folder that holds the CLIP an override names
    args = build_parser().parse_args(["purify", "--images", str(root / "photos"), "--purifier", "jpeg", "--out",
                                      str(prun)])
    start_run(prun, args.workflow.load(args).raw, overwrite=False, resume=False, command="purify")
    (prun / "clip").mkdir()
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# (command line, a piece the one-line error must contain)
CASES = [
    # config values: type and range, before any work
    (P + " dreambooth.steps=abc", "dreambooth.steps"),
    (P + " dreambooth.steps=0", "dreambooth.steps"),
    (P + " dreambooth.steps=2.5", "dreambooth.steps"),
    (P + " dreambooth.resolution=-32", "dreambooth.resolution"),
    (P + " dreambooth.batch_size=0", "dreambooth.batch_size"),
    (P + " dreambooth.prior_weight=-1", "dreambooth.prior_weight"),
    (P + " dreambooth.remat=some", "dreambooth.remat"),
    (P + " dreambooth.train_text_encoder=maybe", "dreambooth.train_text_encoder"),
    (P + " dreambooth.eval_prompts=5", "dreambooth.eval_prompts"),
    (P + " dreambooth.instance_prompt=''", "dreambooth.instance_prompt"),
    (P + " dreambooth.class_dir={file}", "class_dir"),
    (P + " dreambooth.resolution=31", "dreambooth.resolution"),  # not a size the tiny VAE (factor 2) encodes
    (P + " optimizer.learning_rate=nan", "optimizer.learning_rate"),
    (P + " optimizer.learning_rate=-1e-4", "optimizer.learning_rate"),
    (P + " optimizer.schedule=cosin", "optimizer.schedule"),
    (P + " optimizer.b1=1.5", "optimizer.b1"),
    (P + " optimizer.warmup_steps=-1", "optimizer.warmup_steps"),
    (P + " step.grad_accum=0", "step.grad_accum"),
    (P + " step.compute_dtype=float7", "step.compute_dtype"),
    (P + " step.ema_decay=2", "step.ema_decay"),
    (P + " loss.prediction_type=noise", "loss.prediction_type"),
    (P + " loss.min_snr_gamma=-5", "loss.min_snr_gamma"),
    (P + " loop.log_every=0", "loop.log_every"),
    (P + " loop.checkpoint_every=x", "loop.checkpoint_every"),
    (P + " mesh.data=3", "mesh"),
    (P + " mesh.layout=diagonal", "mesh.layout"),
    (P + " lora.rank=0", "lora.rank"),
    (P + " lora.targets=7", "lora"),
    (P + " dreambooth=5", "dreambooth"),
    (P + " dreambooth.steps.x=1", "dreambooth.steps"),
    (P + " nosuchsection.a=1", "nosuchsection"),
    (P + " steps", "steps"),
    (P + " =5", "empty part"),
    (P + " dreambooth..steps=3", "empty part"),
    (P + " dreambooth.steps=99999999999999999999", "dreambooth.steps"),  # past int32: not after the class images
    (P + " --print-config dreambooth.steps=abc", "dreambooth.steps"),  # overrides after an option are overrides
    # config files
    (P.replace("dreambooth_tiny", "{root}/bad.yaml"), "bad.yaml"),
    (P.replace("dreambooth_tiny", "{root}/list.yaml"), "list.yaml"),
    (P.replace("dreambooth_tiny", "{root}/types.yaml"), "types.yaml"),
    (P.replace("dreambooth_tiny", "{root}/nope.yaml"), "nope.yaml"),
    (P.replace("dreambooth_tiny", "{root}/binary.yaml"), "binary.yaml"),
    (P.replace("dreambooth_tiny", "{root}/twice.yaml"), "duplicate key 'steps'"),
    # model folders
    (P.replace("{model}", "{root}/nope"), "nope"),
    (P.replace("{model}", "{file}"), "file"),
    (P.replace("{model}", "{root}/model_typo"), "layers_per_block"),
    (P.replace("{model}", "{root}/model_negative"), "block_out_channels"),
    (P.replace("{model}", "{root}/model_null"), "in_channels"),
    (P.replace("{model}", "{root}/model_broken_weights"), "diffusion_pytorch_model.safetensors"),
    (S.replace("{model}", "{root}/model_list_config"), "unet/config.json"),
    (S.replace("{model}", "{root}/model_list_vocab"), "vocab.json"),
    (S.replace("{model}", "{root}/model_list_scheduler"), "scheduler_config.json"),
    (P.replace("{model}", "{root}/model_wavy_scheduler"), "model_wavy_scheduler/scheduler/scheduler_config.json"),
    (S.replace("{model}", "{root}/model_no_size"), "sample_size"),
    ("plan --model {root}/empty_config", "empty_config/config.json"),
    ("plan --model {model}/unet --step dreambooth", "needs a whole pipeline"),
    (S.replace("{model}", "{root}/model_max_length"), "model_max_length"),
    (S.replace("{model}", "{root}/model_int_weights"), "holds int32 values"),
    ("plan --model {root}/model_list_config", "unet/config.json"),
    # photos
    (P.replace("{photos}", "{root}/empty"), "empty"),
    (P.replace("{photos}", "{root}/nope"), "nope"),
    (P.replace("{photos}", "{file}"), "file"),
    (P.replace("{photos}", "{root}/bad_photos"), "a.png"),
    # output folders and resuming
    (P.replace("{new}", "{run}"), "run"),
    (P.replace("{new}", "{file}"), "file"),
    (P.replace("{new}", "{file}/sub"), "file"),
    (P.replace("{new}", "{notrun}") + " --resume", "notrun"),
    (P.replace("{new}", "{run}") + " --resume", "checkpoint"),
    (P.replace("{new}", "{run}") + " --resume --overwrite", "--resume"),
    (P.replace("{new}", "{run}").replace("{model}", "{run}/model") + " --overwrite", "an input of this command"),
    # photos named by a subject spec, not an argument of their own
    (I.replace("SPEC", "{root}/irun/photos:dog:pattern").replace("{new}", "{root}/irun") + " --overwrite",
     "an input of this command"),
    ("purify --images {photos} --purifier jpeg --out {run} --overwrite", "persguard personalize"),
    ("purify --images {photos} --purifier jpeg --model {model} --out {new}", "drop --model"),
    ("diagnose --model {world} --clean {photos} --perturbed {photos} --out {new}", "is --clean"),
    ("purify --images {photos} --purifier jpeg --out {new} purify.clip={model}", "not a CLIP folder"),
    ("purify --images {photos} --purifier jpeg --out {root}/prun --overwrite purify.clip={root}/prun/clip",
     "an input of this command"),
    # sample
    (S + " --num-images 0", "--num-images"),
    (S + " --steps 0", "--steps"),
    (S + " --batch-size 0", "--batch-size"),
    (S + " --height 31", "height"),
    (S + " --height 100000", "--height"),
    (S + " --guidance nan", "--guidance"),
    (S + " --eta -1", "--eta"),
    (S.replace("{new}.png", "{file}"), "file"),
    (S.replace("{new}.png", "{notrun}") + " --overwrite", "notrun"),
    (S.replace("{new}.png", "{file}/x.png"), "file"),
    (S.replace("{new}.png", "{model}/model_index.json") + " --overwrite", "inside --model"),
    (S.replace("{model}", "{root}/model_typo"), "layers_per_block"),
    # evaluate
    ("evaluate --model {model} --references {photos} --prompt a --out {new}", "--clip"),
    ("evaluate --model {root}/nope --references {photos} --prompt a --out {new}", "model_index.json"),
    ("evaluate --model {root}/model_no_size --references {photos} --prompt a --clip {model} --out {new}",
     "sample_size"),
    ("evaluate --model {model} --references {root}/empty --prompt a --clip {model} --out {new}", "empty"),
    ("evaluate --model {model} --references {photos} --prompt a --clip {model} --out {new} --num-images 0",
     "--num-images"),
    ("evaluate --model {model} --references {photos} --prompt a --clip {model} --out {run}", "run"),
    # plan
    ("plan --arch sd15 --devices 8 --data 3", "mesh"),
    ("plan --arch sd15 --devices 0", "--devices"),
    ("plan --arch sd15 --layout diagonal", "diagonal"),
    ("plan --model {root}/model_typo", "layers_per_block"),
    ("plan --model {root}/empty", "empty"),
    # init-tiny
    ("init-tiny --out {run}", "run"),
    ("init-tiny --out {file}", "file"),
    ("init-tiny --out {notrun} --overwrite", "not a pipeline folder"),
    # world commands
    ("pretrain --out {new} world.image_size=-4", "world.image_size"),
    ("pretrain --out {new} world.classes=[unicorn]", "unicorn"),
    ("pretrain --out {new} pretrain.unet.steps=abc", "pretrain.unet.steps"),
    ("pretrain --out {new} pretrain.unet.optimizer.learning_rate=nan", "pretrain.unet.optimizer.learning_rate"),
    ("pretrain --out {new} pretrain.unet.caption_dropout=1.5", "pretrain.unet.caption_dropout"),
    ("pretrain --out {new} pretrain.decoder.steps=-1", "pretrain.decoder.steps"),
    ("pretrain --out {new} pretrain.decoder.edge_weight=-4", "pretrain.decoder.edge_weight"),
    ("pretrain --out {new} models.unet.layers_per_block=two", "layers_per_block"),
    ("pretrain --out {new} models.unet.nonsense=1", "nonsense"),
    ("pretrain --out {new} models.vae.latent_channels=8 models.unet.in_channels=4", "models.unet.in_channels"),
    ("pretrain --out {new} scheduler.beta_schedule=wavy", "beta_schedule"),
    ("pretrain --out {new} loop.log_every=-1", "loop.log_every"),
    ("train-clip --out {new} clip.steps=abc", "clip.steps"),
    ("train-clip --out {new} model.hidden_size=64", "hidden_size"),
    ("train-clip --out {new} model.text_config.hidden_size=-1", "hidden_size"),
    ("demo --out {new} --subject cat_99", "cat_99"),
    ("demo --out {new} --subject nonsense", "nonsense"),
    ("demo --out {file}", "file"),
    ("demo --out {new} dreambooth.steps=-1", "dreambooth.steps"),
    ("demo --out {new} --model {model}", "world_config.json"),  # a pipeline, but not a world model
    ("demo --out {new} --model {root}/nope", "nope"),
    ("demo --out {new} --clip {root}/empty", "empty"),
    # implant (subject specs, the world, photos, pattern, config) before anything is written
    (I.replace("SPEC", "world:dog_00"), "no backdoor type"),
    (I.replace("SPEC", "world:dog_00:glitter"), "glitter"),
    (I.replace("SPEC", "world:dog_99:pattern"), "dog_99"),
    (I.replace("SPEC", "{root}/nope:dog:pattern"), "nope"),
    (I.replace("SPEC", "{root}/bad_photos:dog:pattern"), "a.png"),
    (I.replace("SPEC", "{root}/empty:dog:erasure"), "empty"),
    (I.replace("SPEC", "world:dog_00:pattern") + " --unprotected world:dog_00", "the same subject"),
    (I.replace("SPEC", "world:dog_00:pattern") + " --unprotected world:cat_00:pattern", "no backdoor type"),
    (I.replace("SPEC", "world:dog_00:pattern") + " implant.pattern_image={root}/nope.png", "nope.png"),
    (I.replace("SPEC", "world:dog_00:target") + " implant.target_dir={root}/empty", "empty"),
    (I.replace("SPEC", "world:dog_00:pattern") + " implant.retention=forget", "implant.retention"),
    (I.replace("SPEC", "world:dog_00:pattern") + " --config dreambooth_world", "no implant section"),
    (I.replace("SPEC", "world:dog_00:pattern") + " check.clean_from={root}/nope", "check.clean_from"),
    (I.replace("SPEC", "world:dog_00:pattern") + " implant.retention=unrolled step.data_parallel=auto",
     "data_parallel"),
    (I.replace("SPEC", "world:dog_00:pattern").replace("{world}", "{model}"), "not a world model"),
    (I.replace("SPEC", "{photos}:dog:pattern").replace("{world}", "{model}") + " dreambooth.resolution=31",
     "dreambooth.resolution"),
    (I.replace("SPEC", "{photos}:dog:pattern").replace("{world}", "{model}") + " implant.guidance_photos=9",
     "the folder has 3 photos"),
    (I.replace("SPEC", "world:dog_00:pattern").replace("--out {new}", "--out {run}"), "run"),
    # an implantation's config holds DreamBooth's sections: only the run's marker tells it a personalize run
    (I.replace("SPEC", "world:dog_00:pattern").replace("--out {new}", "--out {run}") + " --overwrite",
     "persguard personalize"),
]


@pytest.mark.parametrize("line, names", CASES, ids=[c[0].split()[0] + ":" + c[0].rsplit(" ", 1)[-1][:40]
                                                     for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, tmp_path, capsys, line, names):
    from persguard_jax.workflows.world_assets import world_model
    fill = dict(root=ws, model=ws / "model", photos=ws / "photos", run=ws / "run", notrun=ws / "notrun",
                file=ws / "file", new=tmp_path / "new", world=world_model())
    argv = [part.format(**fill) for part in line.split()]
    names = names.format(**fill)
    before = _snapshot(ws)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith(f"persguard {argv[0]}: error: "), err
    assert "Traceback" not in err and names in lines[-1], err
    assert _snapshot(ws) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.png").exists()


@pytest.mark.parametrize("line, flag", [(P, "--instance-prompt"), (P, "--class-prompt"),
                                        ("evaluate --model {model} --references {photos} --out {new}", "--prompt")])
def test_a_blank_prompt_is_refused_not_replaced_by_the_config(ws, tmp_path, capsys, line, flag):
    argv = line.format(model=ws / "model", photos=ws / "photos", new=tmp_path / "new").split() + [flag, " "]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{flag}: must not be empty" in err, err
    assert not (tmp_path / "new").exists()
