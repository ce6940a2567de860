"""Corpus BLEU as sums of per-prediction statistics.

sacrebleu's corpus BLEU adds up, over the corpus, each prediction's n-gram matches and totals, its length and
its closest reference's length, and computes the score from those sums. Keeping each prediction's statistics
lets a resample of the test items (the quality study's paired bootstrap) be scored by adding rows instead of
re-running the metric over the resample, which for E2E's 500 multi-reference items took seconds per resample.
"""

from __future__ import annotations

from typing import Any


def bleu_statistics(predictions: list[str], references: list[list[str]], **bleu_args: Any) -> list[list[int]]:
    """Each prediction's [matches per order..., totals per order..., its length, its reference length] under
    ``sacrebleu.BLEU(**bleu_args)``, against its own references."""
    import sacrebleu

    bleu = sacrebleu.BLEU(**bleu_args)
    rows = []
    for prediction, refs in zip(predictions, references):
        score = bleu.corpus_score([prediction], [[ref] for ref in refs])
        rows.append([*score.counts, *score.totals, score.sys_len, score.ref_len])
    return rows


def bleu_from_statistics(summed: list[int], smooth_method: str = "exp", max_ngram_order: int = 4) -> float:
    """Corpus BLEU (0-100) from the column sums of ``bleu_statistics`` rows: what corpus_bleu gives for the
    predictions those rows came from."""
    import sacrebleu

    n = max_ngram_order
    return sacrebleu.BLEU.compute_bleu(
        summed[:n], summed[n : 2 * n], summed[2 * n], summed[2 * n + 1], smooth_method=smooth_method, max_ngram_order=n
    ).score
