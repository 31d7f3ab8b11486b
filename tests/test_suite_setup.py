"""The suite's own scheduling (Makefile, tests/conftest.py): tests marked with one ``xdist_group`` run on one
worker under ``--dist loadgroup`` (pytest 9.2 silently stopped that: pytest-xdist issue 1386), and the slow tests
are handed out first. Checked on a throwaway test folder, since the suite itself passes either way, only slower."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

HEADER = """
import os
import time

import pytest


def _log(name):
    time.sleep(0.2)  # both workers take work
    with open(os.environ["WORKER_LOG"], "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""
# grouped and plain tests interleaved, and the slow one last in the file
TESTS = HEADER + "".join(f"""
@pytest.mark.xdist_group("shared")
def test_grouped_{i}():
    _log("grouped_{i}")


def test_plain_{i}():
    _log("plain_{i}")
""" for i in range(4)) + """
@pytest.mark.slow
def test_late_but_slow():
    _log("slow")
"""


def test_loadgroup_keeps_a_group_on_one_worker_and_slow_tests_start_first(tmp_path):
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "test_probe.py").write_text(TESTS)
    (folder / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    log = tmp_path / "workers.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # this run may be a worker
    env["WORKER_LOG"] = str(log)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                        "-o", "markers=slow: first", str(folder)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = dict(line.split() for line in log.read_text().splitlines())
    assert len(ran) == 9
    assert len({ran[f"grouped_{i}"] for i in range(4)}) == 1, ran  # one worker would build the group's fixture
    assert len(set(ran.values())) == 2, ran  # and the other ran the rest
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-o", "markers=slow: first", str(folder)], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300).stdout.splitlines()
    assert collected[0].endswith("::test_late_but_slow"), collected
