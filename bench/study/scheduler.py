"""Runs study arms in parallel processes under a deadline.

Each arm runs in its own spawned process (``workers`` at a time), so an arm still running at the
deadline can be stopped by its process id without losing the others' results. An arm starts only
when the slowest arm seen so far (``estimate_s`` before any has ended) would still end before the
deadline, and none starts after ``start_by``. ``workers=0`` runs the arms one after another in
this process (the smoke run and debugging; no deadline can stop an arm there).
"""

from __future__ import annotations

import time
from multiprocessing import get_context
from multiprocessing.connection import wait

STOP_GRACE_S = 5  # SIGTERM first: a pipeline stage saves a checkpoint on it; SIGKILL after this


def _child(conn, work, arm) -> None:
    try:
        conn.send(("ok", work(arm)))
    except BaseException as err:  # reported by the parent as this arm's failure
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


class Clock:
    def __init__(self, deadline: float, start_by: float, estimate_s: float):
        self.deadline, self.start_by, self.estimate_s = deadline, start_by, estimate_s
        self.started, self.seen = time.time(), False

    def may_start(self) -> bool:
        now = time.time()
        return now < self.start_by and now + self.estimate_s < self.deadline

    def ended(self, wall_s: float) -> None:
        """The first arm to end replaces the guess; later ones can only raise it."""
        self.estimate_s = max(self.estimate_s, wall_s) if self.seen else wall_s
        self.seen = True

    def stamp(self) -> str:
        return f"[{time.time() - self.started:6.0f}s]"


def run_arms(arms: list, work, workers: int, results: dict, on_change, deadline: float = float("inf"),
             start_by: float = float("inf"), estimate_s: float = 120.0) -> list:
    """Runs ``work(arm)`` for each arm, storing ``results["arms"][arm.name]`` and calling ``on_change``
    after each; returns the arms not run or stopped at the deadline."""
    clock, queue = Clock(deadline, start_by, estimate_s), list(arms)
    if workers == 0:
        while queue and clock.may_start():
            arm, started = queue.pop(0), time.time()
            status, value = _in_process(work, arm)
            _record(arm, status, value, results, clock, time.time() - started)
            on_change()
        return queue
    ctx, running = get_context("spawn"), {}
    while queue or running:
        while queue and len(running) < workers and clock.may_start():
            arm = queue.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_child, args=(child, work, arm), daemon=True)
            process.start()
            child.close()
            running[parent] = (arm, process, time.time())
        if not running:
            break
        ready = wait(list(running), timeout=max(0.0, min(60.0, deadline - time.time())))
        for conn in ready:
            arm, process, started = running.pop(conn)
            _record(arm, *_receive(conn, process), results, clock, time.time() - started)
            on_change()
        if time.time() >= deadline:
            queue = _stop([(arm, process) for arm, process, _ in running.values()], clock) + queue
            running.clear()
    return queue


def _in_process(work, arm) -> tuple[str, object]:
    try:
        return "ok", work(arm)
    except Exception as err:  # one failed arm must not lose the others
        return "error", f"{type(err).__name__}: {err}"


def _receive(conn, process) -> tuple[str, object]:
    try:
        status, value = conn.recv()
    except EOFError:  # the process died without a word (killed, out of memory)
        status, value = "error", f"the arm's process ended with exit code {process.exitcode}"
    process.join(timeout=STOP_GRACE_S)
    return status, value


def _record(arm, status: str, value, results: dict, clock: Clock, wall_s: float) -> None:
    clock.ended(wall_s)  # a failed arm took its time too
    if status == "ok":
        results["arms"][arm.name] = value
        print(f"{clock.stamp()} {arm.name}: {wall_s:.0f}s", flush=True)
    else:
        print(f"{clock.stamp()} {arm.name} FAILED after {wall_s:.0f}s: {value}", flush=True)


def _stop(arms: list, clock: Clock) -> list:
    """The arms' own processes, by their ids: SIGTERM to all, then SIGKILL to those still alive after
    one shared grace period."""
    for _, process in arms:
        process.terminate()
    grace_end = time.time() + STOP_GRACE_S
    for arm, process in arms:
        process.join(timeout=max(0.0, grace_end - time.time()))
        if process.is_alive():
            process.kill()
            process.join()
        print(f"{clock.stamp()} {arm.name} STOPPED at the deadline", flush=True)
    return [arm for arm, _ in arms]
