"""llm.prompts: what the two prompts contain, their order, and their rendering with a chat template."""

from __future__ import annotations

from typing import Any

import pytest

from llm.prompts import (
    HistoryItem,
    PromptConfig,
    answer_message,
    format_item,
    history_text,
    natural_title,
    preference_messages,
    render,
    rerank_messages,
)

CONFIG = PromptConfig()
HISTORY = [HistoryItem(f"Old Movie {i} ({1950 + i})", ("Drama",), year=1950 + i, rating=3.0) for i in range(40)] + [
    HistoryItem("Toy Story (1995)", ("Animation", "Children's", "Comedy"), year=1995, rating=5.0),
    HistoryItem("Heat", ("Action", "Crime"), year=1995, rating=4.5),
]
CANDIDATES = [HistoryItem(f"Candidate {c}", ("Comedy",), year=2000) for c in "PQRST"]
LABELS = ["A", "B", "C", "D", "E"]


def user_text(messages: list[dict[str, str]]) -> str:
    assert [m["role"] for m in messages] == ["system", "user"]
    return messages[1]["content"]


def test_format_item_does_not_repeat_the_year_and_prints_the_rating_scale() -> None:
    line = format_item(HISTORY[-2], CONFIG)
    assert line == "Toy Story (1995) | Animation, Children's, Comedy | rated 5/5"
    assert format_item(HISTORY[-1], CONFIG) == "Heat (1995) | Action, Crime | rated 4.5/5"
    assert "rated" not in format_item(HISTORY[-1], CONFIG, with_rating=False)
    assert format_item(HistoryItem("x" * 500), CONFIG).endswith("...")


@pytest.mark.parametrize(
    ("filed", "natural"),
    [
        ("Clash of the Titans, The (1981)", "The Clash of the Titans (1981)"),
        ("Clash of the Titans, The", "The Clash of the Titans"),
        ("Misérables, Les", "Les Misérables"),
        ("Homme et une femme, Un", "Homme et une femme, Un"),  # not in the article list: unchanged
        ("Appartement, L'", "L'Appartement"),
        ("Truth or Consequences, N.M. (1997)", "Truth or Consequences, N.M. (1997)"),
        ("To Wong Foo, Thanks for Everything! Julie Newmar", "To Wong Foo, Thanks for Everything! Julie Newmar"),
        ("Theater, The Movie", "Theater, The Movie"),
    ],
)
def test_natural_title_moves_a_trailing_article_to_the_front(filed: str, natural: str) -> None:
    assert natural_title(filed) == natural


def test_format_item_prints_catalogue_titles_in_reading_order() -> None:
    line = format_item(HistoryItem("Clash of the Titans, The", ("Action",), year=1981), CONFIG, with_rating=False)
    assert line == "The Clash of the Titans (1981) | Action"
    filed = PromptConfig(natural_titles=False)  # how runs saved before the setting printed them
    line = format_item(HistoryItem("Clash of the Titans, The", ("Action",), year=1981), filed, with_rating=False)
    assert line == "Clash of the Titans, The (1981) | Action"


def test_preference_prompt_shows_the_most_recent_history_and_the_factors() -> None:
    text = user_text(preference_messages(HISTORY, CONFIG))
    shown = HISTORY[-CONFIG.max_history :]
    for item in shown:
        assert item.title in text
    assert "Old Movie 11 (1961)" not in text  # older than the 30 most recent
    assert "Animation, Children's, Comedy" in text and "rated 5/5" in text
    for factor in CONFIG.factors:
        assert factor in text
    assert f"about {CONFIG.preference_words} words" in text
    assert text.index("Old Movie 12") < text.index("Toy Story") < text.index("Heat")  # oldest first


def test_history_text_is_the_prompts_item_lines_without_the_instructions() -> None:
    text = history_text(HISTORY, CONFIG)
    shown = HISTORY[-CONFIG.max_history :]
    assert text == "; ".join(format_item(item, CONFIG) for item in shown)
    prompt = user_text(preference_messages(HISTORY, CONFIG))
    assert all(f"{i}. {format_item(item, CONFIG)}\n" in prompt for i, item in enumerate(shown, start=1))
    assert "Old Movie 11 (1961)" not in text and text.endswith("Heat (1995) | Action, Crime | rated 4.5/5")
    with pytest.raises(ValueError, match="at least one"):
        history_text([], CONFIG)


def test_preference_prompt_without_ratings_does_not_mention_them() -> None:
    text = user_text(preference_messages([HistoryItem("Heat", ("Action",))], CONFIG))
    assert "rating" not in text and "rated" not in text


def test_rerank_prompt_puts_user_parts_before_the_candidates() -> None:
    messages = rerank_messages("Loves animated comedies.", HISTORY, CANDIDATES, LABELS, CONFIG)
    text = user_text(messages)
    assert text.index("Loves animated comedies.") < text.index("Heat") < text.index("Candidates:")
    assert "Old Movie 31" not in text  # only the 10 most recent
    assert "Old Movie 32" in text
    for label, item in zip(LABELS, CANDIDATES, strict=True):
        assert f"\n{label}. {item.title} (2000) | Comedy" in text
    assert text.rstrip().endswith("Answer with one label from A to E.")


def test_rerank_prompt_is_a_pure_function_with_a_stable_prefix_per_user() -> None:
    history = list(HISTORY)
    first = rerank_messages("p", history, CANDIDATES, LABELS, CONFIG)
    assert first == rerank_messages("p", history, CANDIDATES, LABELS, CONFIG)
    assert history == HISTORY
    other = rerank_messages("p", history, CANDIDATES[::-1], LABELS, CONFIG)
    prefix = user_text(first).split("Candidates:")[0]
    assert user_text(other).startswith(prefix)  # only the candidate block differs: prefix cache hits


@pytest.mark.parametrize(
    "labels, candidates, message",
    [
        (["A", "B"], CANDIDATES, "labels"),
        ([], [], "at least one candidate"),
        (["A", "A", "B", "C", "D"], CANDIDATES, "distinct"),
    ],
)
def test_rerank_prompt_rejects_bad_labels(labels: list[str], candidates: list[HistoryItem], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rerank_messages("p", [], candidates, labels, CONFIG)


def test_long_preference_is_cut_and_empty_history_is_allowed_for_rerank() -> None:
    text = user_text(rerank_messages("word " * 1000, [], CANDIDATES, LABELS, CONFIG))
    assert "recently" not in text
    assert len(text) < 1500


def test_config_validation_and_yaml_friendly_lists() -> None:
    assert PromptConfig(factors=["genre", "mood"]).factors == ("genre", "mood")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="factors"):
        PromptConfig(factors=())
    with pytest.raises(ValueError, match="max_history"):
        PromptConfig(max_history=0)
    with pytest.raises(ValueError, match="at least one history item"):
        preference_messages([], CONFIG)


def test_render_ends_where_the_answer_begins(smollm2_tokenizer: Any) -> None:
    messages = rerank_messages("Loves comedies.", HISTORY, CANDIDATES, LABELS, CONFIG)
    text = render(smollm2_tokenizer, messages)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("Answer with one label from A to E.<|im_end|>\n<|im_start|>assistant\n")
    # The training view (prompt + answer) extends the serving prompt with the label.
    full = render(smollm2_tokenizer, [*messages, answer_message("C")], add_generation_prompt=False)
    assert full.startswith(text) and full[len(text) :].startswith("C<|im_end|>")


def test_render_without_chat_template_is_a_clear_error() -> None:
    class Plain:
        chat_template = None
        name_or_path = "plain"

    with pytest.raises(ValueError, match="no chat template"):
        render(Plain(), [{"role": "user", "content": "hi"}])
