"""Evaluation metrics: each array function against hand-computed values (eagerly and under jax.jit), the Fréchet
distance against scipy's sqrtm, and the CLIP evaluator on a tiny random CLIPModel."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persguard_jax import metrics as M
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

# The tiny model compiles in about half the time without XLA's CPU optimisations (results are the same).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


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
    return M.CLIPEvaluator(*tiny_clip, batch_size=4, compiler_options=FAST_COMPILE)


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
    loaded = M.CLIPEvaluator.from_folder(tmp_path / "clip", batch_size=4, compiler_options=FAST_COMPILE)
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
