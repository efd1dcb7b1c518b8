"""The README's settings tables, generated from the field descriptions of the pydantic-settings classes.

Each table sits in README.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``; a field's
``description`` is its row's meaning, so the code is the one place a setting is explained and
``tests/service/test_settings_table.py`` fails when the README drifts from it::

    python -m scripts.settings_table           # print the tables
    python -m scripts.settings_table --write   # rewrite README.md's blocks in place (from the repo root)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from dpo4rec.batch import RaySettings
from service.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES: dict[str, type[BaseSettings]] = {  # marker name -> the class it documents
    "settings-table": Settings,  # the service (### Configuration)
    "ray-settings-table": RaySettings,  # the batch jobs' Ray path (## Batch jobs)
}


def variables(cls: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables a field is read from: its alias(es), else the class's prefix + its name."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    if isinstance(alias, str):
        return [alias]
    return [(str(cls.model_config.get("env_prefix", "")) + name).upper()]


def default_text(field: FieldInfo) -> str:
    """A default as a reader types it: ``required``, ``unset`` (None), lowercase booleans, lists as commas."""
    if field.is_required():
        return "required"
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(str(v) for v in value) or "empty"
    return str(value)


def settings_table(cls: type[BaseSettings]) -> str:
    """``| variable | default | meaning |``, one row per field in declaration order."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        names = " or ".join(f"`{v}`" for v in variables(cls, name, field))
        rows.append(f"| {names} | {_cell(default_text(field))} | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def block(text: str, name: str) -> str:
    """What stands between the markers of ``name`` (without them)."""
    start, end = _markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {start} ... {end} block in the README")
    return text[i + len(start) : j]


def rendered(name: str) -> str:
    """The block of ``name`` as the generator writes it: its table, a blank line on each side."""
    return "\n\n" + settings_table(TABLES[name]) + "\n"


def with_block(text: str, name: str) -> str:
    """``text`` with the block of ``name`` replaced by its generated table."""
    start = _markers(name)[0]
    i = text.find(start) + len(start)
    return text[:i] + rendered(name) + text[i + len(block(text, name)) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the blocks of README.md in place")
    args = parser.parse_args()
    if not args.write:
        for name, cls in TABLES.items():
            print(f"{name} ({cls.__module__}.{cls.__name__}):\n\n{settings_table(cls)}")
        return
    text = README.read_text(encoding="utf-8")
    new = text
    for name in TABLES:
        new = with_block(new, name)
    if new != text:
        README.write_text(new, encoding="utf-8")
    print(f"{README}: {'rewritten' if new != text else 'already up to date'}")


if __name__ == "__main__":
    main()
