"""Process set-up (persguard_jax/runtime.py): cluster detection from the environment (never a real
jax.distributed start), the compilation cache's folder, and the global --no-compile-cache flag."""
from __future__ import annotations

import pytest

from persguard_jax import runtime
from persguard_jax.cli import build_parser, main
from persguard_jax.train import distributed
from persguard_jax.train.distributed import DistributedConfig

SLURM_STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
              "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}


def test_a_plain_process_is_alone():
    cfg = DistributedConfig.from_env(env={"HOME": "/home/x", "PATH": "/bin"})
    assert not cfg.requested and not cfg.auto


def test_explicit_variables_as_launch_local_sets_them():
    cfg = DistributedConfig.from_env(env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
                                          "JAX_PROCESS_ID": "1", **SLURM_STEP})
    assert cfg == DistributedConfig("127.0.0.1:1234", 2, 1)  # explicit values win over a cluster's
    assert cfg.requested


@pytest.mark.parametrize("env, cluster, count", [
    (SLURM_STEP, "slurm", 4),
    (OMPI, "ompi", 8),
    ({"TPU_WORKER_HOSTNAMES": "t1v-w-0,t1v-w-1,t1v-w-2,t1v-w-3", "TPU_WORKER_ID": "0"}, "tpu", 4),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "tpu", 2),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "MEGASCALE_NUM_SLICES": "2"}, "tpu", 4),
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu", None),
])
def test_clusters_jax_detects_itself(env, cluster, count):
    cfg = DistributedConfig.from_env(env=env)
    assert cfg.auto and cfg.requested and cfg.cluster == cluster and cfg.num_processes == count


@pytest.mark.parametrize("env", [
    {**SLURM_STEP, "SLURM_NTASKS": "1"},                                   # one task
    {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"},   # the sbatch script, not an srun step
    {**OMPI, "OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"},            # a single-host TPU VM
])
def test_single_process_environments(env):
    assert not DistributedConfig.from_env(env=env).requested


def test_persguard_distributed_switch():
    assert DistributedConfig.from_env(env={"PERSGUARD_DISTRIBUTED": "auto"}) == DistributedConfig(
        auto=True, cluster="requested")  # a TPU VM pod: the worker list is in the GCE metadata only
    off = {"PERSGUARD_DISTRIBUTED": "off", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", **SLURM_STEP}
    assert not DistributedConfig.from_env(env=off).requested
    with pytest.raises(ValueError, match="PERSGUARD_DISTRIBUTED='maybe'"):
        DistributedConfig.from_env(env={"PERSGUARD_DISTRIBUTED": "maybe"})


def test_open_mpi_without_a_coordinator_is_an_error_not_n_separate_runs():
    env = {k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"}
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        DistributedConfig.from_env(env=env)
    with pytest.raises(ValueError, match="SLURM_NTASKS='four'"):
        DistributedConfig.from_env(env={**SLURM_STEP, "SLURM_NTASKS": "four"})


def test_compile_cache_folder(tmp_path):
    default = runtime.compile_cache_settings(env={"PERSGUARD_CACHE": str(tmp_path)})
    assert default == {"jax_enable_compilation_cache": True,
                       "jax_compilation_cache_dir": str(tmp_path / "jax_compilation_cache"),
                       "jax_persistent_cache_min_compile_time_secs": runtime.MIN_COMPILE_SECS}
    xdg = runtime.compile_cache_settings(env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert xdg["jax_compilation_cache_dir"] == str(tmp_path / "xdg" / "persguard_jax" / "jax_compilation_cache")
    own = runtime.compile_cache_settings(env={"JAX_COMPILATION_CACHE_DIR": "/scratch/xla",
                                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "5"})
    assert own == {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": "/scratch/xla"}
    off = {"jax_enable_compilation_cache": False}
    assert runtime.compile_cache_settings(False, env={"JAX_COMPILATION_CACHE_DIR": "/scratch/xla"}) == off
    assert runtime.compile_cache_settings(env={runtime.NO_CACHE_ENV: "1"}) == off
    assert runtime.compile_cache_settings(env={runtime.NO_CACHE_ENV: "0", "PERSGUARD_CACHE": "/c"})[
        "jax_compilation_cache_dir"] == "/c/jax_compilation_cache"


def test_setup_process_applies_everything_once(monkeypatch, tmp_path):
    import jax

    from persguard_jax import sharding
    calls: dict = {"devices": [], "config": {}, "distributed": []}
    monkeypatch.setattr(sharding, "request_cpu_devices", lambda n=None: calls["devices"].append(n))
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls["config"].__setitem__(name, value))
    monkeypatch.setattr(distributed, "initialize", lambda cfg: calls["distributed"].append(cfg) or False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("PERSGUARD_CACHE", str(tmp_path))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    setup = runtime.setup_process(cpu_devices=3)
    assert setup == runtime.ProcessSetup(distributed=False, compile_cache=tmp_path / "jax_compilation_cache")
    assert calls["devices"] == [3] and calls["distributed"] == [DistributedConfig(num_processes=1)]
    assert calls["config"]["jax_compilation_cache_dir"] == str(tmp_path / "jax_compilation_cache")
    assert runtime.setup_process(compile_cache=False).compile_cache is None
    assert calls["config"]["jax_enable_compilation_cache"] is False


def test_no_compile_cache_is_a_global_flag(monkeypatch, tmp_path, capsys):
    args = build_parser().parse_args(["--no-compile-cache", "demo", "--out", str(tmp_path), "dreambooth.steps=2"])
    assert args.no_compile_cache and args.command == "demo" and args.overrides == ["dreambooth.steps=2"]
    assert not build_parser().parse_args(["demo"]).no_compile_cache
    seen = []

    def fake_setup(**kwargs):  # record what main asks for, then stop before the command runs
        seen.append(kwargs)
        raise ValueError("stopped")
    monkeypatch.setattr(runtime, "setup_process", fake_setup)
    assert main(["--no-compile-cache", "plan", "--arch", "sd15", "--devices", "4"]) == 2
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert seen == [{"compile_cache": False, "cpu_devices": 4}, {"compile_cache": True, "cpu_devices": None}]
    assert "persguard plan: error: stopped" in capsys.readouterr().err
