"""The item catalog and its id vocabulary.

External item ids (strings, as in the data files) map to dense internal indices ``1..N``;
index 0 is padding, as in RecBole's SASRec (``padding_idx=0``). The catalog is what the service
shows (titles, genres, year) and what the prompts describe.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PAD = 0


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    genres: tuple[str, ...] = ()
    year: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # other text fields, e.g. brand


class UnknownItemError(KeyError):
    """Raised with the offending external ids when items are not in the catalog."""

    def __init__(self, item_ids: Sequence[str]):
        self.item_ids = list(item_ids)
        super().__init__(f"unknown item ids: {', '.join(map(str, self.item_ids[:20]))}")


class Catalog:
    """Items in index order; ``catalog[i]`` is the item with internal index ``i`` (1-based)."""

    def __init__(self, items: Iterable[Item]):
        self._items: list[Item] = list(items)
        self._index: dict[str, int] = {}
        for i, item in enumerate(self._items, start=1):
            if item.item_id in self._index:
                raise ValueError(f"duplicate item id {item.item_id!r} in catalog")
            self._index[item.item_id] = i

    def __len__(self) -> int:
        """Number of real items N (indices 1..N)."""
        return len(self._items)

    @property
    def num_embeddings(self) -> int:
        """Rows an embedding table needs: N items plus the padding row."""
        return len(self._items) + 1

    def __getitem__(self, index: int) -> Item:
        if not 1 <= index <= len(self._items):
            raise IndexError(f"item index {index} outside 1..{len(self._items)}")
        return self._items[index - 1]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def index_of(self, item_id: str) -> int:
        try:
            return self._index[item_id]
        except KeyError:
            raise UnknownItemError([item_id]) from None

    def indices_of(self, item_ids: Sequence[str]) -> list[int]:
        """Internal indices of ``item_ids``; raises :class:`UnknownItemError` naming every unknown id."""
        unknown = [i for i in item_ids if i not in self._index]
        if unknown:
            raise UnknownItemError(unknown)
        return [self._index[i] for i in item_ids]

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self._items]

    def save(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for item in self._items:
                f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> Catalog:
        items = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                row["genres"] = tuple(row.get("genres") or ())
                items.append(Item(**row))
        return cls(items)
