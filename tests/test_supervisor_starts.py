"""The supervisor's first start: Triton refusing the repository fails at once (exit 2, its log
says why), a Triton killed by a signal while starting is retried (a crash, not a refusal)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from colln.errors import ServeError
from colln.serve.supervisor import _supervise


class FakeSupervisor:
    """Starts fail with the given exit codes, then succeed; the served run ends cleanly."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.starts = 0
        self.names = ["m"]
        self.ready = False
        self.triton = SimpleNamespace(proc=None, stop=lambda grace_s=None: None)

    async def start(self, session, guard) -> str | None:
        self.starts += 1
        if self.codes:
            code = self.codes.pop(0)
            self.triton.proc = SimpleNamespace(returncode=code)
            return f"Triton exited with code {code} while starting"
        self.triton.proc = SimpleNamespace(returncode=None)
        return None

    async def watch(self, session, stopping) -> str | None:
        return None


def supervise(supervisor: FakeSupervisor) -> None:
    async def go() -> None:
        await _supervise(supervisor, None, None, asyncio.Event(), "127.0.0.1", (1, 2, 3))

    asyncio.run(go())


def test_a_refused_first_start_fails_at_once() -> None:
    supervisor = FakeSupervisor([1])
    with pytest.raises(ServeError, match="exited with code 1 while starting"):
        supervise(supervisor)
    assert supervisor.starts == 1


def test_a_crash_while_starting_is_retried(capsys: pytest.CaptureFixture) -> None:
    supervisor = FakeSupervisor([-6])
    supervise(supervisor)
    assert supervisor.starts == 2
    assert "exited with code -6 while starting; retrying (1 of" in capsys.readouterr().err


def test_a_crash_then_a_refusal_fails() -> None:
    supervisor = FakeSupervisor([-6, 1])
    with pytest.raises(ServeError, match="exited with code 1 while starting"):
        supervise(supervisor)
    assert supervisor.starts == 2
