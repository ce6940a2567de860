"""One training or evaluation record: a (prompt, response) pair, and the JSONL reader every data source shares.

The lowest layer of the data path: ``pedro.tasks`` (task files) and ``pedro.data`` (tokenisation, loading) both
build on it, so neither needs the other to describe a record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

Prompt = Union[str, list[dict[str, str]]]  # a plain prompt, or the chat turns before the answer


@dataclass
class Example:
    """One (prompt, response) pair, plus what scoring needs.

    ``response`` is the training target; ``options``/``label`` make it a choice example; ``references`` are
    every acceptable answer of a generation example (several for E2E).
    """

    prompt: Prompt
    response: str
    options: list[str] | None = None
    label: int | None = None
    references: list[str] = field(default_factory=list)
    where: str = field(default="", compare=False)  # where it was read ("file.jsonl:6"), for messages about it


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an error naming file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row
