"""E2E NLG: meaning representation -> restaurant description, scored by corpus BLEU (sacrebleu) and ROUGE-L
(rouge-score, best over references) against every reference of the same MR."""

from __future__ import annotations

import csv
from pathlib import Path

from pedro.tasks.base import Example, Task
from pedro.tasks.bleu import bleu_from_statistics, bleu_statistics


def bleu_rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU with a variable number of references per prediction (missing ones padded with None,
    which sacrebleu skips), and the mean over predictions of the best ROUGE-L F1 against their references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(predictions, streams).score  # type: ignore[arg-type]  # None: no reference in that stream
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return {"bleu": bleu, "rougeL": 100.0 * sum(rouge) / len(rouge) if rouge else 0.0}


class E2E(Task):
    name = "e2e"
    kind = "generate"
    metric = "bleu"
    folder = "e2e"
    # the official training set is not available: train on the dev set, test on the test set
    files = {"train": "devset.csv", "test": "testset_w_refs.csv"}
    data_format = "CSV with a header; columns mr (meaning representation) and ref (one reference per row)."
    max_new_tokens = 64

    @staticmethod
    def prompt(mr: str) -> str:
        return f"Write a one-sentence description of this restaurant.\nData: {mr.strip()}"

    def read(self, path: Path, split: str) -> list[Example]:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if rows and not {"mr", "ref"} <= set(rows[0]):
            raise ValueError(f"{path}: expected columns mr, ref; found {list(rows[0])}")
        grouped: dict[str, list[str]] = {}
        for row in rows:
            grouped.setdefault(row["mr"].strip(), []).append(row["ref"].strip())
        if split == "train":
            # training: one example per (mr, ref) row, references = that MR's others
            return [Example(self.prompt(mr), ref, references=refs) for mr, refs in grouped.items() for ref in refs]
        return [Example(self.prompt(mr), refs[0], references=refs) for mr, refs in grouped.items()]

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        return bleu_rouge(predictions, [e.references for e in examples])

    def item_statistics(self, predictions: list[str], examples: list[Example]) -> list[list[int]] | None:
        return bleu_statistics(predictions, [e.references for e in examples])

    def metric_from(self, summed: list[int]) -> float:
        return bleu_from_statistics(summed)
