"""Supervising a stack of `lodestar` processes: spawn each with its own log file, watch for deaths,
wait for readiness, stop them all in order.

Used by `lodestar up` and the end-to-end tests. It knows nothing about what the processes are: the
caller passes command lines and readiness probes. Children run in their own session, so a Ctrl-C in
the terminal reaches only the supervisor, which then stops them in order; on Linux each child also
gets SIGTERM if the supervisor dies without cleaning up (PR_SET_PDEATHSIG). Spawn from the thread that
lives as long as the stack (the main thread): the death signal follows the spawning thread.

    with Stack(Path(".run/up")) as stack:
        stack.start(ProcessSpec("emulator-h100-0", ["lodestar", "emulator", ...], group="emulators"))
        await stack.wait_ready(probe, timeout_s=60, what="emulators")
    # leaving the block stops every process still running: last group first, SIGTERM then SIGKILL
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

_PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 25


class StackError(RuntimeError):
    """A process of the stack died unexpectedly, or the stack did not become ready in time."""


@dataclass(frozen=True)
class ProcessSpec:
    """A process to run: its name (also its log file's), command line, extra environment and the group
    it stops with (groups stop in reverse order of their first start)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    group: str = ""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Process:
    """One running child and its log file."""

    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen[bytes], log_path: Path, log_file: IO[bytes]):
        self.spec = spec
        self.popen = popen
        self.log_path = log_path
        self._log_file = log_file
        self.stopping = False  # set when the supervisor stops it: its exit is then expected

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def returncode(self) -> int | None:
        """The exit status, or None while it runs (negative: killed by that signal)."""
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send `sig` unless the process has already exited."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> int | None:
        """Wait for the exit status; None if it is still running after `timeout_s`."""
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close_log(self) -> None:
        self._log_file.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of its log file."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Stack:
    """The processes of one stack, stopped together (use as a context manager)."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, *, die_with_parent: bool = True,
                 group_env: Mapping[str, Mapping[str, str]] | None = None):
        """`env` is added to every process's environment, `group_env[group]` to that group's (e.g. each
        service's own Kafka principal), a spec's own `env` last."""
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.group_env = {group: dict(values) for group, values in (group_env or {}).items()}
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self._processes: dict[str, Process] = {}
        self._groups: list[str] = []  # in order of first start

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    @property
    def processes(self) -> list[Process]:
        """Every process started and not replaced, in start order."""
        return list(self._processes.values())

    def __getitem__(self, name: str) -> Process:
        return self._processes[name]

    def start(self, spec: ProcessSpec) -> Process:
        """Spawn `spec` with stdout and stderr appended to `<log_dir>/<name>.log`.

        A name may be started again once its previous process has exited (e.g. a restart)."""
        old = self._processes.get(spec.name)
        if old is not None and old.returncode() is None:
            raise StackError(f"{spec.name} is already running (pid {old.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed when the process is stopped
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **self.group_env.get(spec.group, {}), **spec.env},
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509 - prctl only
        )
        self._processes[spec.name] = Process(spec, popen, log_path, log_file)
        if spec.group not in self._groups:
            self._groups.append(spec.group)
        return self._processes[spec.name]

    def check(self) -> None:
        """Raise StackError, with its log tail, if a process exited without being stopped."""
        for proc in self._processes.values():
            rc = proc.returncode()
            if rc is not None and not proc.stopping:
                raise StackError(
                    f"{proc.name} (pid {proc.pid}) exited with status {rc}; last lines of {proc.log_path}:\n"
                    f"{proc.log_tail()}"
                )

    async def wait_ready(
        self, probe: Callable[[], Awaitable[bool]], timeout_s: float, what: str, poll_s: float = 0.25
    ) -> None:
        """Poll `probe` until it is true; StackError if a process dies first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            if await probe():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready within {timeout_s:g} s (logs in {self.log_dir})")
            await asyncio.sleep(poll_s)

    def kill(self, name: str) -> int:
        """SIGKILL one process (a crash, for tests) and reap it; returns its exit status."""
        proc = self._processes[name]
        proc.stopping = True
        proc.signal(signal.SIGKILL)
        rc = proc.popen.wait()
        proc.close_log()
        return rc

    def stop(self, names: Sequence[str], timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM these processes at once, wait up to `timeout_s`, SIGKILL any left; their exit statuses."""
        procs = [self._processes[n] for n in names]
        for proc in procs:
            proc.stopping = True
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        statuses: dict[str, int] = {}
        for proc in procs:
            rc = proc.wait(max(deadline - time.monotonic(), 0.0))
            if rc is None:
                proc.signal(signal.SIGKILL)
                rc = proc.popen.wait()
            proc.close_log()
            statuses[proc.name] = rc
        return statuses

    def stop_group(self, group: str, timeout_s: float = 20.0) -> dict[str, int]:
        """Stop every running process of one group."""
        names = [p.name for p in self._processes.values() if p.spec.group == group and p.returncode() is None]
        return self.stop(names, timeout_s)

    def stop_all(self, timeout_s: float = 20.0) -> dict[str, int]:
        """Stop everything still running, one group at a time, the last started group first."""
        statuses: dict[str, int] = {}
        for group in reversed(self._groups):
            statuses.update(self.stop_group(group, timeout_s))
        for proc in self._processes.values():  # logs of processes that had exited by themselves
            proc.close_log()
        return statuses
