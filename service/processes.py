"""The service's processes on shared cores: finding an engine's child processes and lowering CPU priorities.

Linux niceness is per thread, and a thread or a process inherits the niceness of the thread that starts it:
``lower_priority`` therefore nices every thread of a process, and ``keep`` leaves out the thread that starts
the engines (``service.supervisor``), so an engine restarted after the API process lowered its own priority
runs at the priority it started with (raising a niceness back needs CAP_SYS_NICE, which the pod does not have).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterable

import psutil


def lower_priority(nice: int, pids: Iterable[int] | None = None, keep: Collection[int] = ()) -> None:
    """Add ``nice`` to every thread of this process, or of ``pids``, except the thread ids in ``keep``.

    Called for this process once the engines (child processes) run: when the cores are shared, the engine
    then keeps its share of them under a burst of requests answered without the LLM, whose HTTP, retrieval
    and encoding would otherwise take the cores from the work that yields LLM-scored answers
    (docs/BENCHMARKS.md). Called with the processes of an engine that only generates preferences in the
    background: re-ranks, which a user waits for, get the cores first (docs/DECISIONS.md)."""
    for pid in [os.getpid()] if pids is None else pids:
        try:  # elsewhere than Linux the niceness is the process's
            tids = [t.id for t in psutil.Process(pid).threads()] if sys.platform.startswith("linux") else [pid]
        except psutil.Error:  # a process that ended meanwhile
            continue
        for tid in tids:
            if tid in keep:
                continue
            try:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
            except OSError:  # a thread that ended meanwhile
                pass


def descendants() -> set[int]:
    """The pids of this process's children, grandchildren, ..."""
    return {child.pid for child in psutil.Process().children(recursive=True)}
