"""Service fixtures: a complete tiny run directory, and the real app on it (real vLLM engine, real Redis).

``tiny_run_dir`` builds the ARCHITECTURE.md run format straight from the components: a synthetic
catalog (60 items with titles, genres, years), 30 users, an untrained preference-fused SASRec, its
FAISS index, preferences encoded by the real text encoder, and ``llm.json`` pointing at the shared
tiny random Llama (``tiny_llm_dir`` in tests/conftest.py). ``client`` is ONE app per session (the
engine start is the slow part) behind ``TestClient`` used as a context manager, so the lifespan runs
and the engine lives on the client's event loop; async tests run their coroutines on that same loop
through :func:`run_async`, with an httpx ``AsyncClient`` over ``ASGITransport`` for concurrency.
``lite_client`` is a second app without the LLM (fast to start) for auth and the in-flight cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.service.support import API_KEY, base_settings, build_run_dir


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llm_dir: Path) -> Path:
    return build_run_dir(tmp_path_factory.mktemp("runs") / "tiny", tiny_llm_dir)


@pytest.fixture(scope="session")
def app(tiny_run_dir: Path) -> FastAPI:
    from service.main import create_app

    return create_app(base_settings(tiny_run_dir))


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def lite_app(tiny_run_dir: Path) -> FastAPI:
    from service.main import create_app

    return create_app(
        base_settings(tiny_run_dir, llm_enabled=False, max_in_flight=1, api_keys=[API_KEY], max_body_bytes=4096)
    )


@pytest.fixture(scope="session")
def lite_client(lite_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(lite_app) as c:
        yield c
