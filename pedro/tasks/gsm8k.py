"""GSM8K: grade-school math; the model writes a worked solution ending in ``#### N``; scored by exact match
of the final number."""

from __future__ import annotations

import re
from pathlib import Path

from pedro.records import read_jsonl
from pedro.tasks.base import Example, Task

_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer a solution commits to: the number after the last ``####``, else the last number in the
    text; commas and a trailing ``.0`` removed so ``1,000`` and ``1000.0`` both read ``1000``."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


class GSM8K(Task):
    name = "gsm8k"
    kind = "generate"
    metric = "exact_match"
    folder = "gsm8k"
    files = {"train": "train.jsonl", "test": "test.jsonl"}
    data_format = 'JSON lines with "question" and "answer" (a worked solution whose last line is "#### N").'
    max_new_tokens = 160

    def read(self, path: Path, split: str) -> list[Example]:
        examples = []
        for number, row in read_jsonl(path):
            try:
                question, answer = row["question"], row["answer"]
            except KeyError as err:
                raise ValueError(f"{path}:{number}: not a GSM8K record (missing {err})") from err
            solution = _CALC.sub("", answer)  # calculator annotations are tool calls, not text to learn
            examples.append(
                Example(
                    prompt=f"{question.strip()}\nSolve step by step; end with '#### <answer>'.",
                    response=solution,
                    references=[final_number(answer) or ""],
                )
            )
        return examples

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        hits = sum(int(final_number(p) == e.references[0]) for p, e in zip(predictions, examples, strict=True))
        return {"exact_match": hits / len(examples) if examples else 0.0}
