"""The process supervisor: log files, unexpected deaths, stop order, SIGKILL, restarts."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from app.stack import ProcessSpec, Stack, StackError

PY = sys.executable


def sleeper(name: str, group: str, trap_term_log: Path | None = None) -> ProcessSpec:
    """A child that prints, then sleeps; with `trap_term_log` it appends its name there on SIGTERM."""
    code = "import signal, sys, time\n"
    if trap_term_log is not None:
        code += (f"def term(*_):\n    open({str(trap_term_log)!r}, 'a').write({name!r} + '\\n'); sys.exit(0)\n"
                 "signal.signal(signal.SIGTERM, term)\n")
    code += f"print('hello from {name}', flush=True)\ntime.sleep(60)\n"
    return ProcessSpec(name, [PY, "-c", code], group=group)


def test_stop_all_stops_groups_in_reverse_start_order_and_logs_each_process(tmp_path: Path) -> None:
    order = tmp_path / "order.txt"
    with Stack(tmp_path / "logs") as stack:
        stack.start(sleeper("engine", "engines", order))
        stack.start(sleeper("worker", "workers", order))
        stack.start(sleeper("router", "routers", order))
        asyncio.run(stack.wait_ready(_logs_contain(tmp_path / "logs", "hello", 3), 20, "children"))
    assert order.read_text().split() == ["router", "worker", "engine"]
    assert all(p.returncode() == 0 for p in stack.processes)
    assert (tmp_path / "logs" / "worker.log").read_text() == "hello from worker\n"


def _logs_contain(log_dir: Path, text: str, n: int) -> Callable[[], Awaitable[bool]]:
    """A readiness probe: `n` log files in `log_dir` contain `text`."""
    async def probe() -> bool:
        return sum(text in p.read_text() for p in log_dir.glob("*.log")) == n
    return probe


def test_a_process_that_dies_unexpectedly_fails_the_wait_with_its_log_tail(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start(ProcessSpec("crasher", [PY, "-c", "print('bad config: port taken'); raise SystemExit(3)"]))

        async def never() -> bool:
            return False

        with pytest.raises(StackError, match=r"(?s)crasher .* exited with status 3.*bad config: port taken"):
            asyncio.run(stack.wait_ready(never, 20, "crasher"))


def test_wait_ready_times_out_with_what_it_waited_for(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start(sleeper("idle", "g"))

        async def never() -> bool:
            return False

        with pytest.raises(StackError, match="the moon not ready within 0.3 s"):
            asyncio.run(stack.wait_ready(never, 0.3, "the moon", poll_s=0.05))


def test_kill_is_a_sigkill_that_check_accepts_and_the_name_can_be_started_again(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        stack.start(sleeper("victim", "g"))
        with pytest.raises(StackError, match="already running"):
            stack.start(sleeper("victim", "g"))
        assert stack.kill("victim") == -signal.SIGKILL
        stack.check()  # an intended death is not a failure
        again = stack.start(sleeper("victim", "g"))
        assert again.returncode() is None and stack["victim"] is again
    assert again.returncode() is not None


def test_a_child_ignoring_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    stubborn = ProcessSpec("stubborn", [PY, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                        "print('ready', flush=True)\ntime.sleep(60)"])
    with Stack(tmp_path) as stack:
        stack.start(stubborn)
        asyncio.run(stack.wait_ready(_logs_contain(tmp_path, "ready", 1), 20, "stubborn"))
        assert stack.stop(["stubborn"], timeout_s=0.5) == {"stubborn": -signal.SIGKILL}



def test_environment_layers_stack_then_group_then_spec(tmp_path: Path) -> None:
    code = "import os, time; print(os.environ['A'], os.environ['B'], os.environ['C'], flush=True); time.sleep(30)"
    with Stack(tmp_path, env={"A": "stack", "B": "stack", "C": "stack"},
               group_env={"workers": {"B": "group", "C": "group"}}) as stack:
        stack.start(ProcessSpec("w", [PY, "-c", code], env={"C": "spec"}, group="workers"))
        stack.start(ProcessSpec("d", [PY, "-c", code], group="dispatchers"))
        asyncio.run(stack.wait_ready(_logs_contain(tmp_path, "stack", 2), 20, "children"))
    assert (tmp_path / "w.log").read_text().split() == ["stack", "group", "spec"]
    assert (tmp_path / "d.log").read_text().split() == ["stack", "stack", "stack"]
