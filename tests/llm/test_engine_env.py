"""The engine process's environment: set for its start only, an explicit setting wins."""

import os

import pytest

from llm.engine import EngineConfig, _engine_env


def test_omp_wait_policy_is_set_for_the_engine_start_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with _engine_env(EngineConfig(model="m", omp_wait_policy="PASSIVE")):
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ
    with _engine_env(EngineConfig(model="m")):  # None: the environment as it is
        assert "OMP_WAIT_POLICY" not in os.environ


def test_an_explicit_omp_wait_policy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with _engine_env(EngineConfig(model="m", omp_wait_policy="PASSIVE")):
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_engine_steps_are_short_on_a_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from llm.engine import CPU_STEP_TOKENS, resolve_step_tokens

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_step_tokens("auto") == CPU_STEP_TOKENS == 512
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_step_tokens("auto") is None  # a GPU step takes milliseconds: vLLM's budget
    assert resolve_step_tokens(None) is None  # vLLM's, everywhere (the batch jobs)
    assert resolve_step_tokens(2048) == 2048
