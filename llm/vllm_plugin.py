"""A vLLM general plugin (entry point ``vllm.general_plugins``): settings vLLM reads in its own processes.

vLLM runs ``register`` in every process it starts (the engine core, its workers) before it builds
them; they are spawned, so a change made in the service's process would not reach them. What is set
here comes from the environment ``llm.engine`` starts the engine with.

``DPO4REC_VLLM_IPC_BUSY_LOOP_S``: after each read of its shared-memory queue, vLLM's engine core polls
that queue with ``sched_yield`` for this long before it sleeps on a socket (vLLM 0.32: 1 s, with no
setting of its own). An engine step on a CPU lasts ~0.5 s, so the core process polls through every
step, on the cores its worker computes on: py-spy showed it at ~25 % of a core under load, all in
``SpinCondition.wait`` (docs/BENCHMARKS.md). 0 makes it sleep until the worker's answer arrives (a
socket wake-up: microseconds against a step of hundreds of milliseconds).
"""

from __future__ import annotations

import logging
import os

ENV_IPC_BUSY_LOOP_S = "DPO4REC_VLLM_IPC_BUSY_LOOP_S"

log = logging.getLogger(__name__)


def register() -> None:
    value = os.environ.get(ENV_IPC_BUSY_LOOP_S)
    if value:
        set_ipc_busy_loop(float(value))


def set_ipc_busy_loop(seconds: float) -> None:
    """The default poll time of vLLM's shared-memory queue readers (a warning where this vLLM has none)."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        log.warning("this vLLM has no SpinCondition: %s not applied", ENV_IPC_BUSY_LOOP_S)
        return
    init = SpinCondition.__init__
    code, defaults = init.__code__, init.__defaults__
    if not defaults or code.co_varnames[code.co_argcount - 1] != "busy_loop_s":
        log.warning("this vLLM's SpinCondition has no busy_loop_s default: %s not applied", ENV_IPC_BUSY_LOOP_S)
        return
    init.__defaults__ = (*defaults[:-1], float(seconds))
