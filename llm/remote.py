"""A vLLM OpenAI-compatible server as the engine: the calls made on an in-process ``AsyncLLM``, over HTTP.

The engine tier (SPEC section 11): API pods on CPUs, engine pods (``vllm serve``, started by ``dpo4rec engine``)
on GPUs. ``RemoteEngine`` answers the part of ``AsyncLLM`` this project uses (``generate`` yielding the final
``RequestOutput``, ``abort``, ``errored``, ``get_num_unfinished_requests``) by ``POST /v1/completions``, so the
label scoring and generation of ``llm.engine`` (``ascore_labels``, ``agenerate``), admission, deadlines and
fallbacks are one code path for both engines.

- **The prompt goes as token ids** (the service tokenized it to count it for admission); the server does not
  tokenize it again, and the tokens are exactly the in-process engine's.
- **Label scoring** is LlamaRec's verbalizer as in process: ``max_tokens: 1``, ``allowed_token_ids`` and
  ``logprob_token_ids`` (vLLM >= 0.32) both the labels, ``return_tokens_as_token_ids`` so the log-probs come
  back keyed ``token_id:N``. The server runs with ``--logprobs-mode processed_logprobs`` (``dpo4rec engine``):
  log-probs after the mask, a distribution over the labels, as in process.
- **Cancellation**: a cancelled call (a deadline) closes its connection, and vLLM's server aborts a request whose
  client went away (``with_cancellation`` on ``/v1/completions``): the engine stops working on it.
- **Failures**: a server that cannot be reached, or a connection that breaks, raises ``EngineUnreachable``
  (``llm.engine.is_engine_dead`` counts it: the service answers flagged ``llm_unavailable``, as for a dead
  in-process engine); an HTTP error raises ``RemoteEngineError`` with the server's message. The client never
  restarts the server: the engine tier has its own probes.
- **Which weights**: a call's weights are a served model name: the name of the ``LoRARequest`` it carries (how
  vLLM's server itself maps a model name to an adapter), else the engine's default ``model``. The service names
  each job's weights by their digest (``service.engines``), so a server with other weights answers 404 instead of
  wrong scores, and both jobs sent to one server share one ``RemoteEngine``, as they share an in-process engine
  (admission then counts background generations as work ahead of the re-ranks, as in process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp
    from vllm import RequestOutput, SamplingParams

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # a TCP connect that takes longer means the server is not there
# idle connections are dropped before the server drops them (vLLM's keep-alive is 5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE):
# a request sent on a connection the server is closing fails with ServerDisconnectedError
KEEPALIVE_S = 3.0
_TOKEN_ID = "token_id:"  # vLLM's key for a log-prob with return_tokens_as_token_ids


class Counters(Protocol):
    """What the engine's statistics add into (``llm.engine.EngineCounters``)."""

    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int
    prefix_hits: int


class EngineUnreachable(ConnectionError):
    """The server did not answer: refused, reset, or a connect that timed out."""


class RemoteEngineError(RuntimeError):
    """The server answered with an HTTP error (its message included)."""


@dataclass(frozen=True)
class RemoteTarget:
    """A server and the served names of the weights the jobs sent to it use (the first: the default)."""

    url: str  # e.g. http://dpo4rec-engine:8000
    models: tuple[str, ...]  # served model names; a call names one (its LoRARequest's name), else the first
    api_key: str | None = None  # vllm serve --api-key
    wait_s: float = 120.0  # how long ``RemoteEngine.open`` waits for a server that is still starting

    def __repr__(self) -> str:  # never the key
        return f"RemoteTarget(url={self.url!r}, models={self.models!r})"


def completion_body(model: str, prompt: Any, params: SamplingParams, request_id: str) -> dict[str, Any]:
    """The ``/v1/completions`` body that asks the server for what ``params`` asks the in-process engine."""
    prompt = list(prompt) if not isinstance(prompt, str) else prompt
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in prompt] if isinstance(prompt, list) else prompt,
        "request_id": request_id,
        "n": params.n,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "repetition_penalty": params.repetition_penalty,
        "add_special_tokens": False,  # rendered templates hold their own BOS (llm.engine._TOKENIZATION)
        "skip_special_tokens": params.skip_special_tokens,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.allowed_token_ids:
        body["allowed_token_ids"] = list(params.allowed_token_ids)
    if params.logprobs is not None or getattr(params, "logprob_token_ids", None):
        ids = getattr(params, "logprob_token_ids", None)
        body["logprobs"] = params.logprobs if params.logprobs is not None else len(ids or ())
        body["return_tokens_as_token_ids"] = True
        if ids:
            body["logprob_token_ids"] = list(ids)
    return body


def request_output(request_id: str, prompt: Any, answer: Mapping[str, Any]) -> RequestOutput:
    """The server's answer as the ``RequestOutput`` the in-process engine gives (texts, first-token log-probs)."""
    from vllm import CompletionOutput, RequestOutput
    from vllm.logprobs import Logprob

    outputs = []
    for choice in answer.get("choices", []):
        logprobs = None
        if choice.get("logprobs") and choice["logprobs"].get("top_logprobs"):
            logprobs = [
                {int(k.removeprefix(_TOKEN_ID)): Logprob(float(v)) for k, v in (step or {}).items()}
                for step in choice["logprobs"]["top_logprobs"]
            ]
        outputs.append(
            CompletionOutput(
                index=int(choice.get("index", 0)),
                text=str(choice.get("text", "")),
                token_ids=[],
                cumulative_logprob=None,
                logprobs=logprobs,
                finish_reason=choice.get("finish_reason"),
            )
        )
    ids = None if isinstance(prompt, str) else [int(t) for t in prompt]
    return RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids, None, outputs, finished=True)


class RemoteEngine:
    """One served model of a vLLM OpenAI-compatible server, called like an ``AsyncLLM``. ``open`` before use."""

    def __init__(
        self,
        url: str,
        model: str | tuple[str, ...],
        counters: Counters | None = None,
        api_key: str | None = None,
        request_timeout_s: float = 600.0,
    ):
        self.url = url.rstrip("/")
        self.models = (model,) if isinstance(model, str) else tuple(model)  # all must be served (``open``)
        self.model = self.models[0]  # a call without a LoRARequest
        self.counters = counters
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._calls: set[str] = set()  # request ids waiting for their answer
        self.last_error = ""  # the last failure to reach the server ("" once it answers again)
        self.failing_since: float | None = None  # time.monotonic() of the first failure in a row

    # ---- what AsyncLLM's callers use ----------------------------------------------------------------

    errored = False  # the server is not ours to restart: a call that cannot reach it fails, the next one tries again

    def get_num_unfinished_requests(self) -> int:
        return len(self._calls)

    async def generate(
        self,
        prompt: Any,
        params: SamplingParams,
        request_id: str,
        lora_request: Any = None,  # its name is the served model to use (else ``model``)
        tokenization_kwargs: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """The final output of one request (the server answers once; no streaming)."""
        if isinstance(prompt, dict):
            prompt = prompt["prompt_token_ids"]
        model = self.model if lora_request is None else str(lora_request.lora_name)
        body = completion_body(model, prompt, params, request_id)
        self._calls.add(request_id)
        try:  # a cancelled wait closes the connection: the server aborts the request
            answer = await self._post("/v1/completions", body)
        finally:
            self._calls.discard(request_id)
        self._count(answer.get("usage") or {})
        yield request_output(request_id, prompt, answer)

    async def abort(self, request_id: str) -> None:
        """Nothing to send: the caller cancelled the wait for ``request_id``, which closed its connection, and
        vLLM's server aborts a request whose client went away."""

    def shutdown(self) -> None:
        """Nothing to stop on this side but the connections (``aclose``); the server is the engine tier's."""

    # ---- connections ------------------------------------------------------------------------------

    async def open(self, wait_s: float = 0.0) -> None:
        """Open the connection pool and check that the server serves ``model``, waiting up to ``wait_s`` for a
        server that is still starting. A server without the model is refused at once, naming what it serves."""
        import aiohttp

        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, sock_connect=CONNECT_TIMEOUT_S)
            self._session = aiohttp.ClientSession(
                timeout=timeout,
                headers=self.headers,
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            )
        deadline = time.monotonic() + wait_s
        while True:
            try:
                served = [m["id"] for m in (await self._get("/v1/models")).get("data", [])]
                break
            except EngineUnreachable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(1.0)
        missing = [name for name in self.models if name not in served]
        if missing:
            raise RemoteEngineError(
                f"the engine at {self.url} serves {served}, not {missing[0]!r} (the weights of this run): "
                "start it for this run with `python -m dpo4rec engine --run RUN`"
            )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str) -> dict[str, Any]:
        return await self._request("GET", path, None)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            raise RuntimeError("RemoteEngine.open() was not called")
        try:
            async with self._session.request(method, self.url + path, json=body) as response:
                text = await response.text()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            self._failed(f"{type(e).__name__}: {e}")
            raise EngineUnreachable(f"the engine at {self.url} did not answer: {type(e).__name__}: {e}") from e
        self.last_error, self.failing_since = "", None
        if response.status >= 400:
            raise RemoteEngineError(f"the engine at {self.url} answered {response.status}: {_message(text)}")
        try:
            return dict(json.loads(text))
        except ValueError as e:
            raise RemoteEngineError(f"the engine at {self.url} answered no JSON: {text[:200]!r}") from e

    def _failed(self, error: str) -> None:
        self.last_error = error[:300]
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def describe(self) -> str:
        """Where the server stands, as ``/readyz`` says it."""
        if self.failing_since is None:
            return f"remote {self.url} ({', '.join(self.models)}): answering"
        since = time.monotonic() - self.failing_since
        return f"remote {self.url} ({', '.join(self.models)}): not answering for {since:.0f} s ({self.last_error})"

    def _count(self, usage: Mapping[str, Any]) -> None:
        if self.counters is None:
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        self.counters.prompt_tokens += prompt
        self.counters.generation_tokens += int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        if "cached_tokens" in details:  # the server runs with --enable-prompt-tokens-details (dpo4rec engine)
            self.counters.prefix_queries += prompt
            self.counters.prefix_hits += int(details["cached_tokens"] or 0)


def _message(text: str) -> str:
    try:
        error = json.loads(text).get("error", text)
    except ValueError:
        return text[:300]
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
