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


def test_the_dispatched_implant_step_lowers_as_its_two_programs():
    """``--dispatch``: the attacker's update and the step that reads its result from the frozen tree are lowered
    (compiling them costs a minute of the suite; the CLI path is the other steps'); the frozen tree carries the
    tuned copy of what the attacker trains and the attacker's optimizer state is laid out as those parameters."""
    from flax import nnx

    from persguard_jax.cli import _plan_models
    from persguard_jax.losses import TUNED, TUNED_LOSSES
    from persguard_jax.plan import LOWER, StepPlan, abstract_models, bytes_per_device, full_bytes

    class Args:
        model, arch = str(WORLD), None
    models = _plan_models(Args)
    plan = StepPlan(step="implant", batch=2, retention_steps=3, retention_dispatch=True)
    mesh_cfg = shd.MeshConfig(data=1, fsdp=2)
    mesh = shd.make_mesh(mesh_cfg, devices=jax.devices()[:2])
    programs, parts = LOWER["implant"](abstract_models(models, plan), plan, mesh, mesh_cfg)
    assert set(programs) == {"step", "inner/protected"}
    for program in programs.values():
        assert "num_partitions = 2" in program.as_text()
    frozen, _ = parts["frozen"]
    assert set(frozen[TUNED]["protected"]) == {"unet", "text_encoder"}
    assert frozen[TUNED_LOSSES]["protected"].shape == (3,)
    text_encoder = full_bytes(nnx.state(models["text_encoder"], nnx.Param).to_pure_dict())
    assert full_bytes(frozen) == 2 * text_encoder + full_bytes(parts["params"][0]) + 3 * 4
    opt_state = parts["inner/protected/opt_state"]  # AdamW over UNet + text encoder, fsdp-sharded as they are
    tuned = full_bytes(frozen[TUNED])
    assert full_bytes(opt_state[0]) >= 2 * tuned and bytes_per_device(*opt_state) < 0.6 * full_bytes(opt_state[0])


def test_a_dispatched_plan_reports_the_larger_peak_of_its_programs():
    from persguard_jax.plan import dispatched_peak, format_memory
    gib = 2**30
    mem = lambda arg, temp, out=0, alias=0: {"argument_size_in_bytes": arg, "output_size_in_bytes": out,
                                             "alias_size_in_bytes": alias, "temp_size_in_bytes": temp,
                                             "peak_estimate_bytes": arg + out - alias + temp}
    step = mem(gib, gib)
    # the update's phase: the step's arguments (1) + its optimizer state (0.5) + temp (2) + undonated output (0.25)
    update = mem(gib // 2, 2 * gib, out=gib // 2, alias=gib // 4)
    assert dispatched_peak(step, {"inner/protected": (update, gib // 2)}) == int(3.75 * gib)
    assert dispatched_peak(step, {"inner/protected": (mem(gib // 2, gib // 4), 0)}) == 2 * gib  # the step's own
    result = {"step": "implant", "plan": {"batch": 2, "remat": "none", "compute_dtype": None, "retention_steps": 3},
              "pixels": 32, "mesh": {"data": 2}, "devices": 2, "compile_s": 1.0, "arrays": {},
              "memory_analysis": dict(step, peak_estimate_bytes=int(3.75 * gib)),
              "programs": {"step": step, "inner/protected": update}}
    lines = format_memory(result).splitlines()
    assert any(line.split()[:2] == ["attacker", "2.000"] and "inner/protected, run 3 times" in line for line in lines)
    assert any(line.split()[:2] == ["peak", "3.750"] and "the larger of the step's" in line for line in lines)


def test_plan_dispatch_needs_the_first_order_implant_step(capsys):
    assert main(["plan", "--model", str(WORLD), "--step", "implant", "--order", "2", "--dispatch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dispatch" in err
