"""Prompt templates for the LLM's two jobs, as chat messages, and their rendering.

- preference job (DPO4Rec, Sun et al., arXiv 2410.05939, section 3.1): the user's interaction history
  (titles, genres, year, rating) -> a short free-text description of their tastes along named factors;
- re-rank job (the verbalizer of LlamaRec, Yue et al., arXiv 2311.02089): preference text + recent
  history + a lettered candidate list -> the label of the item the user picks next. The assistant
  answer is the label alone, so the label is the first generated token and one forward pass scores
  every candidate (see ``llm.labels`` and ``llm.engine.score_labels``).

Every function here is a pure function of its inputs: training (TRL) and serving (vLLM) build the very
same messages, so the prompt seen at training time is the prompt served. Message order matters for
vLLM's prefix cache: fixed instructions first, then what is stable per user (preference, recent
history), the candidate list last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class HistoryItem:
    """One item as the LLM sees it: text fields only, no ids."""

    title: str
    genres: tuple[str, ...] = ()
    year: int | None = None
    rating: float | None = None  # the user's explicit rating; None for implicit feedback


@dataclass(frozen=True)
class PromptConfig:
    """Settings of both prompt templates. Saved with a run (``llm.json``) so serving matches training."""

    item_noun: str = "movie"
    item_noun_plural: str = "movies"
    interaction_verb: str = "watched"  # past tense: "a user has watched ..."
    max_history: int = 30  # most recent items in the preference prompt
    max_recent: int = 10  # most recent items in the re-rank prompt
    factors: tuple[str, ...] = ("genre", "era", "mood", "themes", "audience")
    preference_words: int = 80  # asked-for length of the preference text
    rating_scale: float | None = 5.0  # ratings print as "4/5"; None prints the bare number
    max_title_chars: int = 80  # long product titles are cut, keeping prompts bounded
    max_preference_chars: int = 1000  # the preference text in the re-rank prompt is cut to this
    # "Clash of the Titans, The" prints as "The Clash of the Titans" (natural_title). Runs saved before this
    # setting existed printed catalogue order; rundir/reader.py reads a missing field as False.
    natural_titles: bool = True
    system_preference: str = field(default="You are an expert in {noun} recommendation. You analyse what a user likes.")
    system_rerank: str = field(
        default=(
            "You are a {noun} recommender. Given a user's preferences, the {nouns} they "
            "{verb} recently and a list of labelled candidates, answer with the label of the "
            "candidate the user is most likely to pick next. Answer with the label only."
        )
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(self.factors))  # lists from YAML/JSON
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.max_recent < 0:
            raise ValueError(f"max_recent must be >= 0, got {self.max_recent}")
        if not self.factors:
            raise ValueError("factors must name at least one preference factor, e.g. ('genre',)")
        if self.preference_words < 10:
            raise ValueError(f"preference_words must be >= 10, got {self.preference_words}")
        if self.max_title_chars < 8 or self.max_preference_chars < 16:
            raise ValueError("max_title_chars must be >= 8 and max_preference_chars >= 16")


def format_item(item: HistoryItem, config: PromptConfig, with_rating: bool = True) -> str:
    """One line of text for an item: ``Title (1995) | Animation, Comedy | rated 4/5``."""
    title = " ".join(item.title.split())
    title = _cut(natural_title(title) if config.natural_titles else title, config.max_title_chars)
    # MovieLens titles already end with "(1995)": do not say the year twice.
    if item.year is not None and f"({item.year})" not in title:
        title = f"{title} ({item.year})"
    parts = [title]
    if item.genres:
        parts.append(", ".join(item.genres))
    if with_rating and item.rating is not None:
        parts.append(
            f"rated {_number(item.rating)}" + (f"/{_number(config.rating_scale)}" if config.rating_scale else "")
        )
    return " | ".join(parts)


# Library catalogues (MovieLens among them) file titles under their first significant word:
# "Clash of the Titans, The (1981)", "Misérables, Les". A small LLM reading those copies "The (1981)".
_TRAILING_ARTICLE = re.compile(
    r"^(?P<body>.+?), (?P<article>The|A|An|La|Le|Les|L'|Il|El|Los|Las|Der|Die|Das|Det|Den)(?P<rest> \(.*\))?$"
)


def natural_title(title: str) -> str:
    """``"Clash of the Titans, The (1981)"`` -> ``"The Clash of the Titans (1981)"``; other titles unchanged."""
    match = _TRAILING_ARTICLE.match(title)
    if match is None:
        return title
    article = match["article"]
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{match['body']}{match['rest'] or ''}"


def preference_messages(history: Sequence[HistoryItem], config: PromptConfig) -> list[Message]:
    """Chat messages asking for the user's preferences from their history (oldest first).

    Only the ``config.max_history`` most recent items are shown. Keeping the test item out of
    ``history`` is the caller's job.
    """
    if not history:
        raise ValueError("preference_messages needs at least one history item")
    shown = list(history)[-config.max_history :]
    lines = "\n".join(f"{i}. {format_item(item, config)}" for i, item in enumerate(shown, start=1))
    factors = ", ".join(config.factors)
    user = (
        f"Here are the {config.item_noun_plural} a user has {config.interaction_verb}, oldest first"
        f"{_rating_note(shown, config)}:\n{lines}\n\n"
        f"Describe this user's preferences along these factors: {factors}. "
        f"Reason about what the {config.item_noun_plural} have in common; do not list titles. "
        f"Answer in about {config.preference_words} words."
    )
    return [_system(config.system_preference, config), {"role": "user", "content": user}]


def history_text(history: Sequence[HistoryItem], config: PromptConfig) -> str:
    """The items the preference prompt shows, as one line, oldest first: the no-LLM control text
    (``llm.preference_source: history``), so a run can tell what the LLM adds to its own input."""
    if not history:
        raise ValueError("history_text needs at least one history item")
    return "; ".join(format_item(item, config) for item in list(history)[-config.max_history :])


def rerank_messages(
    preference: str,
    recent: Sequence[HistoryItem],
    candidates: Sequence[HistoryItem],
    labels: Sequence[str],
    config: PromptConfig,
) -> list[Message]:
    """Chat messages asking which candidate the user picks next; the answer is one label.

    Layout, for the prefix cache: system instructions, then the user's preference text and recent
    history (stable per user), then the candidate list ``"<label>. <item>"`` and the question.
    """
    if len(labels) != len(candidates):
        raise ValueError(f"got {len(candidates)} candidates but {len(labels)} labels")
    if not candidates:
        raise ValueError("rerank_messages needs at least one candidate")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {list(labels)}")
    text = _cut(" ".join(preference.split()), config.max_preference_chars) or "(unknown)"
    shown = list(recent)[-config.max_recent :] if config.max_recent else []
    parts = [f"User preferences: {text}"]
    if shown:
        lines = "\n".join(f"- {format_item(item, config)}" for item in shown)
        parts.append(
            f"{config.item_noun_plural.capitalize()} {config.interaction_verb} recently, oldest first:\n{lines}"
        )
    options = "\n".join(
        f"{label}. {format_item(item, config, with_rating=False)}"
        for label, item in zip(labels, candidates, strict=True)
    )
    parts.append(f"Candidates:\n{options}")
    parts.append(
        f"Which candidate will the user pick next? Answer with one label from {labels[0]} to {labels[-1]}."
        if len(labels) > 1
        else f"Answer with {labels[0]}."
    )
    return [_system(config.system_rerank, config), {"role": "user", "content": "\n\n".join(parts)}]


def answer_message(text: str) -> Message:
    """The assistant turn for training targets (a preference text, or a re-rank label)."""
    return {"role": "assistant", "content": text}


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` with the tokenizer's chat template.

    With ``add_generation_prompt`` the text ends where the assistant's answer begins, so for a re-rank
    prompt the next token is the label. Tokenize it with ``add_special_tokens=False``: the template
    already holds any BOS it wants.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use an instruction-tuned model folder (tokenizer_config.json or chat_template.jinja)"
        )
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _system(template: str, config: PromptConfig) -> Message:
    content = template.format(noun=config.item_noun, nouns=config.item_noun_plural, verb=config.interaction_verb)
    return {"role": "system", "content": content}


def _rating_note(items: Sequence[HistoryItem], config: PromptConfig) -> str:
    if not any(item.rating is not None for item in items):
        return ""
    scale = f" (1 to {_number(config.rating_scale)})" if config.rating_scale else ""
    return f", with the user's rating{scale}"


def _number(value: float | None) -> str:
    return "" if value is None else (f"{value:.0f}" if float(value).is_integer() else f"{value:g}")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
