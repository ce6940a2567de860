"""What a task is: how to read its splits into (prompt, response) examples, and how to score predictions.

A task is deliberately small (one file each) because users bring their own: subclass ``Task``, implement
``load``, and register it. Two kinds exist, and evaluation treats them differently:

- ``choice``: each example lists ``options`` and the index of the right one; the model is scored by
  log-likelihood ranking (the summed log-probability of each option's tokens after the prompt; the highest
  wins), so a classifier is never penalised for phrasing its answer differently.
- ``generate``: the model writes greedily up to ``max_new_tokens``; ``score`` compares the texts with the
  references (exact match, a number, BLEU/ROUGE-L ...).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import cast

from pedro.records import Example

DATA_ENV = "PEDRO_DATA_DIR"


class TaskDataMissing(FileNotFoundError):
    """The task's files are not where they were looked for (the message says where and in what format)."""


def default_data_dir() -> Path:
    """The task data folder when none is given (``--data-dir``): ``$PEDRO_DATA_DIR``, else ``../shared/data``
    from the working directory."""
    configured = os.environ.get(DATA_ENV)
    return Path(configured) if configured else Path.cwd().parent / "shared" / "data"


class Task(ABC):
    """A named data set with a train and a test split, a prompt format and a metric."""

    name: str = ""
    kind: str = "generate"  # or "choice"
    metric: str = "accuracy"  # the headline key of score()'s result
    folder: str = ""  # sub-folder of the data dir
    files: dict[str, str] = {}  # split -> file name inside the folder
    data_format: str = ""  # one sentence for the "data missing" message
    max_new_tokens: int = 32

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None

    @property
    def splits(self) -> list[str]:
        return list(self.files)

    def path(self, split: str) -> Path:
        """The file of ``split``, or an error naming every place it was looked for and the expected format."""
        if split not in self.files:
            raise ValueError(f"task {self.name!r} has splits {self.splits}, not {split!r}")
        root = self.data_dir if self.data_dir is not None else default_data_dir()
        candidate = root / self.folder / self.files[split]
        if candidate.is_file():
            return candidate
        source = (
            "--data-dir"
            if self.data_dir is not None
            else f"${DATA_ENV}"
            if os.environ.get(DATA_ENV)
            else (f"the default ../shared/data; set ${DATA_ENV} or pass --data-dir")
        )
        raise TaskDataMissing(
            f"task {self.name!r} needs its {split!r} split at {candidate} (from {source}). Expected format: "
            f"{self.data_format} Point --data-dir or ${DATA_ENV} to the folder that holds {self.folder}/."
        )

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        """The first ``limit`` examples of ``split`` (all when None), in file order."""
        examples = self.read(self.path(split), split)
        if not examples:
            raise ValueError(f"task {self.name!r}: {self.path(split)} holds no examples")
        return examples[:limit] if limit is not None else examples

    @abstractmethod
    def read(self, path: Path, split: str) -> list[Example]:
        """Parse one split file."""

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Score generated texts (``generate`` tasks); choice tasks are scored by evaluation itself."""
        raise NotImplementedError(f"task {self.name!r} is a {self.kind} task and has no text metric")

    def item_statistics(self, predictions: list[str], examples: list[Example]) -> list[list[int]] | None:
        """Per prediction, the statistics whose column sums give the headline metric (``metric_from``); None
        where the metric is not such a sum. A corpus metric (BLEU) is then scored on a resample of the items by
        adding rows (the quality study's bootstrap)."""
        return None

    def metric_from(self, summed: list[int]) -> float:
        """The headline metric from the column sums of ``item_statistics`` rows."""
        raise NotImplementedError(f"task {self.name!r} has no per-item statistics")


def accuracy(predicted: list[int], examples: list[Example]) -> dict[str, float]:
    """Fraction of choice examples whose predicted option index is the label."""
    if len(predicted) != len(examples):
        raise ValueError(f"{len(predicted)} predictions for {len(examples)} examples")
    correct = sum(int(p == e.label) for p, e in zip(predicted, examples))
    return {"accuracy": correct / len(examples) if examples else 0.0}


def macro_f1(predicted: list[int], examples: list[Example]) -> dict[str, float]:
    """``{"macro_f1": ...}`` when every example offers the same options (a fixed set of classes), else ``{}``
    (with options that change per example, as in multiple-choice QA, option indices are not classes).

    F1 per class, averaged with equal weight over the classes that occur as a label or a prediction (as
    scikit-learn's ``f1_score(average="macro")``); a class never predicted correctly counts 0.
    """
    if len(predicted) != len(examples):
        raise ValueError(f"{len(predicted)} predictions for {len(examples)} examples")
    if not examples or any(e.options != examples[0].options for e in examples):
        return {}
    gold = cast(list[int], [e.label for e in examples])  # choice examples always carry a label
    scores = []
    for cls in sorted(set(gold) | set(predicted)):
        true_pos = sum(int(p == g == cls) for p, g in zip(predicted, gold))
        n_pred, n_gold = predicted.count(cls), gold.count(cls)
        scores.append(2 * true_pos / (n_pred + n_gold))  # = 2PR / (P + R), and 0 when true_pos is 0
    return {"macro_f1": sum(scores) / len(scores)}
