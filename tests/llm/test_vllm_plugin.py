"""The vLLM plugin: registered as an entry point, and it sets the poll time of vLLM's queue readers."""

import os
from importlib.metadata import entry_points

import pytest

from llm.engine import EngineConfig, _engine_env
from llm.vllm_plugin import ENV_IPC_BUSY_LOOP_S, register


def test_the_plugin_is_an_entry_point_vllm_loads() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("dpo4rec") == "llm.vllm_plugin:register"


def test_the_engine_env_carries_the_poll_time_and_the_plugin_applies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    defaults = SpinCondition.__init__.__defaults__
    monkeypatch.delenv(ENV_IPC_BUSY_LOOP_S, raising=False)
    try:
        with _engine_env(EngineConfig(model="m", ipc_busy_loop_s=0.0)):
            assert os.environ[ENV_IPC_BUSY_LOOP_S] == "0.0"
            register()  # what vLLM does in each process it starts
        assert ENV_IPC_BUSY_LOOP_S not in os.environ
        assert SpinCondition.__init__.__defaults__[-1] == 0.0
    finally:
        SpinCondition.__init__.__defaults__ = defaults
