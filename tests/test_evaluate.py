"""`persguard evaluate` and persguard_jax.evaluate on the committed world model and CLIP, with a held-out subject's
photos as the references (the model has never seen the subject)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from persguard_jax.cli import main
from persguard_jax.data.world import SceneSpec, save_photos
from persguard_jax.evaluate import Evaluation, evaluate_pipeline, measure, write_evaluation
from persguard_jax.workflows import world_assets
from persguard_jax.data.world import WORLD_FILE, world_of

SAMPLING = ["--num-images", "4", "--steps", "12"]  # small: the whole file runs in well under a minute of sampling
METRICS = ("clip_t", "clip_i", "identity_similarity", "fid_clip", "colour_match", "colour_follows", "shape_match",
           "shape_follows", "texture_match", "texture_follows", "mark_match", "subject_match")


@pytest.fixture(scope="module")
def world():
    return world_of(world_assets.world_model(build=False))


@pytest.fixture(scope="module")
def subject(world):
    return next(s for s in world.subjects if s.class_name == "dog" and s.held_out)


@pytest.fixture(scope="module")
def photos_dir(world, subject, tmp_path_factory):
    folder = tmp_path_factory.mktemp("references") / "photos"
    save_photos(world.subject_photos(subject, 5), folder, prefix=subject.name)
    return folder


def _prompts(world, subject) -> list[str]:
    other = next(c for c in ("green", "blue") if c != subject.colour)
    return [world.instance_prompt(subject), f"a photo of a {subject.colour} dog", f"a photo of a {other} dog"]


def _evaluate(photos_dir, prompts, out) -> tuple[int, str]:
    argv = ["evaluate", "--model", str(world_assets.world_model(build=False)), "--references", str(photos_dir),
            *[a for p in prompts for a in ("--prompt", p)], *SAMPLING, "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(argv)
    return rc, stdout.getvalue()


@pytest.fixture(scope="module")
def evaluated(world, subject, photos_dir, tmp_path_factory):
    """One command run shared by the tests that read its output."""
    prompts = _prompts(world, subject)
    out = tmp_path_factory.mktemp("evaluate") / "out"
    rc, stdout = _evaluate(photos_dir, prompts, out)
    return rc, stdout, out, prompts


def test_evaluate_command_prints_and_writes_its_table(evaluated, subject):
    rc, stdout, out, prompts = evaluated
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert {"prompts", "mean", "references", "settings", "model", "clip"} <= set(results)
    assert [row["prompt"] for row in results["prompts"]] == prompts
    for row in results["prompts"]:
        assert set(row) == {"prompt", *METRICS}
    # the references' majority facts are the held-out subject's colour and class
    assert results["references"] == {"count": 5, "colour": subject.colour, "shape": "dog",
                                     "texture": subject.texture, "mark": subject.mark[0]}
    assert results["prompts"][0]["colour_follows"] is None  # "a photo of sks dog" names no colour
    assert results["mean"]["clip_t"] == pytest.approx(np.mean([r["clip_t"] for r in results["prompts"]]))
    md_rows = [line for line in (out / "results.md").read_text().splitlines()
               if line.startswith("| ") and not line.startswith("| ---")]
    assert len(md_rows) == 1 + len(prompts) + 1  # header, one per prompt, the mean
    for prompt in prompts:
        assert any(line.startswith(f"| {prompt} |") for line in stdout.splitlines()), stdout
    assert "| **mean** |" in stdout
    grid = np.asarray(Image.open(out / "grid.png"))
    # references + one row per prompt, 32 px images at labelled_grid's 4x scale, 2 px gaps
    assert grid.shape[0] == (1 + len(prompts)) * 128 + len(prompts) * 2


def test_same_seeds_give_identical_numbers(evaluated, photos_dir, tmp_path):
    rc, _, first_out, prompts = evaluated
    rc2, _ = _evaluate(photos_dir, prompts, tmp_path / "again")
    assert rc == rc2 == 0
    first, again = (json.loads((d / "results.json").read_text()) for d in (first_out, tmp_path / "again"))
    assert again["prompts"] == first["prompts"] and again["mean"] == first["mean"]


def test_image_j_of_a_prompt_does_not_depend_on_the_other_prompts(world, subject):
    from persguard_jax.models import load_pipeline
    pipe = load_pipeline(world_assets.world_model(build=False))
    a, b = _prompts(world, subject)[1:]
    kw = dict(num_images=4, num_steps=12, guidance_scale=4.0)  # the command's shapes: its compiled sampler is reused
    both, alone = evaluate_pipeline(pipe, [a, b], **kw), evaluate_pipeline(pipe, [b], **kw)
    np.testing.assert_array_equal(both.images[1], alone.images[0])
    assert not np.array_equal(both.images[0, 0], both.images[0, 1])  # but the images of one prompt differ
    # at guidance 0 only the unconditional branch counts: the prompt no longer matters, so equal images show
    # that image j of every prompt starts from the same noise
    unconditional = evaluate_pipeline(pipe, [a, b], **{**kw, "guidance_scale": 0.0})
    np.testing.assert_array_equal(unconditional.images[0], unconditional.images[1])


def test_colour_detector_prefers_the_subjects_colour(evaluated, subject):
    _, _, out, prompts = evaluated
    rows = {r["prompt"]: r for r in json.loads((out / "results.json").read_text())["prompts"]}
    same, other = rows[prompts[1]], rows[prompts[2]]
    assert same["colour_match"] > other["colour_match"], (same, other)
    # the other colour's samples follow their prompt, not the references: "follows" reads the prompt's colour
    assert other["colour_follows"] > other["colour_match"], other


def _rendered(world, colour: str, n: int = 3) -> np.ndarray:
    return np.stack([world.render(SceneSpec(shape="circle", colour=colour)) for _ in range(n)]).astype(np.float32) / 255


def test_measure_reads_the_world_detectors_off_rendered_scenes(world, subject):
    """Without a model or CLIP: exact scenes of the world, so every detector answer is known."""
    refs = world.subject_photos(subject, 4)
    other = next(c for c in ("green", "blue") if c != subject.colour)
    prompts = [f"a photo of a {subject.colour} circle", f"a photo of a {subject.colour} circle", "a photo of sks"]
    images = [_rendered(world, subject.colour), _rendered(world, other), _rendered(world, other)]
    results = measure(prompts, images, references=refs, world=world)
    rows = results["prompts"]
    assert [r["colour_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["colour_follows"] for r in rows] == [1.0, 0.0, None]
    assert [r["shape_follows"] for r in rows] == [1.0, 1.0, None] and rows[0]["shape_match"] == 0.0  # dog refs
    assert results["mean"]["colour_follows"] == 0.5  # over the two prompts that name a colour
    assert "clip_t" not in rows[0]  # no evaluator, no CLIP metrics
    # texture and mark: the subject's own photos show both, plain unmarked circles neither
    assert results["references"]["texture"] == subject.texture != "plain"
    assert results["references"]["mark"] == subject.mark[0]
    again = measure(["a photo of sks", "a photo of sks"], [world.subject_photos(subject, 4, start=4) / 255.0,
                                                           images[0]], references=refs, world=world)["prompts"]
    assert [r["texture_match"] for r in again] == [1.0, 0.0] and [r["mark_match"] for r in again] == [1.0, 0.0]
    # subject_match wants silhouette, colour and texture in the same sample: the subject's colour on a circle is 0
    assert [r["subject_match"] for r in again] == [1.0, 0.0] and rows[0]["colour_match"] == 1.0
    assert rows[0]["subject_match"] == 0.0
    mixed = np.concatenate([world.subject_photos(subject, 2, start=8) / 255.0, images[0][:2]])
    assert measure(["a photo of sks"], [mixed], references=refs, world=world)["prompts"][0]["subject_match"] == 0.5


def test_write_evaluation_never_replaces_results(world, tmp_path):
    images = _rendered(world, "red", 2)[None]
    evaluation = Evaluation(("a photo of a red circle",), images, measure(["a photo of a red circle"], images,
                                                                         world=world))
    write_evaluation(tmp_path, evaluation, title="first")
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(FileExistsError, match="results.json|results.md|grid.png"):
        write_evaluation(tmp_path, evaluation, title="second")
    assert (tmp_path / "results.json").read_bytes() == before


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_missing_references_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_photos"
    rc, _ = _evaluate(missing, ["a photo of a dog"], tmp_path / "out")
    assert rc == 2 and str(missing) in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_non_world_model_needs_clip(photos_dir, tmp_path, capsys):
    model = tmp_path / "plain_model"
    shutil.copytree(world_assets.world_model(build=False), model, ignore=shutil.ignore_patterns(WORLD_FILE))
    rc = main(["evaluate", "--model", str(model), "--references", str(photos_dir), "--prompt", "a photo of a dog",
               "--out", str(tmp_path / "out")])
    line = _error_line(capsys)
    assert rc == 2 and str(model) in line and "--clip" in line
    assert not (tmp_path / "out").exists()


def test_existing_non_empty_out_is_refused_untouched(photos_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _ = _evaluate(photos_dir, ["a photo of a dog"], out)
    assert rc == 2 and str(out) in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
