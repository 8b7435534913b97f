#!/usr/bin/env python
"""Runs N cooperating JAX processes on this machine, as a multi-host job would run on N hosts.

    python launch/local_multiprocess.py -n 2 -k 4 -- \
        radsam train --config configs/train/example_cpu.py:runlocal --workdir /tmp/radsam_mp

Process i gets RADSAM_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port unless --port),
RADSAM_NUM_PROCESSES=N and RADSAM_PROCESS_ID=i, which `radsam train` passes to
`jax.distributed.initialize()`; with --platform cpu (the default) also JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=K, so the job has N x K CPU devices talking over
Gloo; with --platform gpu, JAX_LOCAL_DEVICE_IDS gives process i GPUs i*K .. i*K+K-1. The string
{process_id} in the command is replaced by i.

Output: every line of every process, prefixed "[pI]". When one process fails, the others are
stopped (SIGTERM, then SIGKILL after --grace seconds) and the launcher exits with the failed
process's code; Ctrl-C (or SIGTERM to the launcher) forwards SIGTERM, so a training run saves a
checkpoint and exits, and a second Ctrl-C kills at once. --timeout stops everything (exit 124).
Each process runs in its own process group (its children are stopped with it) and, on Linux, is
killed by the kernel if the launcher itself dies.
"""

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


CPU_COLLECTIVE_TIMEOUTS = ("xla_cpu_collective_timeout_seconds", "xla_cpu_collective_call_terminate_timeout_seconds")


def process_env(base: dict, *, process_id: int, num_processes: int, devices_per_process: int,
                coordinator: str, platform: str, collective_timeout: int = 600) -> dict:
    """The environment of process `process_id` (see the module docstring)."""
    env = dict(base)
    env["RADSAM_COORDINATOR_ADDRESS"] = coordinator
    env["RADSAM_NUM_PROCESSES"] = str(num_processes)
    env["RADSAM_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        # Gloo waits 30 s by default for the other processes to reach a collective: too short when
        # N processes compile at once on a few shared cores (one arrives minutes after the other).
        for flag in CPU_COLLECTIVE_TIMEOUTS:
            if flag not in env.get("XLA_FLAGS", ""):
                flags.append(f"--{flag}={collective_timeout}")
        env["XLA_FLAGS"] = " ".join(flags)
    elif platform == "gpu":
        first = process_id * devices_per_process
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(first + d) for d in range(devices_per_process))
    return env


def _child_setup():
    """In the child before exec: its own process group, and SIGKILL when the launcher dies (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class ProcessGroup:
    """The N children, their output pumps, and stopping them all."""

    def __init__(self, commands: Sequence[Sequence[str]], envs: Sequence[dict], out=sys.stdout):
        self.out = out
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        for i, (cmd, env) in enumerate(zip(commands, envs)):
            p = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
            self.procs.append(p)
            t = threading.Thread(target=self._pump, args=(i, p), daemon=True)
            t.start()
            self.pumps.append(t)
            self.log(f"process {i} started, pid {p.pid}")

    def log(self, text: str):
        with self.lock:
            self.out.write(f"[launcher] {text}\n")
            self.out.flush()

    def _pump(self, i: int, p: subprocess.Popen):
        for raw in iter(p.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self.lock:
                self.out.write(f"[p{i}] {line}\n")
                self.out.flush()
        p.stdout.close()

    def signal_all(self, sig: int):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def stop(self, grace: float):
        """SIGTERM every live process group, SIGKILL what is left after `grace` seconds."""
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):
            self.log("killing the processes still running")
            self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()
        for t in self.pumps:
            t.join(timeout=5)

    def wait(self, timeout: Optional[float], grace: float) -> int:
        """Waits for all to finish; stops all on the first failure or the timeout. The exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                self.log(f"process {i} exited with {code}; stopping the others")
                self.stop(grace)
                return code if code > 0 else 128 - code  # -SIG -> 128+SIG, as a shell reports it
            if all(c == 0 for c in codes):
                for t in self.pumps:
                    t.join(timeout=5)
                return 0
            if deadline is not None and time.monotonic() > deadline:
                self.log(f"timeout after {timeout:.0f} s; stopping all processes")
                self.stop(grace)
                return 124
            time.sleep(0.2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [-n N] [-k K] [options] -- COMMAND [ARGS ...]")
    parser.add_argument("-n", "--num_processes", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("-k", "--devices_per_process", type=int, default=4,
                        help="devices of each process: forced CPU devices, or GPUs with --platform gpu (default 4)")
    parser.add_argument("--platform", choices=("cpu", "gpu", "any"), default="cpu",
                        help="cpu: force K host devices per process; gpu: give each process K GPUs; any: leave as is")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL when stopping (default 30: time to checkpoint)")
    parser.add_argument("--collective_timeout", type=int, default=600,
                        help="cpu: seconds a process waits for the others in a collective (default 600; XLA's own: 30)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command every process runs, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("-n and -k must be >= 1")

    coordinator = f"127.0.0.1:{args.port or free_port()}"
    commands = [[a.replace("{process_id}", str(i)) for a in command] for i in range(args.num_processes)]
    envs = [process_env(os.environ, process_id=i, num_processes=args.num_processes,
                        devices_per_process=args.devices_per_process, coordinator=coordinator,
                        platform=args.platform, collective_timeout=args.collective_timeout)
            for i in range(args.num_processes)]
    print(f"[launcher] {args.num_processes} processes x {args.devices_per_process} {args.platform} devices, "
          f"coordinator {coordinator}", flush=True)

    # SIGTERM to the launcher behaves like Ctrl-C: forwarded, so the runs checkpoint and exit.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    group = None
    try:
        group = ProcessGroup(commands, envs)
        return group.wait(args.timeout, args.grace)
    except KeyboardInterrupt:
        if group is not None:
            group.log("interrupted: SIGTERM to all processes (again to kill)")
            try:
                group.stop(args.grace)
            except KeyboardInterrupt:
                group.signal_all(signal.SIGKILL)
                for p in group.procs:
                    p.wait()
        return 130
    finally:
        if group is not None and any(p.poll() is None for p in group.procs):
            group.signal_all(signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
