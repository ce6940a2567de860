"""A task from the user's own JSON-lines files: ``jsonl:DIR`` reads ``DIR/train.jsonl`` and
``DIR/test.jsonl`` (any ``DIR/<split>.jsonl``).

Each line is ``{"prompt": ..., "response": ...}``; with ``"options": [...]`` (and the response being one of
them, or ``"label": index``) the task is a choice task scored by log-likelihood ranking, otherwise the
generated text is scored by normalised exact match against ``response`` (and any ``"references"``).
"""

from __future__ import annotations

import re
from pathlib import Path

from pedro.records import read_jsonl
from pedro.tasks.base import Example, Task, TaskDataMissing


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class JsonlTask(Task):
    data_format = 'JSON lines with "prompt" and "response" (optional "options" list and "label" index).'

    def __init__(self, directory: str | Path) -> None:
        super().__init__(None)
        self.directory = Path(directory)
        self.name = f"jsonl:{directory}"
        self.files = {p.stem: p.name for p in sorted(self.directory.glob("*.jsonl"))}
        examples = self.read(self.path(next(iter(self.files))), "") if self.files else []
        self.kind = "choice" if examples and examples[0].options else "generate"
        self.metric = "accuracy" if self.kind == "choice" else "exact_match"

    def path(self, split: str) -> Path:
        candidate = self.directory / f"{split}.jsonl"
        if not candidate.is_file():
            raise TaskDataMissing(
                f"task {self.name!r} needs {candidate} (found splits {self.splits}). Expected format: {self.data_format}"
            )
        return candidate

    def read(self, path: Path, split: str) -> list[Example]:
        examples = []
        for number, row in read_jsonl(path):
            options = row.get("options")
            if options is None:
                refs = [row["response"], *row.get("references", [])]
                examples.append(Example(row["prompt"], row["response"], references=refs))
                continue
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise ValueError(f'{path}:{number}: "options" must be a list of at least two strings')
            label = row.get("label", options.index(row["response"]) if row["response"] in options else None)
            if not isinstance(label, int) or not 0 <= label < len(options):
                raise ValueError(f'{path}:{number}: give "label" (an option index) or a response that is an option')
            examples.append(Example(row["prompt"], options[label], options=options, label=label))
        return examples

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        hits = sum(
            int(normalize(p) in {normalize(r) for r in e.references})
            for p, e in zip(predictions, examples, strict=True)
        )
        return {"exact_match": hits / len(examples) if examples else 0.0}
