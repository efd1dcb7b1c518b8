"""What a shed answer costs the API process, with and without admission's early check, in one run.

From the repository root:

    python -m benchmarks.shed_path --run runs/small --fusion-weight 1

Opens the service in this process (``service.main.create_app``: the run, embedded Redis, the real vLLM
engine), makes admission see a saturated engine (its rate set to 1 prompt token/s, so every re-rank is
shed), and sends ``POST /rerank`` for known users in alternating blocks: the service as it is (the early
check sheds on a lower bound of the prompt tokens, before any prompt is built) and the same service with
that bound set to 0 (the prompts are built and tokenized, then shed: the path before 2026-12-03). Prints
the CPU milliseconds of this process per answer for each, and their ratio. The engine computes nothing
in either, so the CPU is the API's: HTTP (in-process), validation, retrieval, and the prompts or not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.service_bench import UserStream
from benchmarks.support import ENV_DEFAULTS, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="run directory to serve")
    parser.add_argument("--fusion-weight", type=float, default=1.0, help="DPO4REC_FUSION_WEIGHT (the LLM on)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per variant, alternating")
    parser.add_argument("--block-size", type=int, default=50, help="requests per block")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shed_path.json"), help="JSON summary")
    args = parser.parse_args()
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["DPO4REC_FUSION_WEIGHT"] = str(args.fusion_weight)
    os.environ["DPO4REC_API_NICE"] = "0"  # alone on the machine: nothing to yield to

    from fastapi.testclient import TestClient

    from service.main import create_app

    stream = UserStream(args.run)
    app = create_app(run_dir=args.run)
    per_answer: dict[str, list[float]] = {"early check": [], "prompts built": []}
    with TestClient(app) as client:
        llm = app.state.service.llm
        llm.admission.rate = 1.0  # a saturated engine: every re-rank is shed
        bound = llm.least_tokens

        def block(variant: str) -> None:
            llm.least_tokens = bound if variant == "early check" else (lambda k, scoring: 0)
            bodies = []
            for _ in range(args.block_size):
                user, history = stream.next()
                bodies.append({"user_id": user, "top_n": 10} | ({"history": history} if history else {}))
            cpu = time.process_time()
            for body in bodies:
                answer = client.post("/rerank", json=body).json()
                if answer.get("degraded") != ["llm_shed"]:
                    raise SystemExit(f"expected a shed answer, got {json.dumps(answer)[:300]}")
            per_answer[variant].append((time.process_time() - cpu) * 1000 / len(bodies))

        block("early check")  # warm-up (not counted): first calls pay imports and caches
        block("prompts built")
        per_answer = {name: [] for name in per_answer}
        for _ in range(args.blocks):
            for variant in per_answer:
                block(variant)
    early, built = (statistics.fmean(per_answer[v]) for v in per_answer)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.shed_path "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": machine(),
        "cpu_ms_per_shed_answer": {name: statistics.fmean(v) for name, v in per_answer.items()},
        "blocks_ms": per_answer,
        "ratio_early_vs_built": early / built,
    }
    print(f"CPU ms per shed answer: early check {early:.2f}, prompts built {built:.2f}, ratio {early / built:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"summary: {args.out}")


if __name__ == "__main__":
    main()
