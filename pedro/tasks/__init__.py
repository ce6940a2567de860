"""The task registry: ``get_task("sst2")``, ``get_task("jsonl:my/dir")``; ``register_task`` adds your own."""

from __future__ import annotations

from pathlib import Path

from pedro.tasks.base import Example, Task, TaskDataMissing, accuracy, macro_f1
from pedro.tasks.conala import CoNaLa, conala_bleu, tokenize_for_bleu_eval
from pedro.tasks.e2e import E2E, bleu_rouge
from pedro.tasks.glue import RTE, SST2
from pedro.tasks.gsm8k import GSM8K, final_number
from pedro.tasks.jsonl import JsonlTask
from pedro.tasks.trec import TREC

TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Add a Task subclass under its ``name`` (usable as a class decorator)."""
    if not task.name or task.name.startswith("jsonl:"):
        raise ValueError(f"a registered task needs a plain name, got {task.name!r}")
    TASKS[task.name] = task
    return task


for _task in (SST2, RTE, GSM8K, E2E, TREC, CoNaLa):
    register_task(_task)


def get_task(name: str, data_dir: str | Path | None = None) -> Task:
    """A task by registry name, or ``jsonl:DIR`` for a folder of ``<split>.jsonl`` files."""
    if name.startswith("jsonl:"):
        return JsonlTask(name.split(":", 1)[1])
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} or jsonl:DIR")
    return TASKS[name](data_dir)


__all__ = [
    "TASKS",
    "Example",
    "JsonlTask",
    "Task",
    "TaskDataMissing",
    "accuracy",
    "bleu_rouge",
    "conala_bleu",
    "final_number",
    "get_task",
    "macro_f1",
    "register_task",
    "tokenize_for_bleu_eval",
]
