"""TREC question classification (Li & Roth 2002): which of six coarse answer types a question asks for, as a
choice task scored by log-likelihood ranking of the label words; reported by accuracy and macro-F1 (the
classes are imbalanced: ABBR is about 2% of the data).

Each line of ``train_5500.label`` / ``TREC_10.label`` is ``COARSE:fine question``. The training split is made
strict: exact duplicate lines are kept once, and a line whose question (ignoring case) is also a test question
is dropped. On the released files that removes 70 duplicate lines and then 11 test questions, leaving 5,371
of 5,452 training lines (the test split keeps its 500).
"""

from __future__ import annotations

from pathlib import Path

from pedro.tasks.base import Example, Task

# coarse class -> the word the model is asked to produce (and whose likelihood is ranked), chosen on 180 questions
# of the *training* file by benchmarks/trec_label_words.py (results/trec_label_words.md): single-token words, and
# the set the bare backbone ranks best there (46 % macro-F1; the other sets tried score 12-46 %). The classes' own
# names are no option: "abbreviation" is three sub-words, and its first ("ab") is likely after almost any prompt
CLASSES = {
    "ABBR": "meaning",
    "DESC": "definition",
    "ENTY": "object",
    "HUM": "person",
    "LOC": "location",
    "NUM": "amount",
}


def read_label_file(path: Path) -> list[tuple[str, str]]:
    """(label, question) per non-blank line, the label as written (``COARSE:fine``). Read as Latin-1: the
    official training file holds a stray 0xF0 byte that is not UTF-8."""
    rows = []
    with open(path, encoding="latin-1") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            label, _, question = line.strip().partition(" ")
            coarse = label.split(":", 1)[0]
            if coarse not in CLASSES or not question.strip():
                raise ValueError(f"{path}:{number}: expected 'COARSE:fine question' with COARSE in {list(CLASSES)}")
            rows.append((label, question.strip()))
    return rows


def strict_train(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``train`` without repeated (label, question) lines and without questions that occur in ``test``
    (compared ignoring case), in file order."""
    held_out = {question.lower() for _, question in test}
    seen: set[tuple[str, str]] = set()
    kept = []
    for row in train:
        if row in seen:
            continue
        seen.add(row)
        if row[1].lower() not in held_out:
            kept.append(row)
    return kept


class TREC(Task):
    name = "trec"
    kind = "choice"
    folder = "trec"
    files = {"train": "train_5500.label", "test": "TREC_10.label"}
    data_format = "plain text, one 'COARSE:fine question' per line (COARSE one of ABBR DESC ENTY HUM LOC NUM)."
    options = list(CLASSES.values())

    @classmethod
    def prompt(cls, question: str, words: list[str] | None = None) -> str:
        """The question and the label words to answer with (``words`` replaces the task's own, to compare
        candidate label words)."""
        words = words or cls.options
        return (
            f"Question: {question}\nWhat type of answer does this question ask for? Answer with one word: "
            f"{', '.join(words[:-1])} or {words[-1]}."
        )

    def read(self, path: Path, split: str) -> list[Example]:
        rows = read_label_file(path)
        if split == "train":
            rows = strict_train(rows, read_label_file(self.path("test")))
        labels = list(CLASSES)
        return [
            Example(self.prompt(question), CLASSES[coarse], options=self.options, label=labels.index(coarse))
            for label, question in rows
            for coarse in [label.split(":", 1)[0]]
        ]
