"""Batch jobs (SPEC section 8): ``preferences`` (refresh users' preference texts + vectors) and
``rerank`` (JSONL requests in, JSONL responses out), on the service's own pipeline.

Both jobs run the objects ``/rerank`` runs (``service.runtime.open_service``: the run directory, the
vLLM ``AsyncLLM``, the text encoder, the Redis cache), so a batch answer is the answer the service
would give. Work goes in chunks: a chunk's requests are in flight together, so the engine batches
them, and each finished chunk is appended to a checkpoint file (``.partial``) and fsynced.

Resumable and idempotent: the checkpoint holds complete lines in input order, so a job killed at any
point restarts after its last complete line (a torn last line is cut off); every input appears in the
output exactly once. The job's inputs are fingerprinted next to the checkpoint, so a restart with
different inputs is refused rather than mixed in. The final file appears by one rename.

Scale-out: ``ray=True`` runs the same chunk function inside Ray Data actors (``map_batches`` over an
actor pool, each actor owning one engine), with the driver writing the ordered stream to the same
checkpoint. Nothing else changes; on a cluster, ``ray.init(address=...)`` is the only difference.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm.auto import tqdm

from rundir.manifest import RunDirError, atomic_write_text, read_manifest
from rundir.preferences import TEXTS

if TYPE_CHECKING:
    from service.runtime import ServiceState

log = logging.getLogger(__name__)

PREFERENCES_CHECKPOINT = ".preferences-refresh"  # inside the run directory
BATCH_DEADLINE_MS = 600_000  # a batch waits for the LLM instead of degrading to retriever order


# ---- the checkpoint file ----------------------------------------------------------------------------


class Checkpoint:
    """Append-only JSONL of finished lines beside ``final``, plus the fingerprint of the job's inputs."""

    def __init__(self, final: Path, fingerprint: str):
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.meta = self.final.with_name(self.final.name + ".partial.json")
        self.fingerprint = fingerprint

    def open(self) -> int:
        """Lines already done (0 for a new job); refuses a checkpoint of different inputs."""
        if self.meta.exists():
            found = json.loads(self.meta.read_text(encoding="utf-8")).get("fingerprint")
            if found != self.fingerprint:
                raise RunDirError(
                    f"{self.path} holds a job with other inputs (fingerprint {found}, this job {self.fingerprint}): "
                    "rerun with the same inputs to resume it, or delete both .partial files to start over"
                )
        else:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            atomic_write_text(self.meta, json.dumps({"fingerprint": self.fingerprint}))
        if not self.path.exists():
            self.path.touch()
            return 0
        return _truncate_torn_line(self.path)

    def append(self, lines: Iterable[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def lines(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")

    def finish(self) -> None:
        """The checkpoint becomes ``final`` (one rename); the fingerprint goes."""
        os.replace(self.path, self.final)
        self.meta.unlink(missing_ok=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def _truncate_torn_line(path: Path) -> int:
    """Cut a partly written last line (a kill mid-write); return the number of complete lines."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes); it is redone", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


def fingerprint(items: Iterable[str], **params: Any) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for item in items:
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ---- the work of one chunk (shared by the local and the Ray path) ----------------------------------


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to build its service stack: the run and the ``DPO4REC_*`` overrides."""

    kind: str  # "preferences" | "rerank"
    run_dir: str
    settings: dict[str, Any]


def service_settings(run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Settings overrides for a batch worker: no cache warm-up, LLM deadlines that do not degrade, and a
    missing preference waited for (the LLM's text, not the service's stand-in)."""
    return {
        "run_dir": str(run_dir),
        "warm_cache": False,
        "deadline_ms": BATCH_DEADLINE_MS,
        "preference_wait": True,
        "admission": False,  # never shed: a batch has the time
        "api_nice": 0,  # nothing is answered without the LLM here: no fast path to keep off the engine's cores
        "engine_omp_wait": None,  # nor an API to leave cores to: the engine's threads may spin (OpenMP's default)
        "engine_ipc_busy_loop_s": None,  # and its core poll (vLLM's default)
        "max_num_batched_tokens": None,  # no deadline to predict: vLLM's larger steps
        "engine_slots": None,  # and the engine batches all it is given
        "preference_workers": 64,  # a batch waits for its missing texts: generate them together
        "preference_engine_nice": 0,  # a preference-only engine is the job here, not background work
        **overrides,
    }


@asynccontextmanager
async def worker_state(spec: JobSpec) -> AsyncIterator[ServiceState]:
    from service.runtime import open_service
    from service.settings import Settings
    from service.telemetry import ServiceMetrics

    settings = Settings(**{**spec.settings, "run_dir": spec.run_dir})
    async with open_service(settings, ServiceMetrics()) as state:
        yield state


async def preference_lines(state: ServiceState, payloads: list[str]) -> list[str]:
    """``{"user_id", "history"}`` lines -> ``{"user_id", "text", "vector", "redis"}`` lines."""
    from rundir.items import prompt_items
    from service.cache import CacheUnavailable, Preference

    rows = [json.loads(p) for p in payloads]
    catalog = state.artifacts.catalog
    histories = [prompt_items(catalog, catalog.indices_of(row["history"])) for row in rows]
    texts = await asyncio.gather(
        *(state.llm.preference(h, f"batch-pref-{r['user_id']}") for r, h in zip(rows, histories, strict=True))
    )
    vectors = await asyncio.to_thread(state.preferences.encoder.encode, list(texts))
    stored = False
    if state.redis_server is None:  # an external Redis: the service's cache; the embedded one dies with us
        try:
            await state.cache.set_many(
                (row["user_id"], Preference(text, vec)) for row, text, vec in zip(rows, texts, vectors, strict=True)
            )
            stored = True
        except CacheUnavailable as e:
            log.warning("redis write of %d preferences failed (%s); the run directory still gets them", len(rows), e)
    return [
        json.dumps(
            {"user_id": row["user_id"], "text": text, "vector": [round(float(x), 7) for x in vec], "redis": stored},
            ensure_ascii=False,
        )
        for row, text, vec in zip(rows, texts, vectors, strict=True)
    ]


async def rerank_lines(state: ServiceState, payloads: list[str]) -> list[str]:
    """``{"line", "request"}`` payloads -> ``{"line", "response"}`` or ``{"line", "error"}`` lines."""
    return list(await asyncio.gather(*(_rerank_one(state, p) for p in payloads)))


async def _rerank_one(state: ServiceState, payload: str) -> str:
    from pydantic import ValidationError

    from service.errors import ServiceError, validation_message
    from service.protocol import RerankRequest

    row = json.loads(payload)
    line = row["line"]
    try:
        request = RerankRequest.model_validate_json(row["request"])
        request_id = f"batch-{line}"
        response = await state.pipeline.rerank(request, request_id)
        out: dict[str, Any] = {"line": line, "response": response.model_dump(mode="json", exclude_none=True)}
    except ValidationError as e:
        out = {
            "line": line,
            "error": {"code": 422, "type": "invalid_request", "message": validation_message(e.errors())},
        }
    except ServiceError as e:
        out = {"line": line, "error": {"code": e.status_code, "type": e.error_type, "message": e.message}}
    return json.dumps(out, ensure_ascii=False)


CHUNK_FUNCTIONS: dict[str, Callable[[ServiceState, list[str]], Any]] = {
    "preferences": preference_lines,
    "rerank": rerank_lines,
}


class ChunkWorker:
    """A synchronous face on a worker's service stack: one event loop thread, ``__call__`` per chunk.

    Ray Data instantiates one per actor (``map_batches(ChunkWorker, ...)``); batches are pandas frames
    with a ``payload`` column and come back with a ``line`` column.
    """

    def __init__(self, spec: JobSpec, open_marks: str | None = None):
        self.spec = spec
        self.mark: Path | None = None
        if open_marks is not None and Path(open_marks).is_dir():  # the driver's folder: a local Ray cluster
            self.mark = Path(open_marks) / str(os.getpid())
            self.mark.touch()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="batch-worker", daemon=True)
        self.thread.start()
        self._stack = worker_state(spec)
        try:
            self.state = self._run(self._stack.__aenter__())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.mark is not None:
                self.mark.unlink(missing_ok=True)
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def lines(self, payloads: list[str]) -> list[str]:
        return self._run(CHUNK_FUNCTIONS[self.spec.kind](self.state, payloads))

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        return pd.DataFrame({"line": self.lines([str(p) for p in batch["payload"]])})

    def close(self) -> None:
        try:
            self._run(self._stack.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            if self.mark is not None:
                self.mark.unlink(missing_ok=True)
                self.mark = None

    def __del__(self) -> None:  # Ray tears actors down without a close call
        if getattr(self, "thread", None) is not None and self.thread.is_alive():
            try:
                self.close()
            except Exception:  # best effort at interpreter/actor exit
                pass


# ---- driving a job ----------------------------------------------------------------------------------


@dataclass
class JobResult:
    total: int  # inputs of the job
    resumed_from: int  # lines already done when this invocation started
    output: Path


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _run_chunks(
    spec: JobSpec, checkpoint: Checkpoint, payloads: list[str], chunk_size: int, use_ray: bool, ray_actors: int
) -> JobResult:
    done = checkpoint.open()
    pending = payloads[done:]
    bar = tqdm(total=len(payloads), initial=done, desc=spec.kind, unit="line")
    if done:
        log.info("%s: resuming after %d of %d lines", spec.kind, done, len(payloads))
    try:
        for lines in (_ray_stream if use_ray else _local_stream)(spec, pending, chunk_size, ray_actors):
            checkpoint.append(lines)
            bar.update(len(lines))
    finally:
        bar.close()
    return JobResult(total=len(payloads), resumed_from=done, output=checkpoint.final)


def _local_stream(spec: JobSpec, pending: list[str], chunk_size: int, _: int) -> Iterator[list[str]]:
    if not pending:
        return
    worker = ChunkWorker(spec)
    try:
        for chunk in _chunks(pending, chunk_size):
            yield worker.lines(chunk)
    finally:
        worker.close()


class RaySettings(BaseSettings):
    """The Ray path's own settings, read by the driver before any worker (and its ``Settings``) exists."""

    model_config = SettingsConfigDict(env_prefix="DPO4REC_RAY_", env_file=None, extra="ignore")

    address: str | None = Field(
        default=None,
        validation_alias="RAY_ADDRESS",  # Ray's own name for it (no prefix), the one Ray's docs use
        description="Ray cluster to submit to, e.g. `ray://head:10001` (or `auto` on a cluster node); unset: "
        "start Ray on this machine",
    )
    actor_cpus: float = Field(
        default=1.0, description="CPUs each engine-owning Ray Data actor reserves (fractions allowed)"
    )
    actor_threads: int | None = Field(
        default=None,
        ge=1,
        description="OpenMP/torch threads of each actor's own process (its text encoder; the engine sizes its "
        "own). null: this process's `OMP_NUM_THREADS`, else the actor's CPUs rounded up (Ray's default "
        "would round down, to 1 thread at 1 CPU or less)",
    )
    worker_niceness: int | None = Field(
        default=0,
        ge=0,
        le=19,
        description="niceness of Ray's worker processes (the actors and the engines they start) when the job "
        "starts Ray on this machine; Ray's own default, 15, puts the engine below the driver, Ray's daemons "
        "and everything else on the machine. null: Ray's. A cluster's is set where it is started",
    )


def start_ray(settings: RaySettings | None = None) -> bool:
    """``ray.init`` unless Ray is up: the cluster of ``RAY_ADDRESS``, else a local one whose workers run at
    ``worker_niceness``. Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    settings = settings or RaySettings()
    if settings.address is None and settings.worker_niceness is not None:
        # read by the raylet that ray.init starts (Ray's RAY_<config> convention); an explicit one wins
        os.environ.setdefault("RAY_worker_niceness", str(settings.worker_niceness))
    ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
    return True


def actor_env(settings: RaySettings) -> dict[str, str]:
    """What an engine-owning actor's process needs in its environment beyond the cluster's."""
    threads = settings.actor_threads
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, math.ceil(settings.actor_cpus)))
    return {"OMP_NUM_THREADS": str(threads)}


OPEN_WAIT_S = 120.0  # how long the driver waits for actors on this machine to shut their engines down


def _wait_closed(marks: Path, timeout_s: float = OPEN_WAIT_S) -> None:
    """Wait until every actor on this machine has closed its engine (its mark gone, or its process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        open_pids = []
        for mark in marks.iterdir():
            try:
                os.kill(int(mark.name), 0)
                open_pids.append(int(mark.name))
            except (ProcessLookupError, ValueError):  # died without closing: nothing left to wait for
                mark.unlink(missing_ok=True)
        if not open_pids:
            return
        if time.monotonic() > deadline:
            log.warning("Ray actors %s still closing their engines after %.0f s", open_pids, timeout_s)
            return
        time.sleep(0.2)


def _ray_stream(spec: JobSpec, pending: list[str], chunk_size: int, actors: int) -> Iterator[list[str]]:
    """The same chunks through Ray Data: ``map_batches`` over ``actors`` engine-owning actors, in order.

    One block per chunk, so each Ray task is one chunk, and no prefetch: a chunk reaches the checkpoint as
    soon as it is done. Before it returns, the engines of actors
    on this machine are closed: Ray Data releases its actors without waiting, and a Ray shut down
    meanwhile (the driver's exit) leaves their engine processes running, orphaned.
    """
    if not pending:
        return
    try:
        import pandas as pd
        import ray
    except ImportError as e:
        raise RuntimeError("the Ray path needs the ray extra: pip install -e '.[ray]'") from e
    ray_settings = RaySettings()
    start_ray(ray_settings)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the checkpoint is in input order
    with tempfile.TemporaryDirectory(prefix="dpo4rec-actors-") as marks:
        blocks = ray.data.from_pandas([pd.DataFrame({"payload": chunk}) for chunk in _chunks(pending, chunk_size)])
        ds = blocks.map_batches(
            ChunkWorker,
            fn_constructor_kwargs={"spec": spec, "open_marks": marks},
            batch_size=chunk_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ray_settings.actor_cpus,
            runtime_env={"env_vars": actor_env(ray_settings)},
        )
        try:
            # no prefetch: with Ray Data's default (1) each chunk reaches the checkpoint only once the next is done
            for batch in ds.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=0):
                yield [str(x) for x in batch["line"]]
        finally:
            del ds, blocks  # the actors go once nothing holds the dataset
            _wait_closed(Path(marks))


# ---- the rerank job ---------------------------------------------------------------------------------


def rerank_job(
    run_dir: Path,
    requests: Path,
    out: Path,
    *,
    chunk_size: int = 32,
    use_ray: bool = False,
    ray_actors: int = 1,
    settings: dict[str, Any] | None = None,
) -> JobResult:
    """Answer every line of ``requests`` (JSONL of ``/rerank`` bodies) into ``out`` (JSONL, same order).

    A line that is not a valid request gets an ``error`` line (what ``/rerank`` would answer with a 4xx);
    blank lines are skipped (and counted). Output lines: ``{"line": n, "response": {...}}`` or
    ``{"line": n, "error": {"code", "type", "message"}}`` with ``n`` the 1-based input line.
    """
    out = Path(out)
    if out.exists():
        log.info("%s exists: the job is complete (delete it to run again)", out)
        return JobResult(total=sum(1 for _ in open(out, encoding="utf-8")), resumed_from=-1, output=out)
    payloads, blank = [], 0
    with open(requests, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                blank += 1
                continue
            payloads.append(json.dumps({"line": n, "request": raw.strip()}))
    if blank:
        log.info("%s: %d blank lines skipped", requests, blank)
    manifest = read_manifest(Path(run_dir))
    spec = JobSpec("rerank", str(run_dir), service_settings(run_dir, **(settings or {})))
    checkpoint = Checkpoint(out, fingerprint(payloads, run=manifest.get("version"), job="rerank"))
    result = _run_chunks(spec, checkpoint, payloads, chunk_size, use_ray, ray_actors)
    checkpoint.finish()
    return result


# ---- the preferences job ----------------------------------------------------------------------------


def _histories(run_dir: Path, histories: Path | None) -> dict[str, list[str]]:
    """User -> item ids (time order): the run's ``users.json``, overridden/extended by a JSONL file."""
    from rundir.reader import read_catalog, read_users

    catalog = read_catalog(run_dir)
    out = {u: [catalog[i].item_id for i in items] for u, items in read_users(run_dir).items()}
    if histories is not None:
        with open(histories, encoding="utf-8") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    user, items = str(row["user_id"]), [str(i) for i in row["history"]]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise RunDirError(f'{histories}:{n}: expected {{"user_id", "history": [item ids]}}: {e}') from None
                unknown = [i for i in items if i not in catalog]
                if unknown or not items:
                    raise RunDirError(f"{histories}:{n}: user {user}: unknown item ids {unknown[:5]} or empty history")
                out[user] = items
    return out


def preferences_job(
    run_dir: Path,
    *,
    users: list[str] | None = None,
    histories: Path | None = None,
    chunk_size: int = 32,
    use_ray: bool = False,
    ray_actors: int = 1,
    settings: dict[str, Any] | None = None,
) -> JobResult:
    """Regenerate the preference text + vector of ``users`` (default: every user of the run).

    Each chunk goes to Redis (with an external ``DPO4REC_REDIS_URL``: the serving cache, same keys and
    TTL as the service) as it finishes; at the end the run directory's ``preferences.jsonl`` and
    ``preference_vectors.npy`` are rewritten with the new rows (other users keep theirs) and the
    manifest's checksums updated. A killed job resumes from its checkpoint in the run directory.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    all_histories = _histories(run_dir, histories)
    selected = list(dict.fromkeys(users)) if users else list(all_histories)
    missing = [u for u in selected if u not in all_histories]
    if missing:
        raise RunDirError(f"unknown users {missing[:5]}: not in the run's users.json nor in --histories")
    payloads = [json.dumps({"user_id": u, "history": all_histories[u]}) for u in selected]
    spec = JobSpec("preferences", str(run_dir), service_settings(run_dir, **(settings or {})))
    checkpoint = Checkpoint(
        run_dir / PREFERENCES_CHECKPOINT, fingerprint(payloads, run=manifest.get("version"), job="preferences")
    )
    result = _run_chunks(spec, checkpoint, payloads, chunk_size, use_ray, ray_actors)
    _merge_preferences(run_dir, checkpoint.lines())
    checkpoint.discard()
    return JobResult(total=result.total, resumed_from=result.resumed_from, output=run_dir / TEXTS)


def _merge_preferences(run_dir: Path, lines: Iterable[str]) -> None:
    """New rows over the run's preferences; files replaced by rename, then the manifest re-checksummed.

    Idempotent: if a kill lands between the renames, running the job again redoes the same merge.
    """
    from rundir.preferences import load_preferences, replace_preferences

    texts, vectors = load_preferences(run_dir)
    rows = {u: i for i, u in enumerate(texts)}
    new_vectors: list[np.ndarray] = []
    appended: list[str] = []
    for line in lines:
        row = json.loads(line)
        user, vec = row["user_id"], np.asarray(row["vector"], dtype=np.float32)
        if vec.shape != (vectors.shape[1],):
            raise RunDirError(f"refreshed vector of {user} is {vec.shape}, the run's are ({vectors.shape[1]},)")
        if user in rows:
            vectors[rows[user]] = vec
        else:
            rows[user] = len(texts)
            appended.append(user)
            new_vectors.append(vec)
        texts[user] = row["text"]
    if new_vectors:
        vectors = np.concatenate([vectors, np.stack(new_vectors)])
    replace_preferences(run_dir, texts, vectors)
    log.info("run %s: %d preferences (%d new users)", run_dir, len(texts), len(appended))
