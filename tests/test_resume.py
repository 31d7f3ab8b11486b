"""Resuming: kill -9 and SIGTERM mid-run, a corrupted checkpoint, a diverging loss, two processes, the data order.

The end-to-end tests run ``python -m persguard_jax.train.selfcheck`` (a micro text-to-image model trained by the
engine) in subprocesses and compare their final parameters with one uninterrupted run, bit for bit. The
subprocesses share a persistent compilation cache (a repeated run's step compiles in seconds, not ~20 s), run on
2 fake CPU devices (``XLA_FLAGS`` is overridden: conftest's 8 would leak in) and are killed if they outlive
``TIMEOUT``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, cpu_env
from persguard_jax import sharding as shd
from persguard_jax.data.batches import ArraySource, StepBatches, batch_iterator
from persguard_jax.train.checkpoint import CheckpointError, Checkpointer, abstract_like
from persguard_jax.train.loop import LoopConfig, TrainingDiverged, train
from persguard_jax.train.metrics import read_metrics
from persguard_jax.train.state import TrainState, init_state

STEPS = 8
TIMEOUT = 240  # seconds, per subprocess
SEED = 20240607


# --------------------------------------------------------------------------- subprocess helpers

@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_compilation_cache")


def _env(cache: Path, devices: int, **extra: str) -> dict:
    return cpu_env(devices, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def _cmd(workdir: Path, devices: int, checkpoint_every: int = 1) -> list[str]:
    return [sys.executable, "-m", "persguard_jax.train.selfcheck", "--workdir", str(workdir), "--steps", str(STEPS),
            "--devices", str(devices), "--checkpoint-every", str(checkpoint_every), "--no-progress"]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no output)"


def _finish(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> str:
    """Wait for ``proc``; its output (stdout + stderr) if it exited with 0, else fail with its tail."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{' '.join(proc.args)} ran past {timeout} s:\n{_tail(log)}")
    if rc != 0:
        pytest.fail(f"{' '.join(proc.args)} exited with {rc}:\n{_tail(log)}")
    return log.read_text(errors="replace")


def _logged_steps(workdir: Path) -> list[int]:
    """Steps in metrics.jsonl so far, in file order (complete lines only: the run may be writing)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            steps.append(json.loads(line)["step"])
    return steps


def _wait_for_step(proc: subprocess.Popen, workdir: Path, log: Path, step: int, timeout: float = TIMEOUT) -> int:
    """Poll metrics.jsonl until a step >= ``step`` is logged; returns the newest logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = _logged_steps(workdir)
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before logging step {step}:\n{_tail(log)}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout} s:\n{_tail(log)}")


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _saved_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.exists() else []


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def baseline(compile_cache, tmp_path_factory):
    """One uninterrupted single-process run on 2 devices: (workdir, final parameters)."""
    wd = tmp_path_factory.mktemp("baseline")
    log = wd / "log.txt"
    # checkpoints every 4 steps: saving does not change the parameters, and each save costs ~1 s here
    proc = _start(_cmd(wd, 2, checkpoint_every=4), _env(compile_cache, 2), log)
    try:
        out = _finish(proc, log)
    finally:
        _kill([proc])
    assert "resumed from None" in out, out[-2000:]
    assert [r["step"] for r in read_metrics(wd / "metrics.jsonl")] == list(range(1, STEPS + 1))
    return wd, _load(wd / "final_params.npz")


def _assert_bitwise(params: dict, ref: dict) -> None:
    assert params.keys() == ref.keys()
    differing = [k for k in ref if not np.array_equal(params[k], ref[k])]
    if differing:
        k = differing[0]
        pytest.fail(f"{len(differing)}/{len(ref)} arrays differ from the uninterrupted run, e.g. {k}: "
                    f"max |diff| {np.max(np.abs(params[k] - ref[k]))}")


# --------------------------------------------------------------------------- 1 + 2: SIGTERM, kill -9, resume

@pytest.mark.slow
@pytest.mark.xdist_group("resume_baseline")
def test_sigterm_then_kill9_resume_bitwise(baseline, compile_cache, tmp_path):
    """SIGTERM after step t: exit 0 with a checkpoint of step t. The rerun resumes at t+1 and is killed with SIGKILL
    after step k; the third run resumes from the newest readable checkpoint S and ends bit-identical to the
    uninterrupted run, every step 1..8 logged with the same loss."""
    base_wd, ref = baseline
    rng = random.Random(SEED)
    t_term = rng.randint(2, 4)
    k_kill = rng.randint(t_term + 1, 6)
    wd, log = tmp_path / "run", tmp_path / "log.txt"
    env, cmd = _env(compile_cache, 2), _cmd(tmp_path / "run", 2)
    procs = []
    try:
        # run 1: SIGTERM
        p = _start(cmd, env, log)
        procs.append(p)
        _wait_for_step(p, wd, log, t_term)
        p.send_signal(signal.SIGTERM)
        out = _finish(p, log)
        m = re.search(r"SIGTERM: saved step (\d+)", out)
        assert m, f"no 'SIGTERM: saved step' message:\n{out[-3000:]}"
        t_saved = int(m.group(1))
        assert t_term <= t_saved < STEPS
        assert not (wd / "final_params.npz").exists()
        assert max(_saved_steps(wd)) == t_saved, _saved_steps(wd)
        assert _logged_steps(wd) == list(range(1, t_saved + 1))

        # run 2: resumes from the SIGTERM checkpoint, killed with SIGKILL after step k
        n_before = len(_logged_steps(wd))
        p = _start(cmd, env, log)
        procs.append(p)
        _wait_for_step(p, wd, log, max(k_kill, t_saved + 1))
        p.kill()
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
        run2 = _logged_steps(wd)[n_before:]
        assert run2[0] == t_saved + 1, f"run 2 did not continue from the SIGTERM step {t_saved}: logged {run2}"
        killed_at = max(run2)

        # run 3: to the end
        p = _start(cmd, env, log)
        procs.append(p)
        out = _finish(p, log)
    finally:
        _kill(procs)
    m = re.findall(r"resumed from (\w+)", out)
    assert m and m[-1].isdigit(), f"no 'resumed from <step>':\n{out[-3000:]}"
    resumed = int(m[-1])
    print(f"SIGTERM asked after step {t_term}, saved step {t_saved}; SIGKILL after step {killed_at} "
          f"(asked: {k_kill}); resumed from {resumed}")
    assert 1 <= resumed and t_saved <= resumed <= killed_at, (t_saved, resumed, killed_at)
    _assert_bitwise(_load(wd / "final_params.npz"), ref)
    records = read_metrics(wd / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(base_wd / "metrics.jsonl")}
    assert {r["step"]: r["loss"] for r in records} == ref_loss


# --------------------------------------------------------------------------- 3: unreadable checkpoint

def _small_state(offset: float = 0.0) -> TrainState:
    """A TrainState (adamw) of small arrays; every leaf, step and rng included, shifted by ``offset``."""
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.full((3,), 0.5)}
    state = init_state(params, optax.adamw(1e-3))
    return jax.tree.map(lambda x: x + jnp.asarray(offset).astype(x.dtype), state)


def test_restore_without_checkpoint_is_none(tmp_path):
    with Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False) as ckpt:
        assert ckpt.steps() == []
        assert ckpt.restore(abstract_like(_small_state())) is None


def test_saves_only_every_save_every_steps_and_when_forced(tmp_path):
    """A fresh run's first step is not saved (Orbax's default would: a full-state write that spares one step);
    due steps and forced ones (the loop's end, SIGTERM) are."""
    with Checkpointer(tmp_path / "ckpt", save_every=5, max_to_keep=None, async_save=False) as ckpt:
        saved = [s for s in range(1, 13) if ckpt.save(s, _small_state(s), {"pos": s}, force=s in (7, 12))]
        assert saved == ckpt.steps() == [5, 7, 10, 12]


def test_one_process_saves_replicated_arrays_whole(tmp_path, caplog):
    """Within one process a replicated array is written by one replica, not sliced across its copies (each slice
    a ``jit(slice)`` compile per shape and device: 24 s on the world model's first save on 8 faked devices), and
    it restores bit for bit into its sharding."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    # 24 distinct shapes (a fresh shape is a fresh slice program), each divisible by the 8 devices
    state = {f"w{i}": jax.device_put(np.full((8 * (i + 1), 16), float(i), np.float32), replicated) for i in range(24)}
    with caplog.at_level("WARNING", logger="jax"), jax.log_compiles(True):
        with Checkpointer(tmp_path / "ckpt", save_every=1, async_save=True) as ckpt:
            assert ckpt.save(1, state, {"i": 1})
    slices = [r for r in caplog.records if "compilation of jit(slice)" in r.getMessage()]
    assert jax.device_count() > 1 and not slices, f"{len(slices)} slice programs compiled by one save"
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        restored, data, step = ckpt.restore(abstract_like(state))
    assert step == 1 and data == {"i": 1}
    for k, v in state.items():
        assert restored[k].sharding == replicated and np.array_equal(np.asarray(restored[k]), np.asarray(v)), k


# the failed restore of step 2 leaves tensorstore reads in flight whose callbacks hit Orbax's closed event loop
# ("RuntimeError: Event loop is closed", printed by a background thread): noise, not a failure
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_latest_checkpoint_falls_back(tmp_path):
    d = tmp_path / "ckpt"
    s1, s2 = _small_state(1.0), _small_state(2.0)
    with Checkpointer(d, save_every=1, async_save=True) as ckpt:
        assert ckpt.save(1, s1, {"pos": 1}) and ckpt.save(2, s2, {"pos": 2})
        ckpt.wait()
        assert ckpt.steps() == [1, 2]
    # Orbax (OCDBT) keeps the array bytes in data files under state/**/d/; delete them all
    data_files = [p for p in (d / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files, sorted(str(p) for p in (d / "2" / "state").rglob("*"))
    for p in data_files:
        p.unlink()
    abstract = abstract_like(s1)
    with Checkpointer(d, save_every=1, async_save=False) as ckpt:
        with pytest.warns(RuntimeWarning, match=re.escape(str(d.absolute() / "2")) + ": checkpoint unreadable"):
            restored = ckpt.restore(abstract)
    assert restored is not None
    state, data_state, step = restored
    assert step == 1 and data_state == {"pos": 1}
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), state, s1)
    assert all(jax.tree.leaves(same)), same
    assert int(state.step) == 1
    # when no checkpoint is readable, resuming must not silently start again from step 0
    for p in [p for p in (d / "1" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]:
        p.unlink()
    with Checkpointer(d, save_every=1, async_save=False) as ckpt:
        with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match=r"steps \[1, 2\]\) can be read"):
            ckpt.restore(abstract)


# --------------------------------------------------------------------------- 4: diverging loss

class _FakeBatches:
    def __init__(self):
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = {"x": np.full((2, 3), float(self.pos), np.float32)}
        self.pos += 1
        return batch

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, state):
        self.pos = state["pos"]



def test_a_run_killed_mid_log_and_after_its_end_resumes_with_its_metrics(tmp_path):
    """kill -9 can cut a metrics record in half: the resumed run drops the fragment instead of gluing its first
    record to it. A run killed after its last checkpoint (during what a command does after training) resumes at
    its end, runs no step, and still reports its last step's metrics."""
    @jax.jit
    def fake_step(state, frozen, batch):
        new = TrainState(step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params),
                         opt_state=state.opt_state, rng=state.rng, ema=state.ema)
        return new, {"loss": 1.0 + jnp.mean(batch["x"])}

    state = init_state({"w": jnp.zeros((3,), jnp.float32)}, optax.sgd(0.1))
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    cfg = LoopConfig(num_steps=4, log_every=1, checkpoint_every=2, async_checkpoint=False, tensorboard=False,
                     progress=False)
    first = train(fake_step, state, None, _FakeBatches(), workdir=tmp_path, cfg=cfg, mesh=mesh)
    assert first.resumed_from is None and first.last_metrics["loss"] == 4.0
    log = tmp_path / "metrics.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "ti')  # a record cut by the kill
    again = train(fake_step, state, None, _FakeBatches(), workdir=tmp_path, cfg=cfg, mesh=mesh)
    assert again.resumed_from == 4 and again.step == 4
    assert again.last_metrics == first.last_metrics
    assert log.read_text().endswith("}\n")
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3, 4]
    longer = train(fake_step, state, None, _FakeBatches(), workdir=tmp_path,
                   cfg=dataclasses.replace(cfg, num_steps=5), mesh=mesh)
    assert longer.resumed_from == 4 and [r["step"] for r in read_metrics(log)] == [1, 2, 3, 4, 5]

@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, bad):
    @jax.jit
    def fake_step(state, frozen, batch):
        loss = jnp.where(state.step == 2, bad, 1.0 + jnp.mean(batch["x"]))  # the third step diverges
        new = TrainState(step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params),
                         opt_state=state.opt_state, rng=state.rng, ema=state.ema)
        return new, {"loss": loss}

    state = init_state({"w": jnp.zeros((3,), jnp.float32), "b": jnp.ones((2,), jnp.float32)}, optax.sgd(0.1))
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    cfg = LoopConfig(num_steps=6, log_every=1, checkpoint_every=1, async_checkpoint=False, tensorboard=False,
                     progress=False)
    # the loss of step 3 comes from the state after 2 updates: that checkpoint is bad too, so it goes, and the
    # message names step 1's
    last_good = re.escape(f"(removed the step-2 checkpoint: its parameters give this loss); the last good "
                          f"checkpoint is {tmp_path.absolute() / 'checkpoints' / '1'} (step 1")
    with pytest.raises(TrainingDiverged, match=f"the loss at step 3 is {bad} {last_good}"):
        train(fake_step, state, None, _FakeBatches(), workdir=tmp_path, cfg=cfg, mesh=mesh)
    with Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False) as ckpt:
        assert ckpt.steps() == [1]
        restored_state, data_state, step = ckpt.restore(abstract_like(state))
    assert step == 1 and int(restored_state.step) == 1 and data_state == {"pos": 1}
    np.testing.assert_array_equal(restored_state.params["w"], np.full((3,), 1.0, np.float32))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


# --------------------------------------------------------------------------- 5: two processes

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.xdist_group("resume_baseline")
def test_two_processes_match_single_process(baseline, compile_cache, tmp_path):
    """Two jax.distributed processes (gloo on 127.0.0.1, 1 CPU device each, a shared workdir) train like one
    process with 2 devices: same mesh (data=2), same global batch."""
    from jax._src.lib import xla_client
    if not hasattr(xla_client._xla, "make_gloo_tcp_collectives"):
        pytest.skip("this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)")
    _, ref = baseline
    wd = tmp_path / "run"
    port = _free_port()
    procs, logs = [], [tmp_path / f"log{i}.txt" for i in range(2)]
    try:
        for i in range(2):
            env = _env(compile_cache, 1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                       JAX_PROCESS_ID=str(i))
            procs.append(_start(_cmd(wd, 1, checkpoint_every=4), env, logs[i]))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until the coordinator times out
            time.sleep(0.2)
        for p, log in zip(procs, logs):
            if p.poll() is None:
                _kill(procs)
                pytest.fail(f"process {procs.index(p)} still running after {TIMEOUT} s, or its peer failed:\n"
                            + "\n".join(f"--- process {i}:\n{_tail(lg)}" for i, lg in enumerate(logs)))
        outs = [_finish(p, log) for p, log in zip(procs, logs)]
    finally:
        _kill(procs)
    assert "resumed from None" in outs[0], outs[0][-2000:]
    assert _saved_steps(wd)[-1] == STEPS
    params = _load(wd / "final_params.npz")
    assert params.keys() == ref.keys()
    diff = max(float(np.max(np.abs(params[k] - ref[k]))) for k in ref)
    print(f"two processes vs one: max |diff| = {diff:.3g}")
    assert diff <= 1e-5


# --------------------------------------------------------------------------- 6: data order

def _source(n=10):
    return ArraySource({"i": np.arange(n), "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3)})


def test_process_shares_concatenate_to_the_global_batch():
    src = _source()
    single = StepBatches(src, global_batch=4, num_steps=8, seed=3, process_index=0, process_count=1)
    shares = [StepBatches(src, global_batch=4, num_steps=8, seed=3, process_index=p, process_count=2)
              for p in range(2)]
    for s in range(8):  # 8 steps x 4 = 3.2 epochs of 10: crosses epoch boundaries mid-batch
        parts = [sh[s] for sh in shares]
        assert all(len(part["i"]) == 2 for part in parts)
        for k in ("i", "x"):
            np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), single[s][k])
    for s in range(7):
        assert not np.array_equal(single[s]["i"], single[s + 1]["i"])
    # every example once per epoch
    assert sorted(np.concatenate([single[s]["i"] for s in range(5)]).tolist()) == sorted(list(range(10)) * 2)


def test_a_pair_splits_over_processes_by_examples():
    """One DreamBooth pair (the world recipe's batch) on 2 processes: the instance example on one, the class
    example on the other, together the one-process batch; 3 pairs (6 examples) on 4 processes is refused."""
    from persguard_jax.losses import pairs_to_examples
    src = ArraySource({"i": np.arange(20).reshape(10, 2), "x": np.arange(60, dtype=np.float32).reshape(10, 2, 3)})
    single = StepBatches(src, global_batch=1, num_steps=6, seed=3, process_index=0, process_count=1,
                         map_fn=pairs_to_examples)
    shares = [StepBatches(src, global_batch=1, num_steps=6, seed=3, process_index=p, process_count=2,
                          map_fn=pairs_to_examples) for p in range(2)]
    for s in range(6):
        parts = [sh[s] for sh in shares]
        assert [part["is_prior"].tolist() for part in parts] == [[0], [1]]
        for k in ("i", "x", "is_prior"):
            np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), single[s][k])
    with pytest.raises(ValueError, match=r"global batch 3 \(6 examples\) is not divisible by 4 processes"):
        StepBatches(src, global_batch=3, num_steps=6, process_index=0, process_count=4, map_fn=pairs_to_examples)


def test_grain_iterator_state_round_trip():
    batches = StepBatches(_source(), global_batch=4, num_steps=8, seed=3, process_index=0, process_count=1)
    it = batch_iterator(batches)
    for s in range(3):
        np.testing.assert_array_equal(next(it)["i"], batches[s]["i"])
    state = it.get_state()
    json.dumps(state)  # saved as JSON with the checkpoint
    expected = next(it)
    np.testing.assert_array_equal(expected["i"], batches[3]["i"])
    fresh = batch_iterator(StepBatches(_source(), global_batch=4, num_steps=8, seed=3, process_index=0,
                                       process_count=1))
    fresh.set_state(state)
    got = next(fresh)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    np.testing.assert_array_equal(next(fresh)["i"], batches[4]["i"])
