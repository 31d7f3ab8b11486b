"""``persguard plan --step``: a workflow's step compiled ahead of time on fake devices, its bytes per device read
from XLA; the implantation and ASPL programs lower for an abstract pipeline."""
from __future__ import annotations

import json

import jax
import pytest

from persguard_jax import sharding as shd
from persguard_jax.cli import main
from persguard_jax.resources import assets_dir

WORLD = assets_dir() / "world_tiny"


@pytest.mark.slow
def test_plan_dreambooth_step_bytes_per_device(capsys):
    assert main(["plan", "--model", str(WORLD), "--data", "1", "--fsdp", "8", "--limit", "1", "--step",
                 "dreambooth", "--batch", "4", "--remat", "full", "--no-prior", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert "activations" in out and "dreambooth step, 4 per step at 32 px" in out
    arrays, mem = result["arrays"], result["memory_analysis"]
    for name in ("params", "opt_state"):  # UNet + text encoder, fsdp over 8: an eighth each, plus small arrays
        row = arrays[name]
        assert row["bytes_unsharded"] / 8 <= row["bytes_per_device"] <= row["bytes_unsharded"] / 8 * 1.1, (name, row)
    assert arrays["opt_state"]["bytes_unsharded"] >= 2 * arrays["params"]["bytes_unsharded"]  # AdamW mu and nu
    assert mem["temp_size_in_bytes"] > 0
    assert mem["peak_estimate_bytes"] >= arrays["params"]["bytes_per_device"] + arrays["opt_state"]["bytes_per_device"]
    assert result["plan"]["remat"] == "full" and result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("step", ["implant", "aspl"])
def test_implant_and_aspl_programs_lower_for_an_abstract_pipeline(step):
    from persguard_jax.cli import _plan_models
    from persguard_jax.plan import LOWER, StepPlan, abstract_models

    class Args:
        model, arch = str(WORLD), None
    plan = StepPlan(step=step, batch=2, remat="full", retention_steps=2, surrogate_steps=1, pgd_steps=2,
                    model_steps=1)
    mesh_cfg = shd.MeshConfig(data=1, fsdp=2)
    mesh = shd.make_mesh(mesh_cfg, devices=jax.devices()[:2])
    lowered, parts = LOWER[step](abstract_models(_plan_models(Args), plan), plan, mesh, mesh_cfg)
    assert "num_partitions = 2" in lowered.as_text()  # one program partitioned over the 2 devices
    params, _ = parts["params"]
    if step == "aspl":  # the model and its surrogate train UNet and text encoder; the VAE is frozen beside them
        assert set(params) == {"unet", "text_encoder"} and set(parts["frozen"][0]) == {"vae"}
        assert parts["batch"][0]["images"].shape == (2, 32, 32, 3)
    else:  # the implantation trains the UNet (the attacker inside it also the text encoder), with AdamW state
        assert set(params) == {"unet"} and set(parts["frozen"][0]) == {"text_encoder"} and "opt_state" in parts


def test_plan_step_needs_a_whole_pipeline(capsys):
    assert main(["plan", "--model", str(WORLD / "unet"), "--step", "dreambooth"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a whole pipeline" in err
