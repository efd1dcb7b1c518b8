"""The bare re-rank engine's throughput by engine step size and concurrency, one fresh engine per step size.

From the repository root:

    python -m benchmarks.engine_steps --run runs/small --steps 1024,null,512 --concurrency 4,16

For each ``--steps`` value (``DPO4REC_MAX_NUM_BATCHED_TOKENS``: prompt tokens per engine step; ``null`` is
vLLM's default, 2048 on a CPU) it starts the service's re-rank engine (``service.engines.engine_config``
and ``served_jobs``, the run's weights, fusion weight forced to 1), then scores re-rank prompts at each
``--concurrency`` in a closed loop of ``--seconds``, like the service benchmark's bare levels. The prompts
are the service's (its builder, ``llm.rerank_prompts``): a user of the run, their preference text (or the
history stand-in, cut) and recent items, and ten random catalog items, one prompt per candidate order of the
run's scoring, so the prefix cache helps only with the shared instructions and a list's own orders. Prints
one JSON line per level (prompts/s, latency, CPU seconds of the engine's processes) and writes them all
to ``--out``. Other environment (``GOMP_SPINCOUNT``, ...) reaches the engine's processes as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.service_bench import parse_ints
from benchmarks.support import ENV_DEFAULTS, cpu_between, machine, tree_cpu


def parse_steps(text: str) -> list[int | None]:
    return [None if x.strip() == "null" else int(x) for x in text.split(",") if x.strip()]


def prompts(
    run: Path, tokenizer: Any, spec: Any, settings: Any, n: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """``n`` distinct re-rank prompts (token ids) of ten candidates, and the label token ids: built by the
    service's builder (``llm.rerank_prompts``, as ``LanguageModel.rerank_prompts``), one per candidate order of
    the run's scoring; a user without a precomputed preference gets the service's history stand-in, cut."""
    from llm.labels import candidate_labels
    from llm.prompts import history_text
    from llm.rerank_prompts import RerankPromptBuilder
    from rundir.items import prompt_items
    from rundir.preferences import load_preferences
    from rundir.reader import read_catalog, read_users
    from service.engines import served_scoring

    catalog, users = read_catalog(run), read_users(run)
    texts, _ = load_preferences(run)
    builder = RerankPromptBuilder(tokenizer, spec.prompt, candidate_labels(tokenizer, 10))
    permutations = served_scoring(settings, spec).permutations
    cfg = spec.prompt
    rng = random.Random(seed)

    out: list[list[int]] = []
    while len(out) < n:
        user = rng.choice(list(users))
        history = prompt_items(catalog, users[user])
        recent = history[-cfg.max_recent :] if cfg.max_recent else []
        candidates = prompt_items(catalog, rng.sample(range(1, len(catalog)), 10))
        if user in texts:
            prepared = builder.build(texts[user], recent, candidates, permutations)
        else:  # a miss: the service answers with the history stand-in, cut in the prompt
            stand_in = history_text(history, cfg)
            prepared = builder.build(stand_in, recent, candidates, permutations, settings.stand_in_prompt_chars)
        out += prepared.token_ids
    return out[:n], [i for _, i in builder.labels]  # the ten labels, position order


async def one_engine(run: Path, steps: int | None, levels: list[int], seconds: float, n: int) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from llm.engine import ascore_labels, async_engine, make_lora
    from rundir.reader import load_llm_spec
    from service.engines import engine_config, model_folder, served_jobs
    from service.settings import Settings

    settings = Settings(run_dir=run, fusion_weight=1.0, max_num_batched_tokens=steps)  # type: ignore[call-arg]
    spec = load_llm_spec(run, [])
    model_dir = model_folder(settings, spec)
    texts, label_ids = prompts(run, AutoTokenizer.from_pretrained(str(model_dir)), spec, settings, n, seed=0)
    weights = served_jobs(settings, spec, model_dir)["rerank"]
    cfg = engine_config(settings, spec, weights.model, weights.lora is not None)
    lora = make_lora("rerank", weights.lora, 1) if weights.lora is not None else None
    rows = []
    async with async_engine(cfg) as engine:
        pending = iter(texts)
        for prompt in [next(pending) for _ in range(8)]:  # warm-up, not counted
            await ascore_labels(engine, prompt, label_ids, uuid.uuid4().hex, lora)
        for concurrency in levels:
            done: list[float] = []
            cpu = tree_cpu(os.getpid())
            start = time.perf_counter()

            async def worker(start: float = start, done: list[float] = done) -> None:
                for prompt in pending:
                    if time.perf_counter() - start > seconds:
                        return
                    begin = time.perf_counter()
                    await ascore_labels(engine, prompt, label_ids, uuid.uuid4().hex, lora)
                    done.append(time.perf_counter() - begin)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - start
            row = {
                "max_num_batched_tokens": steps,
                "engine_step_tokens": cfg.max_num_batched_tokens,
                "concurrency": concurrency,
                "prompts": len(done),
                "wall_s": round(wall, 2),
                "prompts_per_s": round(len(done) / wall, 3),
                "latency_s_p50": round(statistics.median(done), 3) if done else None,
                "latency_s_max": round(max(done), 3) if done else None,
                "cpu_s": cpu_between(cpu, tree_cpu(os.getpid())),  # "root": this process (the engine's client)
                "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run directory whose re-rank engine to start")
    parser.add_argument("--steps", type=parse_steps, default=[512, None], help="step sizes, comma-separated")
    parser.add_argument("--concurrency", type=parse_ints, default=[4, 16], help="levels, comma-separated")
    parser.add_argument("--seconds", type=float, default=25.0, help="closed loop per level")
    parser.add_argument("--prompts", type=int, default=400, help="distinct prompts per engine (upper bound)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_steps.json"), help="JSON")
    args = parser.parse_args()
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)

    async def every_engine() -> list[dict[str, Any]]:
        rows = []
        for steps in args.steps:  # one engine at a time: they would share the cores
            rows += await one_engine(args.run.resolve(), steps, args.concurrency, args.seconds, args.prompts)
        return rows

    rows = asyncio.run(every_engine())
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.engine_steps "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": machine(),
        "levels": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"summary: {args.out}")


if __name__ == "__main__":
    main()
