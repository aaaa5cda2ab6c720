"""Busy polling after session answers (api/polling.py): the loop keeps polling for the window, then sleeps.

The unit tests run ``BusyPoll`` on an asyncio loop whose selector records every timeout it is
asked to wait: while polling, the loop polls its sockets with a zero timeout turn after turn;
outside the window, or while the backend is busy, it waits (a timeout > 0). The last test runs a
real server and checks that polling stops: after a burst of session frames the idle server
spends almost no CPU.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import threading
import time

import numpy as np
import pytest

from synapse_client import SynapseClient
from synapse_serve.api.polling import BusyPoll
from synapse_serve.testing import ServerProcess


class RecordingSelector(selectors.DefaultSelector):
    """The loop's selector, recording (when, timeout) for every wait it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[float, float | None]] = []

    def select(self, timeout=None):
        self.waits.append((time.perf_counter(), timeout))
        return super().select(timeout)


def run_on_recording_loop(scenario) -> tuple[float, list[tuple[float, float | None]]]:
    """Run ``scenario()`` (a coroutine function returning its own start time) on a loop with a RecordingSelector."""
    selector = RecordingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        started = loop.run_until_complete(scenario())
    finally:
        loop.close()
    return started, selector.waits


def zero_waits(waits, after: float, before: float = float("inf")) -> int:
    return sum(1 for when, timeout in waits if timeout == 0 and after <= when < before)


def assert_polled_then_slept(waits, start: float, end: float, until: float) -> None:
    """Between ``start`` and ``end`` the loop only polled (turn after turn, never a wait with a timeout); from its
    first wait after ``end`` to ``until`` it never polled again. Counted in turns, not in turns per millisecond: a
    loaded machine gives the loop fewer of them, never a sleep in the window."""
    inside = [timeout for when, timeout in waits if start <= when < end]
    assert len(inside) >= 3 and all(timeout == 0 for timeout in inside), inside[:20]
    slept = [when for when, timeout in waits if when >= end and (timeout is None or timeout > 0)]
    assert slept, "the loop never slept after the window"
    assert zero_waits(waits, slept[0], until) == 0


def test_after_a_kick_the_loop_polls_with_a_zero_timeout_for_the_window_then_sleeps():
    window = 0.02

    async def scenario():
        poll = BusyPoll(window, busy=lambda: False)
        started = time.perf_counter()
        poll.kick()
        await asyncio.sleep(0.15)
        await poll.close()
        return started

    started, waits = run_on_recording_loop(scenario)
    assert_polled_then_slept(waits, started, started + window, started + 0.145)  # the window over: it stops
    assert any(timeout and timeout > 0.05 for when, timeout in waits if when > started + window)  # and it sleeps


def test_each_kick_starts_a_new_window():
    window = 0.02

    kicked = []

    async def scenario():
        poll = BusyPoll(window, busy=lambda: False)
        started = time.perf_counter()
        poll.kick()
        await asyncio.sleep(0.1)  # the first window ends, the loop sleeps
        kicked.append(time.perf_counter())  # when the sleep ended (late, on a loaded machine: measured from here)
        poll.kick()
        await asyncio.sleep(0.1)
        await poll.close()
        return started

    started, waits = run_on_recording_loop(scenario)
    again = kicked[0]
    assert_polled_then_slept(waits, again, again + window, again + 0.095)


def test_no_polling_while_the_backend_runs_work_off_the_loop():
    window = 0.05
    busy_from = [float("inf")]

    async def scenario():
        poll = BusyPoll(window, busy=lambda: time.perf_counter() >= busy_from[0])
        started = time.perf_counter()
        busy_from[0] = started + 0.01  # a worker call begins 10 ms into the window
        poll.kick()
        await asyncio.sleep(0.1)
        await poll.close()
        return started

    started, waits = run_on_recording_loop(scenario)
    assert_polled_then_slept(waits, started, started + 0.01, started + 0.095)
    assert zero_waits(waits, started + 0.01, started + 0.095) <= 2  # it stopped as the work began, not at the window's end


def test_a_window_of_zero_turns_polling_off():
    async def scenario():
        poll = BusyPoll(0.0, busy=lambda: False)
        started = time.perf_counter()
        poll.kick()
        await asyncio.sleep(0.05)
        assert poll._task is None
        await poll.close()
        return started

    started, waits = run_on_recording_loop(scenario)
    assert zero_waits(waits, started) <= 2


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.parametrize("transport", ["session", "rest"])
def test_a_servers_loop_polls_after_an_answer_stops_when_quiet_and_shuts_down_cleanly(tmp_path, transport):
    with ServerProcess(tmp_path / "state", durability="off", busy_poll_us=100_000, log_level="info") as server, \
            SynapseClient(server.url) as client:
        client.create("a", kind="HebbianSynapse", config={"shape": [4, 3]})
        x = np.ones((2, 4), np.float32)
        with client.session() as session:
            syn = session.get("a") if transport == "session" else client.get("a")
            for _ in range(20):
                assert syn.forward(x).shape == (2, 3)
            after_one_answer = 0.0
            for _ in range(3):  # three windows: a loaded machine gives the server part of a core, counted in 10 ms ticks
                time.sleep(0.3)  # every window so far (100 ms) is over
                before = process_cpu_seconds(server.proc.pid)
                syn.forward(x)  # one answer: 100 ms of polling
                time.sleep(0.2)
                after_one_answer += (process_cpu_seconds(server.proc.pid) - before) / 3
            time.sleep(0.1)
            before = process_cpu_seconds(server.proc.pid)
            time.sleep(1.0)
            idle = process_cpu_seconds(server.proc.pid) - before
        assert after_one_answer >= 0.025, f"{after_one_answer:.3f} s of CPU in the 100 ms after an answer: no polling"
        assert idle < 0.3, f"an idle server spent {idle:.2f} s of CPU in 1 s: still polling"
        server.stop()
    log = server.log.read_text()
    assert "Application shutdown complete" in log, log[-2000:]
    assert "Task was destroyed" not in log and "Traceback" not in log, log[-2000:]


def test_a_worker_call_makes_the_local_backend_busy(tmp_path):
    from synapse_serve.local.backend import LocalBackend
    from synapse_serve.settings import Settings

    backend = LocalBackend(Settings(state_dir=tmp_path / "state", durability="off"))
    release = threading.Event()

    async def scenario() -> list[bool]:
        seen = [backend.busy()]
        call = asyncio.ensure_future(backend._off(release.wait, 30))
        await asyncio.sleep(0.05)
        seen.append(backend.busy())  # on a worker thread now
        release.set()
        await call
        seen.append(backend.busy())
        return seen

    try:
        assert asyncio.run(scenario()) == [False, True, False]
    finally:
        backend.executor.shutdown(wait=True)
