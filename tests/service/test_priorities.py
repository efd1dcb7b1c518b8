"""CPU priorities on shared cores: a background-only engine's processes, every thread of them, run niced
below the re-rank engine (``service.runtime.lower_priority``, found with ``_descendants``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from service.runtime import _descendants, lower_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness is per thread on Linux only")

# a child with a second thread, as an engine process has its OpenMP threads
CHILD = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"


def test_every_thread_of_a_started_process_is_niced_and_this_process_is_not() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    before = _descendants()
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    try:
        tasks = f"/proc/{child.pid}/task"
        for _ in range(100):  # its second thread starts with the interpreter, in well under a second
            if len(os.listdir(tasks)) >= 2:
                break
            time.sleep(0.05)
        started = _descendants() - before
        assert child.pid in started and os.getpid() not in started
        lower_priority(7, started)
        niceness = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(tasks)}
        assert len(niceness) >= 2 and set(niceness.values()) == {min(19, own + 7)}
        assert os.getpriority(os.PRIO_PROCESS, 0) == own
    finally:
        child.kill()
        child.wait()
