"""Choose TREC's label words (the word the model answers with for each coarse class) on a dev split carved from
TREC's *training* questions, never the test questions.

    python benchmarks/trec_label_words.py     # writes results/trec_label_words.{json,md}

The bare backbone ranks the six words by log-likelihood (as ``pedro eval`` scores the task); the prompt lists the
words, so every candidate set is scored with its own prompt. Search: start from the classes' own names, then for
each class in turn keep the candidate word with the best dev macro-F1 (accuracy breaks ties, then the word
already chosen). A word that is a fine answer after any prompt (its first sub-word is likely everywhere) makes
the zero-shot baseline collapse to one class, which is what this guards against.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import pedro
from pedro.data import Example, write_json_atomic
from pedro.evaluate import choice_metrics, option_logprobs
from pedro.tasks import get_task
from pedro.tasks.trec import CLASSES, TREC, read_label_file
from pedro.train import resolve_precision

# single-token words in SmolLM2's tokenizer (every abbreviation-like word is 2-3 tokens: "ab" + ...), so that a
# question is scored by one forward pass and no option is favoured for being short
CANDIDATES = {
    "ABBR": ["short", "letters", "meaning", "symbol"],
    "DESC": ["description", "definition", "reason"],
    "ENTY": ["entity", "thing", "object"],
    "HUM": ["human", "person", "who"],
    "LOC": ["location", "place", "where"],
    "NUM": ["number", "quantity", "amount"],
}


def dev_questions(per_class: int, seed: int, data_dir: str | None) -> list[tuple[str, str]]:
    """(coarse class, question): per_class training questions of each class, seeded."""
    task = get_task("trec", data_dir)
    rows = read_label_file(task.path("train"))
    random.Random(seed).shuffle(rows)
    picked: dict[str, list[str]] = {c: [] for c in CLASSES}
    for label, question in rows:
        coarse = label.split(":", 1)[0]
        if len(picked[coarse]) < per_class:
            picked[coarse].append(question)
    return [(c, q) for c in CLASSES for q in picked[c]]


def score(model, tokenizer, questions: list[tuple[str, str]], words: list[str]) -> dict[str, float]:
    labels = list(CLASSES)
    examples = [
        Example(TREC.prompt(q, words), words[labels.index(c)], options=words, label=labels.index(c))
        for c, q in questions
    ]
    scores = option_logprobs(model, tokenizer, examples, batch_size=16, progress=False)
    predicted = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return choice_metrics(predicted, examples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--out", default="results", help="folder for the results (default: results in the current directory)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dtype = torch.bfloat16 if resolve_precision("auto") == "bf16" else torch.float32
    model, tokenizer = pedro.load_backbone("smollm2-135m", dtype=dtype, quiet=True)
    model.eval()
    questions = dev_questions(args.per_class, args.seed, args.data_dir)
    classes = list(CLASSES)
    words = [CANDIDATES[c][0] for c in classes]
    tried: dict[str, dict[str, float]] = {}

    def measure(ws: list[str]) -> dict[str, float]:
        key = ",".join(ws)
        if key not in tried:
            with torch.no_grad():
                tried[key] = score(model, tokenizer, questions, ws)
            print(f"[{(time.perf_counter() - start) / 60:4.1f} min] {key}: {tried[key]}", flush=True)
        return tried[key]

    for i, coarse in enumerate(classes):
        best = words[i]
        for word in CANDIDATES[coarse]:
            trial = words[:i] + [word] + words[i + 1 :]
            if word == best:
                continue
            a, b = measure(trial), measure(words[:i] + [best] + words[i + 1 :])
            if (a["macro_f1"], a["accuracy"]) > (b["macro_f1"], b["accuracy"]):
                best = word
        words[i] = best
    final = measure(words)
    out = Path(args.out)
    result = {
        "command": "python benchmarks/trec_label_words.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dev": {
            "per_class": args.per_class,
            "seed": args.seed,
            "questions": len(questions),
            "source": "train_5500.label (training questions only)",
        },
        "candidates": CANDIDATES,
        "chosen": dict(zip(classes, words)),
        "chosen_scores": final,
        "tried": tried,
        "minutes": (time.perf_counter() - start) / 60,
    }
    write_json_atomic(out / "trec_label_words.json", result)
    lines = [
        "# TREC label words, chosen on training questions",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Dev: {len(questions)} questions of TREC's training file ({args.per_class} per coarse class, seed "
        f"{args.seed}); the bare SmolLM2-135M-Instruct ({str(dtype).removeprefix('torch.')}) ranks the six words "
        "by log-likelihood, each candidate set with its own prompt. Coordinate search from the classes' names.",
        "",
        "| label words (ABBR, DESC, ENTY, HUM, LOC, NUM) | dev accuracy % | dev macro-F1 % |",
        "|---|---:|---:|",
    ]
    for key, m in tried.items():
        mark = " **(chosen)**" if key == ",".join(words) else ""
        lines.append(f"| {key.replace(',', ', ')}{mark} | {100 * m['accuracy']:.1f} | {100 * m['macro_f1']:.1f} |")
    (out / "trec_label_words.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result["chosen"]))


if __name__ == "__main__":
    main()
