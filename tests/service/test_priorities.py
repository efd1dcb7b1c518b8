"""CPU priorities on shared cores: a background-only engine's processes, every thread of them, run niced
below the re-rank engine (``service.processes.lower_priority``, found with ``descendants``); the thread that
starts engines is kept out of the API process's own niceness (``keep``), so a restarted engine gets its priority."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from service.processes import descendants, lower_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness is per thread on Linux only")

# a child with a second thread, as an engine process has its OpenMP threads
CHILD = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"


def test_every_thread_of_a_started_process_is_niced_and_this_process_is_not() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    before = descendants()
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        tasks = f"/proc/{child.pid}/task"
        for _ in range(100):  # its second thread starts with the interpreter, in well under a second
            if len(os.listdir(tasks)) >= 2:
                break
            time.sleep(0.05)
        started = descendants() - before
        assert child.pid in started and os.getpid() not in started
        lower_priority(7, started)
        niceness = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(tasks)}
        assert len(niceness) >= 2 and set(niceness.values()) == {min(19, own + 7)}
        assert os.getpriority(os.PRIO_PROCESS, 0) == own
    finally:
        child.kill()
        child.wait()


def test_a_kept_thread_keeps_its_niceness() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        tasks = f"/proc/{child.pid}/task"
        for _ in range(100):
            if len(os.listdir(tasks)) >= 2:
                break
            time.sleep(0.05)
        tids = sorted(int(t) for t in os.listdir(tasks))
        kept = tids[-1]  # the second thread, as the service keeps its engine-starting thread
        before = os.getpriority(os.PRIO_PROCESS, kept)
        lower_priority(5, [child.pid], keep={kept})
        assert os.getpriority(os.PRIO_PROCESS, kept) == before
        assert all(os.getpriority(os.PRIO_PROCESS, t) == min(19, before + 5) for t in tids if t != kept)
    finally:
        child.kill()
        child.wait()
