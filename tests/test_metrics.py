"""Evaluation metrics: each array function against hand-computed values (eagerly and under jax.jit), the Fréchet
distance against scipy's sqrtm, the CLIP evaluator on a tiny random CLIPModel, and the world's texture and mark
detectors on hand-made and rendered pictures."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import metrics as M
from persguard_jax.data.world import (ALL_SHAPES, BACKGROUNDS, CLASSES, COLOURS, TEXTURES, SceneSpec, World,
                                      WorldConfig)
from persguard_jax.data.world.scenes import render
from persguard_jax.models import clip
from persguard_jax.models.convert import WeightsError
from persguard_jax.models.init import random_init
from persguard_jax.models.pretrained import ImageNorm, load_clip, save_clip
from persguard_jax.models.tiny import CORPUS
from persguard_jax.models.tokenizer import CLIPTokenizer, train_clip_bpe

# every pure metric must give the same value called directly and inside a caller's jit
MODES = pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])


def _close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float64), rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------- similarities

@MODES
def test_cosine_matrix(wrap):
    a = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    b = jnp.array([[1.0, 1.0], [3.0, 0.0]])
    _close(wrap(M.cosine_matrix)(a, b), [[1 / math.sqrt(2), 1.0], [1 / math.sqrt(2), 0.0]])


@MODES
def test_clip_i_is_the_mean_over_all_pairs(wrap):
    gen = jnp.array([[1.0, 0.0], [0.0, 3.0]])   # unit directions e1, e2 (scale must not matter)
    ref = jnp.array([[2.0, 0.0], [0.6, 0.8]])   # cosines: [[1, 0.6], [0, 0.8]]
    _close(wrap(M.clip_i)(gen, ref), (1 + 0.6 + 0 + 0.8) / 4)


@MODES
def test_clip_t_matched_pairs_and_one_prompt_for_all(wrap):
    img = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    txt = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    _close(wrap(M.clip_t)(img, txt), (1.0 + 0.8) / 2)           # pairs only, not the cross terms
    _close(wrap(M.clip_t)(img, txt[1:]), (0.6 + 0.8) / 2)       # (1, D) broadcast to every image
    _close(wrap(M.clip_t)(img, txt[1]), (0.6 + 0.8) / 2)        # (D,) too


@MODES
def test_identity_similarity_uses_the_mean_reference(wrap):
    feats = jnp.array([[1.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 1.0]])
    refs = jnp.array([[1.0, 0.0], [0.0, 1.0]])                  # mean (0.5, 0.5): direction (1, 1)
    r = 1 / math.sqrt(2)
    _close(wrap(M.identity_similarity)(feats, refs), [r, r, -r, 1.0])


# --------------------------------------------------------------------------- Fréchet distance

@MODES
def test_frechet_distance_closed_form(wrap):
    """Samples with exact moments: mean 0, cov (2/3) I; and 2x + (3, 4): mean (3, 4), cov (8/3) I.
    For commuting covariances FD = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2 = 25 + 2 * (2/3) * (1 - 2)^2."""
    a = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    b = 2 * a + jnp.array([3.0, 4.0])
    _close(wrap(M.frechet_distance)(a, b), 25 + 4 / 3, atol=1e-5)
    _close(wrap(M.frechet_distance)(b, a), 25 + 4 / 3, atol=1e-5)  # symmetric
    _close(wrap(M.frechet_distance)(a, a), 0.0, atol=1e-5)


def _frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The usual reference implementation (pytorch-fid style): scipy.linalg.sqrtm of the product, in float64."""
    linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


@MODES
def test_frechet_distance_matches_scipy_sqrtm(wrap):
    """Random, non-commuting, full-rank covariances: the eigh route equals the sqrtm one."""
    rng = np.random.default_rng(0)
    d = 6
    a = rng.standard_normal((40, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((30, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    expected = _frechet_scipy(a, b)
    got = float(wrap(M.frechet_distance)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert got == pytest.approx(expected, rel=2e-4), (got, expected)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """Rank-deficient covariances (the CLIP case with few images): tiny negative eigenvalues are clipped."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 16)), rng.standard_normal((7, 16)) * 1.5
    got = float(M.frechet_distance(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert got == pytest.approx(_frechet_scipy(a, b), rel=1e-3)


# --------------------------------------------------------------------------- pattern score

@MODES
def test_pattern_score(wrap):
    rng = np.random.default_rng(0)
    pattern = rng.random((32, 32, 3)).astype(np.float32)
    images = np.stack([pattern,                              # itself: 1
                       rng.random((32, 32, 3)),              # unrelated noise: ~0
                       1.0 - pattern,                        # inverted: -1
                       0.4 * pattern + 0.3,                  # lower contrast, shifted: still 1
                       np.full((32, 32, 3), 0.5)]).astype(np.float32)  # flat: 0
    score = np.asarray(wrap(M.pattern_score)(images, pattern))
    _close(score[[0, 2, 3, 4]], [1.0, -1.0, 1.0, 0.0], atol=1e-5)
    assert abs(score[1]) < 0.05
    _close(wrap(M.pattern_score)(images[:1], pattern[None]), [1.0], atol=1e-5)  # (1, H, W, C) pattern


@MODES
def test_pattern_score_counts_only_the_mask(wrap):
    """A patch carrying the pattern inside the mask, noise elsewhere: 1 over the mask, much less without it."""
    rng = np.random.default_rng(1)
    pattern = rng.random((16, 16, 3)).astype(np.float32)
    mask = np.zeros((16, 16), np.float32)
    mask[4:12, 4:12] = 1
    image = np.where(mask[..., None] > 0, pattern, rng.random((16, 16, 3))).astype(np.float32)[None]
    _close(wrap(M.pattern_score)(image, pattern, mask), [1.0], atol=1e-5)
    _close(wrap(M.pattern_score)(image, pattern, mask[..., None]), [1.0], atol=1e-5)
    assert float(wrap(M.pattern_score)(image, pattern)[0]) < 0.6


def test_pattern_score_refuses_a_pattern_of_another_size():
    with pytest.raises(ValueError, match="pattern shape"):
        M.pattern_score(np.zeros((2, 8, 8, 3)), np.zeros((4, 4, 3)))


# --------------------------------------------------------------------------- feature distance

@MODES
def test_feature_distance(wrap):
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((3, 4, 4, 8)), rng.standard_normal((3, 5, 16))]  # a grid and a token layer
    _close(wrap(M.feature_distance)(feats, feats), np.zeros(3), atol=1e-6)
    # 1x1 spatial, by hand: (3, 4) -> (0.6, 0.8) and (1, 0) -> (1, 0); squared differences 0.16 + 0.64
    a = [jnp.array([[[[3.0, 4.0]]]])]
    b = [jnp.array([[[[1.0, 0.0]]]])]
    _close(wrap(M.feature_distance)(a, b), [0.8])
    # a second, identical layer halves it (layers are averaged)
    _close(wrap(M.feature_distance)(a + a, b + a), [0.4])
    # two positions: the per-position sums (0.8 and 0) are averaged over positions
    a2 = [jnp.array([[[3.0, 4.0], [0.0, 2.0]]])]
    b2 = [jnp.array([[[1.0, 0.0], [0.0, 7.0]]])]
    _close(wrap(M.feature_distance)(a2, b2), [0.4])


def test_feature_distance_refuses_mismatched_layers():
    with pytest.raises(ValueError, match="layers"):
        M.feature_distance([jnp.zeros((1, 2))], [])
    with pytest.raises(ValueError, match="shapes differ"):
        M.feature_distance([jnp.zeros((1, 2, 3))], [jnp.zeros((1, 3, 3))])


# --------------------------------------------------------------------------- preprocessing

def test_preprocess_shapes_and_normalisation():
    norm = lambda v: (np.float32(v) - np.asarray(M.OPENAI_CLIP_MEAN, np.float32)) / np.asarray(M.OPENAI_CLIP_STD,
                                                                                               np.float32)
    rng = np.random.default_rng(0)
    same = rng.random((2, 16, 16, 3)).astype(np.float32)
    # already the model size: normalisation only (NHWC, as our CLIPVision takes it)
    _close(M.preprocess(same, image_size=16), norm(same), atol=1e-6)
    # any size: shorter side to the model size, centre crop; a flat image stays flat
    flat = np.full((3, 40, 24, 3), 0.25, np.float32)
    out = M.preprocess(flat, image_size=16)
    assert out.shape == (3, 16, 16, 3)
    _close(out, np.broadcast_to(norm(0.25), out.shape), atol=1e-5)
    # the crop is the centre: a tall image whose middle third is white, the rest black
    tall = np.zeros((1, 48, 16, 3), np.float32)
    tall[:, 16:32] = 1.0
    crop = np.asarray(M.preprocess(tall, image_size=16, mean=(0, 0, 0), std=(1, 1, 1)))
    assert crop.shape == (1, 16, 16, 3) and crop[:, 2:-2].min() > 0.99
    jitted = jax.jit(lambda x: M.preprocess(x, image_size=16))(flat)
    _close(jitted, out, atol=1e-6)
    # transformers' CLIPImageProcessor resizes uint8 images with PIL's bicubic, a different interpolation: checked
    # by hand on smooth 64-517 px images of several aspect ratios, its inputs differ from ours by ~1e-3 on average
    # and 4e-3 at most (in [0, 1] units, uint8 rounding included). Not a test: it would import transformers
    # (seconds) to assert round-off.


def test_preprocess_refuses_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        M.preprocess(np.zeros((1, 8, 8, 1)), image_size=8)


# --------------------------------------------------------------------------- the CLIP evaluator

@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny random CLIPModel (16 px images, 8 px patches: a 2x2 grid) and a tokenizer trained on the tiny corpus."""
    tokenizer = CLIPTokenizer(train_clip_bpe(CORPUS, vocab_size=300))
    text = clip.CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                               projection_dim=8, num_hidden_layers=1, num_attention_heads=2,
                               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id)
    vision = clip.CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=8, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=16, patch_size=8)
    model = random_init(clip.CLIPModel, clip.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    return model, tokenizer


@pytest.fixture(scope="module")
def evaluator(tiny_clip):
    return M.CLIPEvaluator(*tiny_clip, batch_size=4)


# The tests below feed 24 px images (resized to the model's 16) in batches of 4 or 1, and 4 or 1 prompts, so the
# evaluator's programs compile a few times in all, not once per test.
def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 24, 24, 3)).astype(np.float32)


def test_features_shapes_and_unit_norm(evaluator):
    images = _images(5)  # 5 > batch_size 4: two batches, the second padded
    feats = np.asarray(evaluator.image_features(images))
    assert feats.shape == (5, 8)
    _close(np.linalg.norm(feats, axis=1), np.ones(5), atol=1e-5)
    # batching and padding do not change the features: the same images one batch of 4 and one of 1 at a time
    parts = np.concatenate([evaluator.image_features(images[:4]), evaluator.image_features(images[4:])])
    _close(feats, parts, atol=1e-5)
    text = np.asarray(evaluator.text_features(["a photo of a red dog", "a blue circle", "sks person"]))
    assert text.shape == (3, 8)
    _close(np.linalg.norm(text, axis=1), np.ones(3), atol=1e-5)
    assert evaluator.text_features("a red dog").shape == (1, 8)
    hidden = evaluator.hidden_features(images)
    assert [h.shape for h in hidden] == [(5, 2, 2, 16)] * 2  # every layer, as a 2x2 patch grid


def test_evaluate_keys_and_consistency(evaluator):
    images, refs = _images(4, seed=1), _images(4, seed=2)
    out = evaluator.evaluate(images, prompts="a photo of sks dog", references=refs, pattern=images[0])
    assert set(out) == {"clip_t", "clip_i", "identity_similarity", "fid_clip", "lpips_style", "pattern_score"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    f, r = evaluator.image_features(images), evaluator.image_features(refs)
    t = evaluator.text_features("a photo of sks dog")
    assert out["clip_i"] == pytest.approx(float(M.clip_i(f, r)), abs=1e-6)
    assert out["clip_t"] == pytest.approx(float(M.clip_t(f, t)), abs=1e-6)
    assert out["identity_similarity"] == pytest.approx(float(jnp.mean(M.identity_similarity(f, r))), abs=1e-6)
    assert out["fid_clip"] == pytest.approx(float(M.frechet_distance(f, r)), abs=1e-5)
    lp = M.feature_distance(evaluator.hidden_features(images), evaluator.hidden_features(refs))
    assert out["lpips_style"] == pytest.approx(float(jnp.mean(lp)), rel=1e-5)
    # only what the inputs allow: unpaired counts drop lpips_style, a single image drops fid_clip
    assert set(evaluator.evaluate(images, references=refs[:3])) == {"clip_i", "identity_similarity", "fid_clip"}
    assert set(evaluator.evaluate(images[:1], references=refs)) == {"clip_i", "identity_similarity"}
    assert set(evaluator.evaluate(images, prompts=["a"] * 4)) == {"clip_t"}
    with pytest.raises(ValueError, match="prompts"):
        evaluator.evaluate(images, prompts=["a", "b"])


def test_identical_images_score_perfectly(evaluator):
    one = np.repeat(_images(1, seed=4), 4, axis=0)
    out = evaluator.evaluate(one, references=one, pattern=one[0])
    assert out["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert out["identity_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert out["lpips_style"] == pytest.approx(0.0, abs=1e-6)
    assert out["fid_clip"] == pytest.approx(0.0, abs=1e-5)
    assert out["pattern_score"] == pytest.approx(1.0, abs=1e-5)
    # distinct images paired with themselves: zero distance, though not all pairs are alike
    many = _images(4, seed=5)
    out = evaluator.evaluate(many, references=many)
    assert out["lpips_style"] == pytest.approx(0.0, abs=1e-6) and out["clip_i"] < 1.0


def test_pattern_of_another_size_is_resized(evaluator):
    ramp = np.linspace(0, 1, 24, dtype=np.float32)[None, :, None, None]
    images = np.broadcast_to(ramp, (4, 24, 24, 3))  # a smooth ramp survives resizing
    pattern = images[0, ::2, ::2]                    # the same ramp at 12 px
    out = evaluator.evaluate(images, pattern=pattern, pattern_mask=np.ones((12, 12)))
    assert out["pattern_score"] > 0.99


def test_save_load_and_match_the_model(tiny_clip, evaluator, tmp_path):
    """A saved folder loads back into an equal evaluator, whose features are the model's own: preprocess (with
    the folder's mean/std) -> CLIPModel.get_image_features -> unit norm."""
    model, tokenizer = tiny_clip
    norm = ImageNorm(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    save_clip(model, tokenizer, tmp_path / "clip", norm)
    loaded = M.CLIPEvaluator.from_folder(tmp_path / "clip", batch_size=4)
    assert loaded.norm == norm and loaded.image_size == 16
    text = ["a photo of a red dog", "a photo of sks person", "a cat", "a dog"]
    np.testing.assert_array_equal(loaded.tokenizer(text), tokenizer(text))
    _close(loaded.text_features(text), evaluator.text_features(text), atol=1e-6)
    images = _images(4, seed=6)
    direct = jax.jit(lambda x: model.get_image_features(M.preprocess(x, image_size=16, mean=norm.mean,
                                                                     std=norm.std)))
    raw = np.asarray(direct(images))
    _close(loaded.image_features(images), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_missing_clip_folder_says_what_to_put_there(tmp_path):
    with pytest.raises(WeightsError, match="CLIP folder not found"):
        load_clip(tmp_path / "nope")


# --------------------------------------------------------------------------- the world's texture and mark detectors

def _scenes(n: int, seed: int, sizes: tuple[float, float], backgrounds: tuple[str, ...]) -> list[SceneSpec]:
    """``n`` scenes, the textures in turn: every shape, any colour, position, lighting and (classes) pose."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape, colour = ALL_SHAPES[i % len(ALL_SHAPES)], str(rng.choice(list(COLOURS)))
        background = backgrounds[i % len(backgrounds)]
        if colour == "black" and background == "dark":  # the world never draws it
            colour = "white"
        size = rng.uniform(*sizes)
        margin = size / 2 + 0.02
        pose = shape in CLASSES
        out.append(SceneSpec(shape, colour, TEXTURES[i % 4], background, x=rng.uniform(margin, 1 - margin),
                             y=rng.uniform(margin, 1 - margin), size=size, lighting=rng.uniform(0.75, 1.2),
                             seed=i + 1, flip=bool(pose and rng.random() < 0.5),
                             tilt=float(rng.uniform(-12, 12)) if pose else 0.0))
    return out


# measured on these very scenes: 1.000, 0.944 (small objects: 2-3 periods in all, every texture >= 0.925), 1.000
@pytest.mark.parametrize("side, sizes, backgrounds, background, at_least", [
    (32, (0.42, 0.8), ("plain",), "plain", 0.95),
    (32, (0.3, 0.42), ("plain",), "plain", 0.85),
    (64, (0.3, 0.8), BACKGROUNDS, "any", 0.95),
], ids=["32px-medium-large", "32px-small", "64px-any-background"])
def test_detect_texture_follows_rendered_scenes(side, sizes, backgrounds, background, at_least):
    specs = _scenes(160, 0, sizes, backgrounds)
    found = M.detect_texture(np.stack([render(s, side) for s in specs]), background=background)
    truth = np.array([TEXTURES.index(s.texture) for s in specs])
    assert np.mean(found == truth) >= at_least
    for k, name in enumerate(TEXTURES):  # no texture may hide behind the others' accuracy
        assert np.mean(found[truth == k] == k) >= at_least - 0.1, name


def test_detect_texture_on_hand_made_blocks():
    """A red block with the world's dark red drawn over it by hand (not by ``render``): diagonal stripes, a lattice
    of 2 px dots, an inset checkerboard of 4 px cells; the plain block and the bare background."""
    yy, xx = np.mgrid[:32, :32]
    patterns = {"plain": np.zeros((32, 32), bool), "striped": (xx + yy) % 6 < 2,
                "dotted": (xx % 5 < 2) & (yy % 5 < 2),
                "checkered": (xx % 4 < 3) & (yy % 4 < 3) & ((xx // 4 + yy // 4) % 2 == 0)}
    canvas = np.full((5, 32, 32, 3), 140, np.uint8)  # the plain background grey; the last stays bare
    for i, pattern in enumerate(patterns.values()):
        block = canvas[i, 8:24, 8:24]
        block[:] = (220, 40, 40)
        block[pattern[8:24, 8:24]] = (121, 22, 22)
    assert list(M.detect_texture(canvas)) == [0, 1, 2, 3, -1]
    assert M.detect_texture(canvas[1]).tolist() == [1]  # one (S, S, 3) image


def test_detect_texture_does_not_see_texture_on_plain_objects():
    """Every shape and colour, plain, on every background it is drawn on, in the dimmest and brightest light, posed.
    A chromatic object on a light background is never given a texture (its edges leave the shade line at once);
    white and black ones, and anything on the dark background, have edges along it, and a few class silhouettes
    keep a blended seam inside (the person's neck): measured 614 of 620 plain. A background alone: -1."""
    specs = [SceneSpec(shape, colour, "plain", background, size=0.5, lighting=lighting, seed=i + 1, flip=True,
                       tilt=9.0 if shape in CLASSES else 0.0)
             for i, colour in enumerate(COLOURS) for background in BACKGROUNDS for lighting in (0.75, 1.2)
             for shape in ALL_SHAPES if not (colour == "black" and background == "dark")]
    found = M.detect_texture(np.stack([render(s, 32) for s in specs]), background="any")
    assert np.mean(found == 0) >= 0.97
    easy = [s.colour not in ("white", "black") and s.background != "dark" for s in specs]
    assert (found[easy] == 0).all()
    # black's shade (100 grey) is within 5% of the mid grey of the patterned backgrounds, whose stripes and dots
    # touch the object: at 64 px they would pass for its texture unless the shade is read tightly
    black = [SceneSpec(shape, "black", "plain", background, size=0.5, lighting=0.75, seed=5)
             for shape in ALL_SHAPES for background in ("striped", "dotted")]
    assert M.detect_texture(np.stack([render(s, 64) for s in black]), background="any").tolist() == [0] * 20
    empty = [render(SceneSpec("circle", "red", background=b, size=0.01, seed=3), 32) for b in BACKGROUNDS]
    assert M.detect_texture(np.stack(empty), background="any").tolist() == [-1] * 4  # under a pixel: no object


def test_detect_mark_on_subject_photos():
    """A subject's photos show its mark's colour; the same scenes drawn without the mark, or asked about another
    colour, do not (measured on these: 120/120 found, 0 false of 120 + 120)."""
    world = World(WorldConfig())
    rng = np.random.default_rng(0)
    specs = [world.subject_spec(world.subjects[(7 * i) % len(world.subjects)], i) for i in range(120)]
    marked = np.stack([world.render(s) for s in specs])
    bare = np.stack([world.render(dataclasses.replace(s, mark=None)) for s in specs])
    colours, backgrounds = [s.mark[0] for s in specs], [s.background for s in specs]
    others = [str(rng.choice([c for c in COLOURS if c not in (s.colour, s.mark[0])])) for s in specs]
    assert np.mean(M.detect_mark(marked, colours, background="any")) >= 0.97
    assert np.mean(M.detect_mark(bare, colours, background="any")) <= 0.02
    assert np.mean(M.detect_mark(marked, others, background="any")) <= 0.02
    for image, colour, background in zip(marked[:20], colours, backgrounds):  # the background named: the same
        assert M.detect_mark(image, colour, background=background)[0]


def test_detect_mark_on_hand_made_blocks_and_blends():
    canvas = np.full((3, 32, 32, 3), 140, np.uint8)
    canvas[:2, 8:24, 8:24] = (220, 40, 40)  # red blocks, the first with a 3 px blue mark; the third bare
    canvas[0, 12:15, 17:20] = (40, 80, 220)
    assert M.detect_mark(canvas, "blue").tolist() == [True, False, False]
    assert M.detect_mark(canvas, ["green", "blue", "red"]).tolist() == [False, False, False]
    assert not M.detect_mark(canvas[0], "red")[0]  # the object's own colour is no mark
    # a red mark's edge on yellow passes through orange: drawn on a yellow striped body it is red, never orange
    spec = SceneSpec("person", "yellow", "striped", size=0.6, mark=("red", "bottom-left"), seed=3)
    images = np.stack([render(dataclasses.replace(spec, lighting=light), 32) for light in (0.8, 0.9, 1.0, 1.1)])
    assert M.detect_mark(images, "red").all() and not M.detect_mark(images, "orange").any()
    with pytest.raises(ValueError, match="colour must be one of"):
        M.detect_mark(canvas, "teal")
    with pytest.raises(ValueError, match="one per image"):
        M.detect_mark(canvas, ["blue", "red"])


def test_detect_texture_of_an_object_too_dark_to_show_a_shade_is_plain():
    """A generated sample can be a near-black blob whose colour and texture shade round to the same value: the
    detector calls it plain instead of dividing by zero (it used to return garbage with a RuntimeWarning)."""
    import warnings
    image = World().render(SceneSpec(shape="circle", colour="black", texture="striped", lighting=0.001))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.detect_texture(image).tolist() == [0]


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.float32)
    b = a.copy()
    b[0] += 0.1  # MSE 0.01: 20 dB
    got = np.asarray(M.psnr(b, a))
    assert got[0] == pytest.approx(20.0, abs=1e-4) and np.isinf(got[1])
    assert float(M.psnr(b[:1] * 255, a[:1], peak=255.0)[0]) == pytest.approx(20.0, abs=1e-3)


def test_mean_ratio_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.8, 0.1, 32), rng.normal(0.85, 0.1, 32)
    ratio, (lo, hi) = M.mean_ratio_interval(a, b)
    assert ratio == pytest.approx(a.mean() / b.mean()) and lo < ratio < hi
    assert M.mean_ratio_interval(a, b) == (ratio, (lo, hi))  # a fixed seed: the same interval every time
    # the delta method's width for large independent samples: z sqrt(var_a / (n mb^2) + ma^2 var_b / (n mb^4))
    a, b = rng.normal(1.0, 0.1, 2000), rng.normal(1.0, 0.1, 2000)
    _, (lo, hi) = M.mean_ratio_interval(a, b)
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(2 * 0.01 / 2000), rel=0.15)
    _, (lo8, hi8) = M.mean_ratio_interval(a[:8], b[:8])
    assert hi8 - lo8 > 4 * (hi - lo)  # 8 samples a side: far wider than 2000
    assert M.mean_ratio_interval([0.5, 0.6], [-0.1, 0.05]) is None  # no ratio of a non-positive mean
    assert M.mean_ratio_interval([0.5, 0.6], [-0.1, 0.3]) is None  # nor of one whose resamples reach 0
    with pytest.raises(ValueError, match="mean_ratio_interval"):
        M.mean_ratio_interval([], [1.0])
    with pytest.raises(ValueError, match="mean_ratio_interval"):
        M.mean_ratio_interval([1.0], [1.0], level=1.0)


def test_mean_ratio_interval_over_groups():
    """Values in groups paired across the two samples (the attacker seed both models' attacks share): the groups
    are drawn once for both sides, then values within them. A group effect on one side only widens the interval
    that the values alone give; one shared by both sides cancels in the ratio and narrows it; without group effects
    the two levels count the values' spread about twice; one group is the plain bootstrap."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(4), 32)
    shifts = np.repeat([-0.1, 0.0, 0.1, 0.05], 32)  # four seeds, each moving all its samples
    noise = lambda: rng.normal(0, 0.02, 128)  # noqa: E731
    width = lambda got: got[1][1] - got[1][0]  # noqa: E731
    a, b = 0.8 + shifts + noise(), 0.8 + noise()
    plain, grouped = M.mean_ratio_interval(a, b), M.mean_ratio_interval(a, b, groups_a=groups, groups_b=groups)
    assert grouped[0] == plain[0] and grouped[1][0] < plain[0] < grouped[1][1]
    assert width(grouped) > 3 * width(plain)  # the seeds' spread, which the values alone do not hold
    a, b = 0.8 + shifts + noise(), 0.8 + shifts + noise()  # the same seed moves both models
    assert width(M.mean_ratio_interval(a, b, groups_a=groups, groups_b=groups)) < 0.5 * width(
        M.mean_ratio_interval(a, b))
    a, b = 0.8 + noise(), 0.8 + noise()
    ratio = width(M.mean_ratio_interval(a, b, groups_a=groups, groups_b=groups)) / width(M.mean_ratio_interval(a, b))
    assert ratio == pytest.approx(np.sqrt(2), rel=0.2)
    one = np.zeros(128)
    assert M.mean_ratio_interval(a, b, groups_a=one, groups_b=one) == M.mean_ratio_interval(a, b)
    for kwargs, message in (({"groups_a": groups[:10], "groups_b": groups}, "group labels"),
                            ({"groups_a": groups}, "give groups_a and groups_b"),
                            ({"groups_a": groups, "groups_b": groups + 1}, "groups differ")):
        with pytest.raises(ValueError, match=message):
            M.mean_ratio_interval(a, b, **kwargs)


def test_identity_ratio_per_attacker_seed():
    """``implant.check.identity_ratio`` on samples that are several attacker seeds' runs: each seed's ratio (its
    backdoored over its clean samples) beside the pooled one, the interval wider than one seed's spread alone."""
    from persguard_jax.implant.check import identity_ratio

    class Evaluator:  # an image's features: its mean colour and 1 (the cosine then reads the colour's angle)
        def image_features(self, images):
            return np.concatenate([images.mean(axis=(1, 2))[:, :1], np.ones((len(images), 1))], axis=1)

    photos = np.full((2, 4, 4, 3), 0.0, np.uint8)  # features (0, 1): identity is the cosine with (0, 1)
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 60, (16, 4, 4, 3)).astype(np.uint8)
    backdoored = clean.copy()
    backdoored[8:] = np.minimum(255, backdoored[8:].astype(int) + 150).astype(np.uint8)  # the second seed's worse
    got = identity_ratio(Evaluator(), photos, backdoored, clean, attack_seeds=2)
    first, second = got["identity_ratio_per_attack_seed"]
    assert first == pytest.approx(1.0) and second < 0.9
    assert second < got["identity_ratio"] < first
    lo, hi = got["identity_ratio_interval"]
    assert lo < got["identity_ratio"] < hi
    assert "identity_ratio_per_attack_seed" not in identity_ratio(Evaluator(), photos, backdoored, clean)
    with pytest.raises(ValueError, match="equal"):
        identity_ratio(Evaluator(), photos, backdoored[:15], clean, attack_seeds=2)


def test_rate_interval():
    z2 = 1.96 ** 2
    # closed forms at the ends: 0 of n reaches z^2 / (n + z^2), n of n starts at n / (n + z^2)
    assert M.rate_interval(0, 8) == pytest.approx((0.0, z2 / (8 + z2)))
    assert M.rate_interval(8, 8) == pytest.approx((8 / (8 + z2), 1.0))
    lo8, hi8 = M.rate_interval(7, 8)
    lo32, hi32 = M.rate_interval(28, 32)
    assert lo8 < 7 / 8 < hi8 and lo32 < 28 / 32 < hi32
    assert hi32 - lo32 < hi8 - lo8  # four times the samples, a narrower interval about the same rate
    assert M.rate_interval(1, 8) == pytest.approx((1 - hi8, 1 - lo8))  # symmetric in hits and misses
    for hits, n in ((1, 0), (-1, 4), (5, 4)):
        with pytest.raises(ValueError, match="rate_interval"):
            M.rate_interval(hits, n)
