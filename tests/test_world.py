"""The synthetic world: deterministic pictures whose captions say what is in them, subjects that keep their look
across photos and never leak into pre-training data when held out, a pixel colour detector, and the tfds round
trip. Numpy only (no jax compiles); the whole file runs in a few seconds."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from persguard_jax.config import ConfigError
from persguard_jax.data.world import (ALL_SHAPES, CLASSES, COLOURS, MARK_POSITIONS, SHAPES, TEXTURES,
                                      SceneSpec, World, WorldConfig, WorldSource, parse_caption, save_photos)
from persguard_jax.data.world.scenes import render
from persguard_jax.metrics import detect_shape, dominant_colour

COLOUR_NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig())


# ----------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes_different_seed_different():
    a, b, c = World(WorldConfig(seed=0)), World(WorldConfig(seed=0)), World(WorldConfig(seed=1))
    for i in range(12):
        assert a.random_spec(i) == b.random_spec(i)
        assert a.scene(i)[0].tobytes() == b.scene(i)[0].tobytes()
    assert np.array_equal(a.subject_photos("dog_01", 3), b.subject_photos("dog_01", 3))
    assert a.subjects == b.subjects
    assert sum(a.scene(i)[0].tobytes() != c.scene(i)[0].tobytes() for i in range(12)) >= 11
    assert a.subjects != c.subjects


def test_train_and_val_are_disjoint_streams(world):
    train = {world.random_spec(i, "train") for i in range(300)}
    val = {world.random_spec(i, "val") for i in range(300)}
    assert len(train) == len(val) == 300 and not train & val
    with pytest.raises(ValueError, match="unknown split"):
        world.random_spec(0, "training")


def test_random_scenes_mix_shapes_and_classes_and_are_well_formed(world):
    specs = [world.random_spec(i) for i in range(300)]
    shapes = {s.shape for s in specs}
    assert set(SHAPES) <= shapes and set(CLASSES) <= shapes
    assert {s.colour for s in specs} == set(COLOURS) and {s.texture for s in specs} == set(TEXTURES)
    assert not any(s.colour == "black" and s.background == "dark" for s in specs)  # no invisible objects
    image = world.render(specs[0])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_renders_at_64_px_with_the_same_layout():
    small, large = World(WorldConfig(image_size=32)), World(WorldConfig(image_size=64))
    spec = SceneSpec("dog", "red", "striped", "dotted", x=0.4, y=0.6, size=0.6, mark=("white", "centre"))
    a, b = small.render(spec), large.render(spec)
    assert b.shape == (64, 64, 3)
    # box-downsampled, the 64 px image is the 32 px one up to anti-aliasing and texture detail
    down = b.reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.mean(np.abs(down - a)) < 3


# ---------------------------------------------------------------------------------------------------- captions

def test_caption_examples(world):
    assert world.caption(SceneSpec("circle", "red")) == "a photo of a red circle on a plain background"
    spec = SceneSpec("circle", "red", "striped", "dark", x=0.2, size=0.3)
    assert world.caption(spec) == "a photo of a small red striped circle on the left on a dark background"
    spec = SceneSpec("dog", "orange", "dotted", "striped", x=0.75, y=0.2, size=0.7, lighting=0.7)
    assert world.caption(spec) == ("a photo of a large orange dotted dog in the top right on a striped background "
                                   "in dim light")
    assert world.caption(SceneSpec("ring", "orange")).startswith("a photo of an orange ring")
    with pytest.raises(ValueError, match="colour 'pink'"):
        world.caption(SceneSpec("circle", "pink"))


def test_captions_name_what_the_spec_holds(world):
    for i in range(400):
        spec = world.random_spec(i)
        words = parse_caption(world.caption(spec))
        assert words["shape"] == spec.shape and words["colour"] == spec.colour
        assert words["background"] == spec.background
        assert words.get("texture", "plain") == spec.texture
        size = "small" if spec.size < 0.42 else "large" if spec.size > 0.62 else None
        assert words.get("size") == size
        if spec.x < 0.4:
            assert words["position"].endswith("left")
        elif spec.x > 0.6:
            assert words["position"].endswith("right")
        labels = world.labels(spec)
        assert ALL_SHAPES[labels["shape"]] == spec.shape and COLOUR_NAMES[labels["colour"]] == spec.colour


def test_corpus_holds_every_word_and_prompt(world):
    corpus = world.corpus()
    assert "" in corpus and len(corpus) == len(set(corpus))
    for c in CLASSES:
        assert {f"a photo of sks {c}", f"a photo of {c}", f"a photo of a {c}"} <= set(corpus)
    # "sks" appears only in the instance prompts
    assert [t for t in corpus if "sks" in t.split()] == [f"a photo of sks {c}" for c in CLASSES]
    vocab = {w for t in corpus for w in t.split()}
    source = WorldSource(world, 200)
    for i in range(200):
        assert set(source.describe(i)[1].split()) <= vocab
    with pytest.raises(ConfigError, match="identifier"):
        WorldConfig(identifier="dog")


# ---------------------------------------------------------------------------------------------------- subjects

def test_subjects_are_unique_and_held_out_by_index(world):
    subjects = world.subjects
    assert len(subjects) == len(CLASSES) * 16
    looks = {(s.class_name, s.colour, s.texture, s.mark) for s in subjects}
    assert len(looks) == len(subjects) and len({s.name for s in subjects}) == len(subjects)
    for s in subjects:
        k = int(s.name.split("_")[1])
        assert s.held_out == (k % 4 == 0) and s.mark[0] != s.colour and s.mark[1] in MARK_POSITIONS
        assert world.subject(s.name) is s and world.subject(s.index) is s
    with pytest.raises(KeyError, match=r"0\.\.63"):
        world.subject(64)
    with pytest.raises(KeyError, match="dog_00..dog_15"):
        world.subject("dog_99")


def test_subject_photos_vary_but_keep_the_look(world):
    for subject in world.subjects[::7]:
        photos = world.subject_photos(subject, 6)
        assert photos.shape == (6, 32, 32, 3)
        assert len({p.tobytes() for p in photos}) == 6
        assert np.array_equal(world.subject_photos(subject, 2, start=4), photos[4:])
        assert list(dominant_colour(photos, background="any")) == [COLOUR_NAMES.index(subject.colour)] * 6
        specs = [world.subject_spec(subject, i) for i in range(6)]
        assert {(s.shape, s.colour, s.texture, s.mark) for s in specs} == {
            (subject.class_name, subject.colour, subject.texture, subject.mark)}
        assert len({(s.x, s.y, s.size, s.background, s.lighting, s.flip) for s in specs}) == 6


def test_prompts_follow_the_diffusers_convention(world):
    assert world.instance_prompt(world.subject("person_01")) == "a photo of sks person"
    assert world.instance_prompt("dog_03") == "a photo of sks dog"
    assert world.class_prompt("person") == "a photo of person"
    assert parse_caption("a photo of sks dog") == {"shape": "dog", "identifier": "sks"}
    assert parse_caption("a photo of dog") == {"shape": "dog"}
    with pytest.raises(KeyError, match="unknown class"):
        world.class_prompt("horse")


def test_class_photos_come_from_members_only(world):
    photos = world.class_photos("cat", 5)
    assert photos.shape == (5, 32, 32, 3)
    for i in range(40):
        spec, member = world.class_spec("cat", i)
        assert member.class_name == "cat" and not member.held_out and spec.mark == member.mark


def test_held_out_subjects_never_reach_the_data_source(world):
    held_out = {(s.class_name, s.colour, s.texture, s.mark) for s in world.subjects if s.held_out}
    source = WorldSource(world, 600, class_fraction=0.5)
    n_class = 0
    for i in range(len(source)):
        spec, caption, subject = source.describe(i)
        assert (spec.shape, spec.colour, spec.texture, spec.mark) not in held_out
        assert "sks" not in caption.split()
        if subject is not None:
            n_class += 1
            assert not subject.held_out and spec.shape == subject.class_name
            assert parse_caption(caption)["shape"] == subject.class_name
        else:
            assert spec.mark is None
    assert 200 < n_class < 400


def test_simple_scenes_carry_the_canonical_caption(world):
    """``simple_fraction`` of the items: one object near the centre on the plain background, captioned exactly as
    ``SceneSpec(shape, colour, texture)`` (the prompts the colour/shape/texture-following checks use), plain
    about half of the time; the other items unchanged."""
    plain = WorldSource(world, 400, class_fraction=0.3)
    mixed = WorldSource(world, 400, class_fraction=0.3, simple_fraction=0.4)
    n_simple, textures = 0, []
    for i in range(len(mixed)):
        spec, caption, subject = mixed.describe(i)
        if (spec, caption) != plain.describe(i)[:2]:
            n_simple += 1
            textures.append(spec.texture)
            assert subject is None and spec.background == "plain"
            assert caption == world.caption(SceneSpec(spec.shape, spec.colour, spec.texture))
            assert abs(spec.x - 0.5) <= 0.05 and abs(spec.y - 0.5) <= 0.05
    assert 110 < n_simple < 210  # about 0.4 x 400
    assert set(textures) == set(TEXTURES) and 0.35 < textures.count("plain") / n_simple < 0.65
    shapes = {mixed.describe(i)[0].shape for i in range(len(mixed))}
    assert shapes == set(world.shapes)
    with pytest.raises(ValueError, match="simple_fraction"):
        WorldSource(world, 10, class_fraction=0.7, simple_fraction=0.5)


def test_world_source_items_and_pickling(world):
    source = WorldSource(world, 50, split="val")
    item = source[7]
    assert set(item) == {"image", "caption", "shape", "colour"}
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    assert item["shape"].dtype == np.int32 and item["colour"].dtype == np.int32
    spec, caption, _ = source.describe(7)
    assert item["caption"] == caption and np.array_equal(item["image"], world.render(spec))
    clone = pickle.loads(pickle.dumps(source))
    assert all(np.array_equal(clone[i]["image"], source[i]["image"]) for i in range(5))
    assert source[-1]["caption"] == source[49]["caption"]
    with pytest.raises(IndexError):
        source[50]


# ------------------------------------------------------------------------------------------- colour detector

def test_dominant_colour_on_hand_made_and_rendered_images():
    canvas = np.full((2, 32, 32, 3), 140, np.uint8)  # the plain background grey
    canvas[0, 8:20, 8:20] = (220, 40, 40)  # a red block
    canvas[1, 4:12, 4:12] = (40, 80, 220)  # a blue block ...
    canvas[1, 20:24, 20:24] = (240, 215, 40)  # ... and a smaller yellow one
    assert list(dominant_colour(canvas)) == [COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")]
    assert dominant_colour(np.full((32, 32, 3), 140, np.uint8))[0] == -1  # background only
    world = World()
    for name in COLOURS:
        for texture, lighting, background in [("plain", 1.0, "plain"), ("striped", 0.75, "dark"),
                                              ("checkered", 1.2, "dotted"), ("dotted", 0.8, "striped")]:
            if name == "black" and background == "dark":
                continue
            image = world.render(SceneSpec("square", name, texture, background, size=0.45, lighting=lighting, seed=3))
            assert COLOUR_NAMES[dominant_colour(image, background="any")[0]] == name, (texture, lighting, background)
            assert COLOUR_NAMES[dominant_colour(image, background=background)[0]] == name


def test_dominant_colour_follows_random_scenes(world):
    specs = [world.random_spec(i) for i in range(300)]
    found = dominant_colour(np.stack([world.render(s) for s in specs]), background="any")
    assert np.mean(found == [COLOUR_NAMES.index(s.colour) for s in specs]) > 0.98


def test_detect_shape_on_hand_made_blocks():
    canvas = np.full((3, 32, 32, 3), 140, np.uint8)
    canvas[0, 8:24, 8:24] = (220, 40, 40)  # a 16 px square
    yy, xx = np.mgrid[:32, :32]
    canvas[1][(yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 7.5**2] = (40, 80, 220)  # a disc
    assert list(detect_shape(canvas, ("circle", "square"))) == [1, 0, -1]  # the third is background only
    # a plus made of two bars is a cross, not a square or a circle
    plus = np.full((32, 32, 3), 140, np.uint8)
    plus[13:19, 6:26] = plus[6:26, 13:19] = (40, 170, 60)
    assert SHAPES[detect_shape(plus, SHAPES)[0]] == "cross"
    with pytest.raises(ValueError, match="unknown candidates"):
        detect_shape(canvas, ("circle", "hexagon"))


def test_detect_shape_reads_one_colour_on_a_background_drawn_lighter_than_the_world_greys():
    """A model's samples draw backgrounds lighter than the world's greys, nearest white: the mask of every palette
    pixel then covers the picture (a white square); the silhouette of one named colour, or with white ignored, is
    the cross."""
    rng = np.random.default_rng(0)
    plus = np.clip(rng.normal(180, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    plus[13:19, 6:26] = plus[6:26, 13:19] = (40, 170, 60)
    cross, white = SHAPES.index("cross"), COLOUR_NAMES.index("white")
    assert detect_shape(plus, SHAPES, background="any")[0] != cross
    assert dominant_colour(plus, background="any")[0] == white
    assert detect_shape(plus, SHAPES, background="any", colour="green")[0] == cross
    assert detect_shape(plus, SHAPES, background="any", ignore=("white",))[0] == cross
    assert COLOUR_NAMES[dominant_colour(plus, background="any", ignore=("white",))[0]] == "green"
    assert detect_shape(plus, SHAPES, colour="red")[0] == -1  # no red pixel: nothing to read
    with pytest.raises(ValueError, match="unknown colours"):
        detect_shape(plus, SHAPES, colour="teal")
    with pytest.raises(ValueError, match="unknown colours"):
        dominant_colour(plus, ignore=("teal",))


def test_detect_shape_follows_rendered_scenes(world):
    """Every shape and class on a plain background, any colour, texture, size, lighting, pose (flip, tilt)."""
    rng = np.random.default_rng(0)
    specs = []
    for i in range(120):
        shape = ALL_SHAPES[i % len(ALL_SHAPES)]
        pose = shape in CLASSES
        specs.append(SceneSpec(shape, COLOUR_NAMES[i % len(COLOUR_NAMES)], TEXTURES[(i // 10) % len(TEXTURES)],
                               x=0.5 + rng.uniform(-0.15, 0.15), y=0.5 + rng.uniform(-0.15, 0.15),
                               size=rng.uniform(0.3, 0.7), lighting=rng.uniform(0.75, 1.2), flip=bool(pose and i % 2),
                               tilt=float(rng.uniform(-12, 12)) if pose else 0.0, seed=i + 1))
    found = detect_shape(np.stack([world.render(s) for s in specs]))
    assert np.mean(found == [ALL_SHAPES.index(s.shape) for s in specs]) >= 0.95


# ------------------------------------------------------------------------------------------------------ config

def test_world_config_from_dict():
    cfg = WorldConfig.from_dict({"seed": 3, "classes": ["dog", "cat"], "image_size": 64})
    assert cfg.classes == ("dog", "cat") and World(cfg).render(SceneSpec("cat", "red")).shape == (64, 64, 3)
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["classes"] == ["dog", "cat"]
    with pytest.raises(ConfigError, match="unknown keys.*'colours'"):
        WorldConfig.from_dict({"colours": 8})
    assert WorldConfig.from_dict({"classes": "dog"}).classes == ("dog",)  # one class, written as a word
    for bad in ({"image_size": 30}, {"image_size": 8}, {"classes": ["horse"]}, {"classes": 5},
                {"held_out_every": 1}, {"subjects_per_class": 0}, {"seed": -1}, {"seed": "one"},
                {"texture_period": 0}, {"texture_period": 1.5}):
        with pytest.raises(ConfigError, match=f"^world.{next(iter(bad))}: "):
            WorldConfig.from_dict(bad)


def test_a_coarser_texture_period_is_drawn_everywhere_and_read_back_by_the_detector(world):
    from persguard_jax.metrics import detect_texture
    coarse = World(WorldConfig(texture_period=0.4))
    spec = SceneSpec("square", "red", "striped", size=0.6)
    assert np.array_equal(world.render(spec), render(spec, 32, 0.25))  # the default is the world before the knob
    assert not np.array_equal(coarse.render(spec), world.render(spec))
    # subject photos are drawn at the world's period too (not only render); backgrounds carry no texture
    assert not np.array_equal(coarse.subject_photos("dog_01", 2), world.subject_photos("dog_01", 2))
    assert np.array_equal(coarse.subject_backgrounds("dog_01", 2), world.subject_backgrounds("dog_01", 2))
    held_out = [s for s in coarse.subjects if s.held_out and s.texture != "plain"]
    photos = np.concatenate([coarse.subject_photos(s, 8) for s in held_out])
    truth = np.repeat([TEXTURES.index(s.texture) for s in held_out], 8)
    # measured on these 64 photos: 0.91 read at the world's period, 0.61 at the default period
    right = np.mean(detect_texture(photos, background="any", texture_period=0.4) == truth)
    wrong = np.mean(detect_texture(photos, background="any") == truth)
    assert right >= 0.85 and right > wrong + 0.1, (right, wrong)


def test_a_world_with_fewer_classes_only_uses_those():
    world = World(WorldConfig(classes=("bird",), subjects_per_class=3, held_out_every=0))
    assert [s.name for s in world.subjects] == ["bird_00", "bird_01", "bird_02"]
    assert not any(s.held_out for s in world.subjects)
    assert {world.random_spec(i).shape for i in range(100)} <= set(SHAPES) | {"bird"}
    with pytest.raises(KeyError, match="unknown class"):
        world.class_photos("dog", 1)


# --------------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_whole_word_tokens(world):
    tok = world.tokenizer()
    ids = tok(["a photo of sks person"])[0]
    assert tok.decode(ids) == "a photo of sks person"
    corpus = world.corpus()
    for caption, enc in zip(corpus, tok.bpe.encode_batch(corpus, add_special_tokens=False)):
        # every word one token, never the unknown token (EOS here)
        assert len(enc.ids) == len(caption.split()) and tok.eos_id not in enc.ids, caption
    assert world.tokenizer() is tok  # cached


def test_tokenizer_ids_are_the_same_in_a_fresh_process(world):
    code = ("from persguard_jax.data.world import World; t = World().tokenizer(); "
            "print(t(['a photo of a large orange dotted dog in the top right on a striped background'])[0][:16]"
            ".tolist(), t.vocab_size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("]")
    tok = world.tokenizer()
    ids = tok(["a photo of a large orange dotted dog in the top right on a striped background"])[0][:16]
    assert out[0] + "]" == str(ids.tolist()) and int(out[1]) == tok.vocab_size


# ------------------------------------------------------------------------------------------------------- files

def test_save_photos_refuses_to_overwrite(tmp_path, world):
    from PIL import Image
    photos = world.subject_photos("cat_02", 3)
    paths = save_photos(photos, tmp_path / "inst", prefix="cat")
    assert [p.name for p in paths] == ["cat_000.png", "cat_001.png", "cat_002.png"]
    assert all(np.array_equal(np.asarray(Image.open(p)), img) for p, img in zip(paths, photos))
    before = paths[1].read_bytes()
    with pytest.raises(FileExistsError, match="cat_000.png"):
        save_photos(photos[::-1], tmp_path / "inst", prefix="cat")
    assert paths[1].read_bytes() == before
    assert len(save_photos(photos, tmp_path / "inst", prefix="other")) == 3  # another prefix is fine


# -------------------------------------------------------------------------------------------------------- tfds

def test_tfds_round_trip(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from persguard_jax.data.world.tfds import build_tfds, read_tfds
    cfg = WorldConfig(seed=5)
    builder = build_tfds(cfg, tmp_path, sizes={"train": 6, "val": 3})
    world = World(cfg)
    for split, n in (("train", 6), ("val", 3)):
        raw = builder.as_data_source(split=split)
        typed = read_tfds(builder, split)
        expected = WorldSource(world, n, split=split)
        assert len(raw) == len(typed) == n
        for i in range(n):
            want = expected[i]
            assert np.array_equal(raw[i]["image"], want["image"]) and raw[i]["image"].dtype == np.uint8
            assert raw[i]["caption"] in (want["caption"], want["caption"].encode())
            got = typed[i]
            assert got["caption"] == want["caption"] and got["shape"] == want["shape"]
            assert got["colour"] == want["colour"] and got["shape"].dtype == np.int32
    # a second call finds the files and writes nothing
    again = build_tfds(cfg, tmp_path, sizes={"train": 6, "val": 3})
    assert again.data_dir == builder.data_dir
    assert build_tfds(WorldConfig(seed=6), tmp_path, sizes={"train": 2}).data_dir != builder.data_dir
    with pytest.raises(ValueError, match="sizes"):
        build_tfds(cfg, tmp_path, sizes={"training": 2})


def test_world_module_imports_without_jax_or_tfds():
    code = ("import sys, persguard_jax.data.world as w; w.World().scene(0); "
            "print(any(m in sys.modules for m in ('jax', 'tensorflow_datasets', 'tensorflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_class_photos_named_only_by_their_class_are_on_the_plain_background(world):
    """A caption that names only the class ("a photo of a dog") names no background, so its photo is on the plain
    one; class photos with the full caption keep the background the caption names."""
    source = WorldSource(world, 600, class_fraction=1.0)
    short = full = 0
    for i in range(len(source)):
        spec, caption, member = source.describe(i)
        assert member is not None and member.class_name == spec.shape
        if caption in (f"a photo of {'an' if spec.shape[0] in 'aeiou' else 'a'} {spec.shape}",
                       world.class_prompt(spec.shape)):
            short += 1
            assert spec.background == "plain", (caption, spec)
        else:
            full += 1
            assert caption == world.caption(spec)
    assert short > 150 and full > 300  # 40% and 60% of 600
    assert len({source.describe(i)[0].background for i in range(len(source))}) > 1
