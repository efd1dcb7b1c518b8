"""Settings: required run directory, env prefix, key lists, and validators that say what to do."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_run_dir_is_required_and_must_exist(tmp_path, monkeypatch):
    monkeypatch.delenv("DPO4REC_RUN_DIR", raising=False)
    with pytest.raises(ValidationError, match="run_dir"):
        Settings()
    with pytest.raises(ValidationError, match="dpo4rec train --out"):
        Settings(run_dir=tmp_path / "missing")


def test_environment_with_prefix_and_comma_separated_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO4REC_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("DPO4REC_API_KEYS", "first-key-123, second-key-456")
    monkeypatch.setenv("DPO4REC_RERANK_K", "12")
    monkeypatch.setenv("DPO4REC_REDIS_URL", "")
    settings = Settings()
    assert settings.run_dir == tmp_path and settings.rerank_k == 12 and settings.redis_url is None
    assert [k.get_secret_value() for k in settings.api_keys] == ["first-key-123", "second-key-456"]
    assert "first-key-123" not in repr(settings)  # secrets never show up in logs or reprs


def test_json_key_list(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO4REC_API_KEYS", '["json-key-1234"]')
    assert Settings(run_dir=tmp_path).api_keys[0].get_secret_value() == "json-key-1234"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis_url": "http://localhost:6379"}, "must start with one of"),
        ({"api_keys": ["short"]}, "at least 8 characters"),
        ({"default_top_n": 50, "max_candidates": 10}, "lower DPO4REC_DEFAULT_TOP_N"),
        ({"rerank_k": 30, "max_candidates": 20}, "lower DPO4REC_RERANK_K"),
        ({"max_in_flight": 0}, "greater than or equal to 1"),
    ],
)
def test_validators_say_what_to_change(tmp_path, overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings(run_dir=tmp_path, **overrides)


def test_llm_model_must_be_a_model_folder(tmp_path):
    with pytest.raises(ValidationError, match="not a Hugging Face model folder"):
        Settings(run_dir=tmp_path, llm_model=tmp_path)
