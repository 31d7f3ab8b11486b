"""Where shipped configs, assets and the per-user cache are (persguard_jax/resources.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from persguard_jax import resources
from persguard_jax.workflows import world_assets


def test_shipped_configs_by_name_or_file(tmp_path, monkeypatch):
    names = resources.config_names()
    assert {"dreambooth_sd15", "dreambooth_world", "world_tiny", "world_clip"} <= set(names)
    shipped = resources.configs_dir() / "dreambooth_sd15.yaml"
    assert resources.config_path("dreambooth_sd15") == shipped
    assert resources.config_path("dreambooth_sd15.yaml") == shipped
    own = tmp_path / "dreambooth_sd15.yaml"  # a user's file wins over the shipped config of the same name
    own.write_text("dreambooth: {steps: 1}\n")
    assert resources.config_path(own) == own
    monkeypatch.chdir(tmp_path)
    assert resources.config_path("dreambooth_sd15.yaml") == Path("dreambooth_sd15.yaml")


@pytest.mark.parametrize("name", ["dreambooth_sd16", "configs/dreambooth_sd15.yaml"])
def test_unknown_config_lists_the_shipped_ones(name):
    with pytest.raises(FileNotFoundError) as e:
        resources.config_path(name)
    message = str(e.value)
    assert "\n" not in message and name in message
    assert all(n in message for n in resources.config_names())


def test_personalize_reports_an_unknown_config_in_one_line(tmp_path, capsys):
    from persguard_jax.cli import main
    assert main(["personalize", "--model", str(tmp_path), "--instance-dir", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--config", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("persguard personalize: error: nope: ") and "dreambooth_sd15" in err
    assert len(err.splitlines()) == 1


def test_assets_are_package_data():
    assert resources.assets_dir() == Path(resources.__file__).resolve().parent / "assets"
    assert (resources.assets_dir() / "world_tiny" / "model_index.json").is_file()
    assert world_assets.world_model(build=False) == resources.assets_dir() / "world_tiny"


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("PERSGUARD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resources.cache_root() == tmp_path / "home" / ".cache" / "persguard_jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resources.cache_root() == tmp_path / "xdg" / "persguard_jax"
    monkeypatch.setenv("PERSGUARD_CACHE", str(tmp_path / "mine"))
    assert resources.cache_root() == tmp_path / "mine"
    assert world_assets.cache_dir() == tmp_path / "mine"
