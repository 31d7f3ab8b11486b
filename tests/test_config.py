"""YAML configs and key=value overrides."""
from __future__ import annotations

import pytest

from persguard_jax import config as cfglib
from persguard_jax import resources
from persguard_jax.workflows.personalize import parse_config


def test_numbers_without_a_dot_are_floats():
    data = cfglib.parse_yaml("a: 5e-6\nb: 1.0e-3\nc: 3\nd: .5\ne: '5e-6'\nf: -2E+3\n")
    assert data == {"a": 5e-6, "b": 1e-3, "c": 3, "d": 0.5, "e": "5e-6", "f": -2000.0}


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  learning_rate: 5e-6\ndreambooth: {steps: 10}\n")
    cfg = cfglib.load_config(path, ["optimizer.learning_rate=3e-4", "dreambooth.train_text_encoder=false",
                                    "lora.rank=8", "dreambooth.eval_prompts=[a, b]", "dreambooth.class_dir="])
    assert cfg["optimizer"]["learning_rate"] == 3e-4
    assert cfg["dreambooth"] == {"steps": 10, "train_text_encoder": False, "eval_prompts": ["a", "b"],
                                 "class_dir": None}
    assert cfg["lora"] == {"rank": 8}
    with pytest.raises(cfglib.ConfigError, match="not key=value"):
        cfglib.apply_overrides(cfg, ["steps"])
    with pytest.raises(cfglib.ConfigError, match="dreambooth.steps is a int|steps is a int"):
        cfglib.apply_overrides(cfg, ["dreambooth.steps.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(cfglib.ConfigError, match="bad.yaml: not valid YAML"):
        cfglib.read_yaml(bad)
    with pytest.raises(cfglib.ConfigError, match="config file not found"):
        cfglib.read_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["dreambooth_sd15", "dreambooth_sd21base", "dreambooth_tiny"])
def test_shipped_configs_parse(name):
    settings = parse_config(cfglib.load_config(resources.config_path(name)))
    assert isinstance(settings.optimizer.learning_rate, float)
    assert settings.loop.num_steps == settings.dreambooth.steps == settings.optimizer.total_steps
    with_lora = parse_config(cfglib.load_config(resources.config_path(name), ["lora.rank=4"]))
    assert with_lora.lora.rank == 4
    with pytest.raises(ValueError, match="unknown sections"):
        parse_config(cfglib.load_config(resources.config_path(name), ["optimiser.learning_rate=1"]))


def _sections() -> list[type]:
    """Every config section class of the package (imported, then found as Section subclasses)."""
    import persguard_jax.purifiers  # noqa: F401
    import persguard_jax.workflows.personalize  # noqa: F401
    import persguard_jax.workflows.protect  # noqa: F401
    import persguard_jax.workflows.pretrain  # noqa: F401
    from persguard_jax.protect import ProtectConfig  # noqa: F401
    import persguard_jax.workflows.world_clip  # noqa: F401
    from persguard_jax.data.world import WorldConfig  # noqa: F401
    from persguard_jax.lora import LoRAConfig  # noqa: F401
    from persguard_jax.losses import LossConfig  # noqa: F401
    from persguard_jax.sharding import MeshConfig  # noqa: F401
    from persguard_jax.train import LoopConfig, OptimizerConfig, StepConfig  # noqa: F401
    seen, todo = [], [cfglib.Section]
    while todo:
        for sub in todo.pop().__subclasses__():
            if "SECTION" in sub.__dict__:  # a section; abstract bases (purifiers.Purifier) name none
                seen.append(sub)
            todo.append(sub)
    return seen


def test_every_section_checks_its_values_and_its_defaults_pass():
    import dataclasses
    sections = _sections()
    assert len(sections) >= 12, [s.__name__ for s in sections]
    for cls in sections:
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.BOUNDS) <= names, (cls.__name__, set(cls.BOUNDS) - names)  # a typo would check nothing
        for bound in cls.BOUNDS.values():
            cfglib._interval(bound)
        cls()  # the defaults pass the checks a config's values go through
        hints = cfglib._hints(cls)
        assert hints, cls.__name__  # the type hints resolve, so values are type-checked at all
        for key, hint in hints.items():  # a value of the wrong kind is refused, naming section.key
            if hint in (int, float, bool) or hint == (int | None) or hint == (float | None):
                with pytest.raises(cfglib.ConfigError, match=rf"^{cls.SECTION}\.{key}: expected"):
                    cls.from_dict({key: "abc"})


@pytest.mark.parametrize("value, hint, want", [
    (3, int, 3), (1e3, int, 1000), (2, float, 2.0), ("a", tuple[str, ...], ("a",)), ([1, 2], tuple[int, ...], (1, 2)),
    (None, float | None, None), ("gspmd", cfglib.Literal["auto", "gspmd"], "gspmd"),
])
def test_values_are_coerced_to_their_field_types(value, hint, want):
    got = cfglib._check(value, hint)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value, hint", [
    (True, int), (2.5, int), ("3", int), (float("nan"), float), (float("inf"), float), (1, bool), (5, str),
    ([1, "a"], tuple[int, ...]), ("x", cfglib.Literal["a", "b"]), ({}, float | None),
])
def test_values_of_the_wrong_kind_are_refused(value, hint):
    with pytest.raises(cfglib._Mismatch):
        cfglib._check(value, hint)


def test_base_configs_merge_and_refuse_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: dreambooth_sd15\nmesh: {fsdp: 8, data: 1}\nlora: {rank: 4}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndreambooth: {steps: 250}\n")
    merged = cfglib.read_config(tmp_path / "b.yaml")
    shipped = cfglib.read_yaml(resources.config_path("dreambooth_sd15"))
    assert "base" not in merged and merged["dreambooth"]["steps"] == 250
    assert merged["dreambooth"]["resolution"] == shipped["dreambooth"]["resolution"]  # kept from the base
    assert merged["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and merged["lora"] == {"rank": 4}
    assert merged["optimizer"] == shipped["optimizer"]
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(cfglib.ConfigError, match="cycle"):
        cfglib.read_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: no_such_config\n")
    with pytest.raises(cfglib.ConfigError, match="e.yaml: base: no_such_config"):
        cfglib.read_config(tmp_path / "e.yaml")


# the workflow each shipped config is for, by its name's prefix
CONFIG_WORKFLOWS = {"dreambooth_": "personalize", "cdl_": "personalize", "implant_": "implant", "protect_": "protect",
                    "diagnose_": "diagnose", "purify": "purify", "world_tiny": "pretrain", "world_clip": "train-clip"}


@pytest.mark.parametrize("name", resources.config_names())
def test_every_shipped_config_parses_with_its_workflow(name):
    from persguard_jax.cli import WORKFLOWS
    from persguard_jax.workflows import runs
    workflows = {w.name: w for w in WORKFLOWS()}
    prefix = next(p for p in CONFIG_WORKFLOWS if name.startswith(p))
    wf = workflows[CONFIG_WORKFLOWS[prefix]]
    config = runs.parse_config(wf.resolve(cfglib.read_config(resources.config_path(name)), None), wf.sections())
    if name.count("_") == 2 and name.split("_")[-1] in ("v5e8", "v5p16", "h100x8"):  # an accelerator layout
        assert config.mesh.data * config.mesh.fsdp * config.mesh.tensor == 8  # all three have 8 chips / GPUs
        assert config.step.compute_dtype == "bfloat16" and config.step.attention == "auto"
    if name.startswith("cdl_"):
        assert config.cdl.enabled
