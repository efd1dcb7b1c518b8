"""The tiny end-to-end run shared by test_pipeline and test_loop: a generated data set where each user
mostly watches one genre, and a loop configuration (tiny random LLM, one DPO round, the re-rank job)
small enough for minutes on this CPU. One run serves both modules (tests/training/conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

GENRES = ["Comedy", "Drama", "Horror", "Sci-Fi", "Romance"]


def write_tiny_dataset(folder: Path, users: int = 40, items: int = 80, seed: int = 0) -> Path:
    """RecBole atomic files where each user mostly watches one genre, in a time order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tiny.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for i in range(1, items + 1):
            f.write(f"{i}\tMovie {i}\t{1980 + i % 30}\t{GENRES[i % len(GENRES)]}\n")
    with open(folder / "tiny.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for u in range(users):
            genre = u % len(GENRES)
            liked = [i for i in range(1, items + 1) if i % len(GENRES) == genre]
            picks = rng.sample(liked, 10) + rng.sample(range(1, items + 1), 4)
            for t, item in enumerate(picks):
                f.write(f"u{u}\t{item}\t{rng.randint(1, 5)}\t{1000 + t}\n")
    return folder


# lr and beta far above the paper's so that a handful of steps on a random tiny model moves something.
TRAIN = {
    "learning_rate": 1e-3,
    "batch_size": 4,
    "grad_accum": 1,
    "warmup": 0,
    "lr_scheduler": "constant",
    "max_length": 512,
    "max_prompt_length": 480,
    "lora_r": 8,
    "lora_alpha": 16,
}


def tiny_loop_config(data: Path, cache: Path, llm_dir: Path) -> dict[str, Any]:
    return {
        "data": {"name": str(data), "data_dir": str(cache)},
        # engine_adapters=lora: one engine scores zero-shot, SFT and SFT+DPO (merged weights would start
        # three); the merged path is checked by test_merged_policy_is_a_float32_model_folder.
        "llm": {
            "model": str(llm_dir),
            "max_tokens": 16,
            "max_model_len": 1024,
            "history_items": 8,
            "engine_adapters": "lora",
        },
        # trained long enough that the preference vector moves ranks: else every sample ties, no pairs
        # concat, unmasked: a random-init fusion moves ranks from the first step (residual starts at zero)
        "retriever": {
            "epochs": 50,
            "patience": 50,
            "hidden": 32,
            "max_len": 12,
            "adaptor_hidden": 16,
            "fusion": "concat",
            "mask_described": False,
        },
        "eval": {"bootstrap": 50},
        "preference_dpo": {
            "rounds": 1,
            "samples_per_user": 2,
            "temperature": 1.0,
            "max_tokens": 16,
            "reward_k": None,  # NDCG over the full ranking: fewer ties than @10
            "train": {**TRAIN, "max_steps": 3, "beta": 0.1},
        },
        "rerank": {
            "enabled": True,
            "k": 5,
            "positions_per_user": 2,
            "train_lists": 8,
            "dpo_rejected": 2,
            "calibration_lists": 3,
            "calibration_shifts": 2,
            "permutations": 2,
            "fusion_weights": [0.0, 0.5, 1.0],
            "recent_items": 3,
            "preference_chars": 200,
            "sft": {**TRAIN, "max_steps": 2},
            "dpo": {**TRAIN, "max_steps": 2},
        },
    }
