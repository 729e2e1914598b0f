"""engine.serial.SerialRunner: one job at a time, in order, cancellable, on one thread."""

import asyncio
import contextlib
import contextvars
import threading
import time

import pytest

from engine.serial import Cancelled, SerialRunner

TIMEOUT = 10  # s; every wait in this file is bounded by it


@pytest.fixture
def runner():
    r = SerialRunner()
    yield r
    r.close(timeout=TIMEOUT)


def spin(seconds: float, log: list, name: str) -> str:
    """A blocking job that records when it runs (Python bytecode, so a cancel can land)."""
    log.append(("start", name, threading.get_ident()))
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            time.sleep(0.001)
    except BaseException as e:
        log.append(("interrupted", name, type(e).__name__))
        raise
    log.append(("end", name, threading.get_ident()))
    return name


def test_jobs_run_one_at_a_time_in_order_on_one_thread(runner):
    log: list = []

    async def main():
        tasks = [asyncio.create_task(runner.run(spin, 0.02, log, f"j{i}")) for i in range(6)]
        return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

    assert asyncio.run(main()) == [f"j{i}" for i in range(6)]
    assert [(e[0], e[1]) for e in log] == [(k, f"j{i}") for i in range(6) for k in ("start", "end")]
    assert len({e[2] for e in log}) == 1 and log[0][2] != threading.get_ident()
    assert runner.call(threading.get_ident) == log[0][2]  # setup runs on the same thread


def test_errors_reach_the_caller_and_the_runner_goes_on(runner):
    async def main():
        with pytest.raises(ValueError, match="bad input"):
            await runner.run(int, "bad input")
        return await runner.run(int, "7")

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == 7


def test_cancel_running_job_interrupts_it_and_waits_for_it(runner):
    log: list = []

    async def main():
        task = asyncio.create_task(runner.run(spin, 30, log, "long"))
        while not log:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        # The caller returned only after the job had ended, and it ended quickly.
        assert log[-1][:2] == ("interrupted", "long") and log[-1][2] == "Cancelled"
        assert time.monotonic() - t0 < 5
        return await runner.run(spin, 0.01, log, "next")

    assert asyncio.run(main()) == "next"
    assert [e[:2] for e in log] == [
        ("start", "long"),
        ("interrupted", "long"),
        ("start", "next"),
        ("end", "next"),
    ]


def test_cancel_queued_job_never_starts_it(runner):
    log: list = []
    release = threading.Event()

    def held(name: str) -> str:
        """Runs until the test lets it go, so the cancel lands while it runs on any machine load."""
        log.append(("start", name))
        release.wait(TIMEOUT)
        log.append(("end", name))
        return name

    async def main():
        first = asyncio.create_task(runner.run(held, "first"))
        queued = asyncio.create_task(runner.run(spin, 0.01, log, "queued"))
        while not log:
            await asyncio.sleep(0.005)
        assert runner.busy()
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, TIMEOUT)
        release.set()
        return await asyncio.wait_for(first, TIMEOUT)

    assert asyncio.run(main()) == "first"
    assert [e[:2] for e in log] == [("start", "first"), ("end", "first")]
    assert not runner.busy()


def test_cancel_exception_type_is_configurable():
    class ServerCancel(BaseException):
        pass

    r = SerialRunner(cancel_exception=ServerCancel)
    log: list = []

    async def main():
        task = asyncio.create_task(r.run(spin, 30, log, "x"))
        while not log:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)

    asyncio.run(main())
    r.close(timeout=TIMEOUT)
    assert log[-1] == ("interrupted", "x", "ServerCancel")


def test_context_variables_travel_with_the_job(runner):
    """coglet routes a prediction's log lines by a context variable: the job must see it."""
    var = contextvars.ContextVar("prediction_id", default=None)

    async def one(pid: str):
        var.set(pid)
        return await runner.run(var.get)

    async def main():
        return await asyncio.gather(*(one(f"p{i}") for i in range(4)))

    assert asyncio.run(main()) == ["p0", "p1", "p2", "p3"]


def test_cancels_racing_the_end_of_jobs_never_break_the_runner(runner):
    """Cancel at every moment around a short job's end; later jobs must still run, untouched."""
    log: list = []

    async def main():
        for i in range(60):
            task = asyncio.create_task(runner.run(spin, 0.002, log, f"r{i}"))
            await asyncio.sleep((i % 6) * 0.001)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # it may have ended first
                await asyncio.wait_for(task, TIMEOUT)
            assert await asyncio.wait_for(runner.run(spin, 0.001, log, f"ok{i}"), TIMEOUT) == f"ok{i}"

    asyncio.run(main())
    assert not any(e[0] == "interrupted" and e[1].startswith("ok") for e in log)


def test_a_cancelled_job_that_ignores_the_interrupt_is_still_awaited(runner):
    """A job that swallows the interrupt keeps the runner until it ends; the next job waits."""
    log: list = []

    def stubborn() -> str:
        log.append("start")
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            try:
                time.sleep(0.001)
            except Cancelled:
                log.append("ignored")
        log.append("end")
        return "done"

    async def main():
        task = asyncio.create_task(runner.run(stubborn))
        while not log:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        assert log[-1] == "end"  # the caller was released only after the job ended
        return await runner.run(lambda: "next")

    assert asyncio.run(main()) == "next"
    assert log == ["start", "ignored", "end"]
