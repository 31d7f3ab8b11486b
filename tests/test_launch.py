"""The launchers (launch/): every --dry-run prints the commands a launch would run and touches nothing; the TPU
pod launcher's decisions (reuse, create, re-create after preemption) with a stand-in gcloud; the SLURM script's
srun line per mode; and a real 2-process CPU run through the plain multi-node launcher (ssh stood in by bash)."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
COMMAND = ["persguard", "personalize", "--model", "/fs/sd15", "--instance-dir", "/fs/my photos", "--out", "/fs/runs/db"]


def _stub(folder: Path, name: str, body: str) -> Path:
    """An executable ``name`` in ``folder`` that appends its arguments (one call per line) to ``calls.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name} $*" >> "{folder}/calls.txt"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _run(args: list[str], tmp_path: Path, stubs: Path | None = None, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    if stubs is not None:
        full_env["PATH"] = f"{stubs}:{full_env['PATH']}"
    for k in ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_NODELIST", "SLURM_SUBMIT_DIR"):
        full_env.pop(k, None)
    return subprocess.run(args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands (lines starting "+ "), split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _head() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


TPU = [str(LAUNCH / "tpu_pod.sh"), "--name", "pg-pod", "--zone", "us-central2-b", "--accelerator", "v5p-16",
       "--allow-dirty"]


def test_tpu_pod_dry_run_prints_every_step_and_touches_nothing(tmp_path):
    stubs = tmp_path / "bin"
    _stub(stubs, "gcloud", "exit 1")
    result = _run(TPU + ["--spot", "--dry-run", "--", *COMMAND], tmp_path, stubs)
    assert result.returncode == 0, result.stderr
    assert not (stubs / "calls.txt").exists() and not (tmp_path / "logs").exists()
    cmds = _commands(result.stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert gcloud[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    create = [c for c in gcloud if c[4] == "create"][0]
    assert create[5] == "pg-pod" and ["--accelerator-type", "v5p-16"] == create[8:10]
    assert "--version" in create and create[create.index("--version") + 1] == "v2-alpha-tpuv5" and "--spot" in create
    assert any(c[4] == "delete" for c in gcloud)
    head = _head()
    archive = [c for c in cmds if c[0] == "git"][0]
    assert archive[-1] == head and "archive" in archive
    scp, install, run = [c for c in gcloud if c[4] in ("scp", "ssh")][:3]
    for c in (scp, install, run):
        assert "--worker=all" in c and c[c.index("--zone") + 1] == "us-central2-b"
    assert f"persguard_jax-{head[:12]}" in install[-1] and "[tpu]" in install[-1]
    remote = run[-1]
    assert "PERSGUARD_DISTRIBUTED=auto" in remote
    # the user's command, quoted, with --resume added so that re-running the line resumes after a preemption
    assert shlex.join(COMMAND).replace("'", "") in remote.replace("\\", "").replace("'", "")
    assert "--resume" in remote and "tee" in remote


@pytest.mark.parametrize("state,expect", [
    ("READY\tv5p-16", []),                              # reused as it is
    ("", ["create"]),                                    # absent: created
    ("PREEMPTED\tv5p-16", ["delete", "create"]),        # preempted: re-created
    ("READY\tv5p-8", ["delete", "create"]),             # another type: re-created as asked
])
def test_tpu_pod_reuses_creates_or_recreates_the_slice(tmp_path, state, expect):
    stubs = tmp_path / "bin"
    # describe answers with the slice's state; the run over ssh fails with status 3 (returned by the launcher)
    _stub(stubs, "gcloud", f'if [[ "$4" == describe ]]; then [[ -n "{state}" ]] && printf "{state}\\n" && exit 0; '
                           f'exit 1; fi\nif [[ "$4" == ssh && "$*" == *PERSGUARD_DISTRIBUTED* ]]; then exit 3; fi\nexit 0')
    result = _run(TPU + ["--logs", str(tmp_path / "logs"), "--", "persguard", "purify", "--images", "a", "--out", "b"],
                  tmp_path, stubs)
    assert result.returncode == 3, result.stderr
    calls = [line.split() for line in (stubs / "calls.txt").read_text().splitlines()]
    verbs = [c[4] for c in calls]
    assert verbs == ["describe", *expect, "scp", "ssh", "ssh", "scp"], verbs
    run = " ".join(calls[-2])
    assert "persguard purify" in run and "--resume" not in run  # purify has nothing to resume
    assert len(list((tmp_path / "logs" / "pg-pod").glob("*.log"))) == 1


def test_tpu_pod_refuses_bad_usage_in_one_line(tmp_path):
    for args in ([str(LAUNCH / "tpu_pod.sh"), "--zone", "z", "--", "true"], TPU, TPU[:1] + ["--bogus"],
                 [str(LAUNCH / "tpu_pod.sh"), "--name", "Bad_Name", "--zone", "z", "--accelerator", "v4-8", "--",
                  "true"]):
        result = _run(args, tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "error:" in result.stderr, result.stderr


def test_slurm_dry_run_one_process_per_gpu_and_per_node(tmp_path):
    script = str(LAUNCH / "slurm_gpu.sbatch")
    per_gpu = _run(["bash", script, "--dry-run", "--nodes", "2", "--", *COMMAND], tmp_path)
    assert per_gpu.returncode == 0, per_gpu.stderr
    srun = [c for c in _commands(per_gpu.stdout) if c[0] == "srun"][0]
    assert "--nodes=2" in srun and "--ntasks-per-node=8" in srun and "--gpus-per-node=8" in srun
    assert "PERSGUARD_DISTRIBUTED=auto" in srun and srun[-len(COMMAND) - 1:] == [*COMMAND, "--resume"]
    assert not any("JAX_COORDINATOR_ADDRESS" in w for w in srun)  # jax's SLURM detection gives each task its GPU

    per_node = _run(["bash", script, "--dry-run", "--per-node", "--nodes", "4", "--gpus-per-node", "4", "--",
                     *COMMAND, "--overwrite"], tmp_path)
    srun = [c for c in _commands(per_node.stdout) if c[0] == "srun"][0]
    assert "--ntasks-per-node=1" in srun and "--gpus-per-node=4" in srun and "JAX_NUM_PROCESSES=4" in srun
    assert any(w.startswith("JAX_COORDINATOR_ADDRESS=") for w in srun)
    assert any("JAX_PROCESS_ID=$SLURM_PROCID" in w for w in srun)
    assert srun[-1] == "--overwrite" and "--resume" not in srun
    assert not (tmp_path / "logs").exists()

    outside = _run(["bash", script, "--", *COMMAND], tmp_path)
    assert outside.returncode == 2 and "not inside a SLURM allocation" in outside.stderr


def test_multinode_dry_run(tmp_path):
    result = _run([str(LAUNCH / "multinode.sh"), "--hosts", "gpu1,gpu2", "--gpus-per-host", "2", "--dir", "/fs/pg",
                   "--dry-run", "--", *COMMAND], tmp_path)
    assert result.returncode == 0, result.stderr
    ssh = [c for c in _commands(result.stdout) if c[0] == "ssh"]
    assert [c[-2] for c in ssh] == ["gpu1", "gpu1", "gpu2", "gpu2"]
    for i, c in enumerate(ssh):
        assert f"JAX_PROCESS_ID={i}" in c[-1] and "JAX_NUM_PROCESSES=4" in c[-1]
        assert "JAX_COORDINATOR_ADDRESS=gpu1:12355" in c[-1] and f"CUDA_VISIBLE_DEVICES={i % 2}" in c[-1]
        assert c[-1].startswith("cd /fs/pg &&") and c[-1].endswith("--resume")
    assert not (tmp_path / "logs").exists()


def test_multinode_runs_two_cpu_processes(tmp_path):
    """A real 2-process jax run through launch/multinode.sh, ssh replaced by a local bash."""
    stubs = tmp_path / "bin"
    _stub(stubs, "ssh", 'exec bash -c "${@: -1}"')
    probe = ("from persguard_jax.train.distributed import initialize; initialize(); import jax; "
             "print('process', jax.process_index(), 'of', jax.process_count(), 'devices', jax.device_count())")
    result = _run([str(LAUNCH / "multinode.sh"), "--hosts", "localhost,localhost", "--dir", str(REPO),
                   "--port", str(_free_port()), "--logs", str(tmp_path / "logs"), "--", sys.executable, "-c", probe],
                  tmp_path, stubs, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = sorted((tmp_path / "logs").glob("*/process-*.log"))
    text = [p.read_text() for p in logs]
    assert result.returncode == 0, result.stderr + "".join(text)
    assert len(logs) == 2
    for i, t in enumerate(text):
        assert f"process {i} of 2 devices 2" in t, t


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resumable_list_matches_the_workflows():
    from persguard_jax.cli import WORKFLOWS
    text = (LAUNCH / "common.sh").read_text()
    listed = text.split("RESUMABLE_WORKFLOWS=(")[1].split(")")[0].split()
    assert sorted(listed) == sorted(w.name for w in WORKFLOWS() if w.resumable)


@pytest.mark.parametrize("args, expect", [
    (["-n", "2", "--", "no-such-persguard-tool", "plan"], "no-such-persguard-tool: no such command"),
    (["-n", "0", "--", "true"], "must be at least 1"),
    (["-n", "2"], "give the command after --"),
    (["-n", "1", "--", "{tmp}/notes.txt"], "notes.txt: cannot run: Exec format error"),  # executable, not a program
])
def test_local_launcher_refuses_bad_usage_in_one_line(tmp_path, args, expect):
    """A command that is not there fails once, before any process starts: no traceback from each of them, and no
    usage dump: one line."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a program\n")
    notes.chmod(notes.stat().st_mode | stat.S_IXUSR)
    r = _run([sys.executable, str(LAUNCH / "local.py"), *(a.format(tmp=tmp_path) for a in args)], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
