"""SST-2 (sentiment) and RTE (entailment) from GLUE, as choice tasks scored by log-likelihood ranking."""

from __future__ import annotations

import csv
from pathlib import Path

from pedro.tasks.base import Example, Task


def read_tsv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    """GLUE's tab-separated files (header row, no quoting: sentences contain quote characters)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and any(column not in rows[0] for column in required):
        raise ValueError(f"{path}: expected columns {list(required)}, found {list(rows[0])}")
    return rows


class SST2(Task):
    name = "sst2"
    kind = "choice"
    folder = "sst2"
    files = {"train": "train.tsv", "test": "dev.tsv"}
    data_format = "tab-separated with a header; columns label (0 negative, 1 positive) and sentence (dev: content)."
    options = ["negative", "positive"]

    def read(self, path: Path, split: str) -> list[Example]:
        rows = read_tsv(path, ("label",))
        return [
            Example(
                prompt=f"Is the sentiment of this movie review positive or negative?\nReview: {text.strip()}",
                response=self.options[int(row["label"])],
                options=self.options,
                label=int(row["label"]),
            )
            for row in rows
            for text in [row.get("sentence") or row.get("content") or ""]
        ]


class RTE(Task):
    name = "rte"
    kind = "choice"
    folder = "rte"
    files = {"train": "train.tsv", "test": "dev.tsv"}
    data_format = "tab-separated with a header; columns sentence1, sentence2, label (0 entailment, 1 not)."
    options = ["yes", "no"]

    def read(self, path: Path, split: str) -> list[Example]:
        rows = read_tsv(path, ("sentence1", "sentence2", "label"))
        return [
            Example(
                prompt=(
                    f"Premise: {row['sentence1'].strip()}\nHypothesis: {row['sentence2'].strip()}\n"
                    "Does the premise entail the hypothesis? Answer yes or no."
                ),
                response=self.options[int(row["label"])],
                options=self.options,
                label=int(row["label"]),
            )
            for row in rows
        ]
