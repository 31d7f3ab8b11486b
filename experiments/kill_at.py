"""kill -9 a command at a chosen moment, then check that every file it left under its final name loads.

    python experiments/kill_at.py --when t:30 --check runs/x -- persguard personalize ... --out runs/x
    python experiments/kill_at.py --when file:'runs/x/checkpoints/20' --check runs/x -- persguard ...
    python experiments/kill_at.py --when log:'ddim sampling' --check runs/x -- persguard ...

The command runs in its own session and the whole process group is killed with SIGKILL when the trigger fires:
``t:SECONDS`` after the start, ``file:GLOB`` once a path matches, ``log:REGEX`` once its output matches. Then every
JSON, YAML, PNG and safetensors file under ``--check`` (hidden names and checkpoints aside: Orbax's own) is opened
and read; each that fails is printed and the exit status is 1. Resume with the command's ``--resume`` and compare
with an uninterrupted run (README, "Runs, outputs and resuming", has what was checked this way).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def fired(when: str, started: float, log: Path) -> bool:
    kind, _, arg = when.partition(":")
    if kind == "t":
        return time.time() - started >= float(arg)
    if kind == "file":
        return bool(glob.glob(arg, recursive=True))
    if kind == "log":
        return re.search(arg, log.read_text(errors="replace")) is not None
    raise SystemExit(f"--when {when!r}: expected t:SECONDS, file:GLOB or log:REGEX")


def unreadable(folder: Path) -> list[str]:
    """Files under ``folder`` (hidden ones and checkpoints aside) that do not load as what their suffix says."""
    import yaml
    from PIL import Image
    from safetensors.numpy import load_file
    readers = {".json": lambda p: json.loads(p.read_text()), ".yaml": lambda p: yaml.safe_load(p.read_text()),
               ".png": lambda p: Image.open(p).load(), ".safetensors": load_file}
    bad = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if not path.is_file() or "checkpoints" in parts or any(q.startswith(".") for q in parts):
            continue
        read = readers.get(path.suffix)
        try:
            if read is not None:
                read(path)
        except Exception as e:  # noqa: BLE001: any failure to read is what this reports
            bad.append(f"{path}: {type(e).__name__}: {e}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--when", required=True, help="t:SECONDS | file:GLOB | log:REGEX")
    parser.add_argument("--check", type=Path, help="folder whose files must all load after the kill")
    parser.add_argument("--log", type=Path, default=Path("kill_at.log"), help="the command's output")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    started = time.time()
    with open(args.log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    killed = False
    while proc.poll() is None:
        if fired(args.when, started, args.log):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    print(f"{'killed' if killed else 'finished before the trigger'} after {time.time() - started:.1f} s")
    bad = unreadable(args.check) if args.check and args.check.is_dir() else []
    for line in bad:
        print("unreadable:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
