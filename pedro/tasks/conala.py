"""CoNaLa (curated v1.1): an English intent -> a one-line Python snippet, scored as CoNaLa scores it.

The input is ``rewritten_intent`` (it names the variables the snippet uses), or ``intent`` where that is null.
The training file holds 12 exact duplicate records (as released); they are kept once (2,367 of 2,379).

Metrics:

- ``bleu``: corpus BLEU-4 over CoNaLa's code tokens, the official metric (conala-baseline's ``conala_eval.py``:
  ``tokenize_for_bleu_eval`` then ``compute_bleu(smooth=False)``, one reference per snippet). The tokens are
  joined with spaces and scored by sacrebleu with ``tokenize="none"`` and no smoothing, which computes the same
  number (clipped n-gram precisions 1-4, geometric mean, brevity penalty), on the 0-100 scale.
- ``exact_match``: the prediction's code tokens equal the reference's (so spacing and quote style are ignored).

A prediction that holds a fenced code block (a habit of chat models) is scored on the first block's content.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pedro.tasks.base import Example, Task
from pedro.tasks.bleu import bleu_from_statistics, bleu_statistics

_FENCE = re.compile(r"```(?:[\w+-]*\n)?(.*?)(?:```|$)", re.DOTALL)


def tokenize_for_bleu_eval(code: str) -> list[str]:
    """CoNaLa's code tokenizer (from Ling et al. 2016, as in the official evaluation): a space around every
    character that is not a letter, digit or underscore, camelCase split, quotes unified to a backtick."""
    code = re.sub(r"([^A-Za-z0-9_])", r" \1 ", code)
    code = re.sub(r"([a-z])([A-Z])", r"\1 \2", code)
    code = re.sub(r"\s+", " ", code)
    code = code.replace('"', "`").replace("'", "`")
    return [token for token in code.split(" ") if token]


def extract_snippet(text: str) -> str:
    """The code in a model's answer: the first fenced block's content if there is one, else the text."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip()


# sacrebleu over pre-tokenised code tokens, without smoothing: the official metric's formula
BLEU_ARGS = {"tokenize": "none", "smooth_method": "none", "force": True}


def conala_bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (0-100) and exact match (0-1) of snippets, both over CoNaLa's code tokens."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hyps = [tokenize_for_bleu_eval(p) for p in predictions]
    refs = [tokenize_for_bleu_eval(r) for r in references]
    bleu = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]], **BLEU_ARGS)
    hits = sum(int(h == r) for h, r in zip(hyps, refs))
    return {"bleu": bleu.score, "exact_match": hits / len(refs) if refs else 0.0}


class CoNaLa(Task):
    name = "conala"
    kind = "generate"
    metric = "bleu"
    folder = "conala"
    files = {"train": "conala-train.json", "test": "conala-test.json"}
    data_format = 'one JSON array of records with "intent", "rewritten_intent" (may be null) and "snippet".'
    max_new_tokens = 64

    @staticmethod
    def prompt(intent: str) -> str:
        return f"Write one line of Python 3 that does this.\nTask: {intent.strip()}"

    def read(self, path: Path, split: str) -> list[Example]:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        examples, seen = [], set()
        for number, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("snippet"), str):
                raise ValueError(f'{path}: record {number} has no "snippet" string')
            intent = record.get("rewritten_intent") or record.get("intent")
            if not isinstance(intent, str) or not intent.strip():
                raise ValueError(f'{path}: record {number} has neither "rewritten_intent" nor "intent"')
            key = json.dumps(record, sort_keys=True)
            if split == "train" and key in seen:
                continue  # an exact duplicate record
            seen.add(key)
            examples.append(Example(self.prompt(intent), record["snippet"], references=[record["snippet"]]))
        return examples

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        return conala_bleu([extract_snippet(p) for p in predictions], [e.references[0] for e in examples])

    def item_statistics(self, predictions: list[str], examples: list[Example]) -> list[list[int]] | None:
        hyps = [" ".join(tokenize_for_bleu_eval(extract_snippet(p))) for p in predictions]
        refs = [[" ".join(tokenize_for_bleu_eval(e.references[0]))] for e in examples]
        return bleu_statistics(hyps, refs, **BLEU_ARGS)

    def metric_from(self, summed: list[int]) -> float:
        return bleu_from_statistics(summed, smooth_method=str(BLEU_ARGS["smooth_method"]))
