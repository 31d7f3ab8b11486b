"""Run one command as N jax processes on this machine (the local stand-in for a multi-host launch).

    python launch/local.py -n 2 --devices-per-process 1 -- \
        python -m persguard_jax.train.selfcheck --workdir /tmp/engine --steps 20

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
which ``persguard_jax.train.distributed.initialize()`` reads (CPU processes talk over gloo). Output lines are
prefixed with the process id. If one process fails, the others are stopped; the exit status is the first
non-zero one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


class _Parser(argparse.ArgumentParser):
    """Refusals as one line (the usage stays behind --help), exit status 2, as ``persguard``'s."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=None, help="fake CPU devices in each process")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --")
    if args.num_processes < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
        p.error("-n and --devices-per-process must be at least 1")
    if shutil.which(command[0]) is None:  # before any process starts: one line, not a traceback per process
        p.error(f"{command[0]}: no such command (not a file, not on PATH; a venv's tools are in its bin/)")
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(args.num_processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.num_processes),
                   JAX_PROCESS_ID=str(i))
        if args.devices_per_process:
            # replace only the device count: other XLA flags of the caller's environment still apply
            kept = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={args.devices_per_process}"])
        try:
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        except OSError as e:  # e.g. an executable that is not a program (Exec format error)
            for proc in procs:
                proc.terminate()
            p.error(f"{command[0]}: cannot run: {e.strerror or e}")
    threads = [threading.Thread(target=pump, args=(proc, f"[{i}] "), daemon=True) for i, proc in enumerate(procs)]
    for t in threads:
        t.start()
    status = 0
    try:
        pending = set(range(len(procs)))
        while pending:
            for i in list(pending):
                rc = procs[i].poll()
                if rc is None:
                    continue
                pending.discard(i)
                if rc and not status:
                    status = rc
                    for other in procs:  # one failed: the rest would wait on the coordinator forever
                        if other.poll() is None:
                            other.terminate()
            threading.Event().wait(0.2)
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        status = 130
    for t in threads:
        t.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
