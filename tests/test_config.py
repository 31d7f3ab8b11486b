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
