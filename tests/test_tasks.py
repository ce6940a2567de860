"""The task registry: metrics on hand-made cases, the real data sets when present, clear errors when not."""

from __future__ import annotations

import json
import random

import pytest

from pedro.data import Example
from pedro.tasks import (
    TASKS,
    JsonlTask,
    Task,
    TaskDataMissing,
    accuracy,
    bleu_rouge,
    conala_bleu,
    final_number,
    get_task,
    macro_f1,
    register_task,
    tokenize_for_bleu_eval,
)
from pedro.tasks.base import DATA_ENV, default_data_dir
from pedro.tasks.conala import CoNaLa, extract_snippet
from pedro.tasks.e2e import E2E


def _data_dir():
    return default_data_dir() if (default_data_dir() / "sst2").is_dir() else None


needs_data = pytest.mark.skipif(_data_dir() is None, reason="../shared/data is not present")


@pytest.mark.parametrize(
    "text, number",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,000", "1000"),
        ("so the answer is 12.50 dollars", "12.5"),
        ("First 5, then 6, finally 42.", "42"),  # no ####: the last number
        ("#### -3", "-3"),
        ("#### 4.0", "4"),
        ("no digits here", None),
        ("12 cows ... #### 18 and then 20", "18"),  # the number right after the last ####
    ],
)
def test_gsm8k_final_number(text, number):
    assert final_number(text) == number


def test_gsm8k_score_is_exact_match_of_final_numbers():
    task = TASKS["gsm8k"]()
    examples = [
        Example("q", "a", references=["7"]),
        Example("q", "a", references=["1000"]),
        Example("q", "a", references=["3"]),
    ]
    assert task.score(["... #### 7", "it is 1,000", "#### 4"], examples) == {"exact_match": pytest.approx(2 / 3)}


def test_accuracy_counts_label_matches():
    examples = [Example("p", "a", options=["a", "b"], label=i % 2) for i in range(4)]
    assert accuracy([0, 1, 1, 1], examples) == {"accuracy": 0.75}
    with pytest.raises(ValueError):
        accuracy([0], examples)


def test_rouge_l_and_bleu_on_hand_made_cases():
    # ROUGE-L by hand: LCS("the cat sat", "the cat on the mat") = "the cat" = 2 tokens
    # P = 2/3, R = 2/5, F1 = 2PR/(P+R) = 0.5
    scores = bleu_rouge(["the cat sat"], [["the cat on the mat"]])
    assert scores["rougeL"] == pytest.approx(50.0)
    # the best reference counts: a prediction equal to the second reference scores 100 on both metrics
    scores = bleu_rouge(["there is a small cafe near the river"], [["a pub", "there is a small cafe near the river"]])
    assert scores["bleu"] == pytest.approx(100.0) and scores["rougeL"] == pytest.approx(100.0)
    # a variable number of references (padded for sacrebleu) gives the same BLEU as the same refs repeated
    preds = ["the cafe is near the river and cheap", "a pub in the city centre with good food"]
    ragged = [["the cafe near the river is cheap"], ["a pub in the city centre serving good food", "a city centre pub"]]
    padded = [ragged[0] * 2, ragged[1]]
    assert bleu_rouge(preds, ragged)["bleu"] == pytest.approx(bleu_rouge(preds, padded)["bleu"])
    assert 0 < bleu_rouge(preds, ragged)["bleu"] < 100
    with pytest.raises(ValueError):
        bleu_rouge(["x"], [[]])


def test_missing_data_says_where_and_what_format(tmp_path):
    task = get_task("rte", data_dir=tmp_path)
    with pytest.raises(TaskDataMissing, match=r"rte/dev.tsv.*tab-separated.*sentence1, sentence2, label.*--data-dir"):
        task.load("test")
    with pytest.raises(ValueError, match="has splits"):
        task.path("validation")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_the_data_folder_is_a_setting_named_when_data_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"
    with pytest.raises(TaskDataMissing, match=rf"{tmp_path}/mine/sst2/train.tsv \(from \${DATA_ENV}\)"):
        get_task("sst2").load("train")
    monkeypatch.delenv(DATA_ENV)
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path.parent / "shared" / "data"
    with pytest.raises(TaskDataMissing, match=rf"the default ../shared/data; set \${DATA_ENV} or pass --data-dir"):
        get_task("sst2").load("train")


def test_generic_jsonl_task_choice_and_exact_match(tmp_path):
    choice = tmp_path / "choice"
    choice.mkdir()
    rows = [
        {"prompt": "2+2?", "response": "4", "options": ["3", "4"]},
        {"prompt": "1+1?", "options": ["2", "5"], "label": 0, "response": "2"},
    ]
    (choice / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task(f"jsonl:{choice}")
    assert task.kind == "choice" and task.metric == "accuracy" and task.splits == ["test"]
    assert [(e.label, e.response) for e in task.load("test")] == [(1, "4"), (0, "2")]
    free = tmp_path / "free"
    free.mkdir()
    (free / "train.jsonl").write_text(json.dumps({"prompt": "Capital of France?", "response": "Paris"}))
    task = get_task(f"jsonl:{free}")
    assert task.kind == "generate"
    examples = task.load("train")
    assert task.score(["  paris "], examples) == {"exact_match": 1.0}
    assert task.score(["Lyon"], examples) == {"exact_match": 0.0}
    with pytest.raises(TaskDataMissing, match="test.jsonl"):
        task.load("test")
    (free / "bad.jsonl").write_text(json.dumps({"prompt": "x", "response": "y", "options": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: give \"label\""):
        JsonlTask(free).load("bad")


def test_a_user_task_is_a_small_class(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "test.txt").write_text("up\ndown\n")

    @register_task
    class Flip(Task):
        name = "flip-test"
        kind = "choice"
        folder = "mine"
        files = {"test": "test.txt"}

        def read(self, path, split):
            words = path.read_text().split()
            return [
                Example(f"opposite of {w}?", o, options=["up", "down"], label=["up", "down"].index(o))
                for w, o in zip(words, reversed(words))
            ]

    try:
        assert [e.response for e in get_task("flip-test", tmp_path).load("test")] == ["down", "up"]
    finally:
        TASKS.pop("flip-test")


@needs_data
@pytest.mark.parametrize(
    "name, n_train, n_test",
    [
        ("sst2", 67349, 872),
        ("rte", 2490, 277),
        ("gsm8k", 7473, 1319),
        ("e2e", 4672, 630),
        ("trec", 5452 - 70 - 11, 500),
        ("conala", 2379 - 12, 500),
    ],
)
def test_real_tasks_load_with_readme_counts(name, n_train, n_test):
    task = get_task(name)
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (n_train, n_test)  # E2E test: one example per distinct MR
    if task.kind == "choice":
        assert all(e.options[e.label] == e.response for e in test)
        assert {e.label for e in test} == set(range(len(test[0].options)))
    if name == "gsm8k":
        assert all(e.references[0] == final_number(e.response) for e in train[:200])
        assert "<<" not in train[0].response  # calculator annotations stripped
    if name == "e2e":
        assert sum(len(e.references) for e in test) == 4693  # every test row is a reference of its MR
        assert all(e.response in e.references for e in train[:50])
    if name == "trec":  # the README's class counts of the test split; train: strict (no test question, no repeat)
        counts = [sum(e.label == k for e in test) for k in range(6)]
        assert counts == [9, 138, 94, 65, 81, 113]
        questions = {e.prompt.lower() for e in test}
        assert not any(e.prompt.lower() in questions for e in train)
    if name == "conala":
        assert all(e.references == [e.response] for e in test)


# ------------------------------------------------------------------------------------------ macro-F1


def test_macro_f1_by_hand_and_only_for_a_fixed_label_set():
    options = ["a", "b", "c"]
    gold = [0, 0, 0, 1, 1, 2]
    examples = [Example("p", options[g], options=options, label=g) for g in gold]
    predicted = [0, 0, 1, 1, 1, 1]
    # class a: P 2/2, R 2/3 -> F1 0.8; b: P 2/4, R 2/2 -> 2/3; c: never predicted -> 0
    assert macro_f1(predicted, examples)["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert macro_f1(gold, examples) == {"macro_f1": 1.0}
    # a class that is neither a label nor predicted does not count (as scikit-learn's macro average)
    assert macro_f1([0, 0, 0, 1, 1, 1], examples)["macro_f1"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)
    assert macro_f1([0, 0, 1], examples[:2] + examples[3:4])["macro_f1"] == pytest.approx(1.0)
    # options that change per example (multiple-choice QA) are not classes: no macro-F1
    varied = [Example("p", "x", options=["x", "y"], label=0), Example("p", "z", options=["z", "w"], label=0)]
    assert macro_f1([0, 1], varied) == {}
    with pytest.raises(ValueError):
        macro_f1([0], examples)


# ------------------------------------------------------------------------------------------ TREC


def _trec_files(root):
    folder = root / "trec"
    folder.mkdir(parents=True)
    (folder / "train_5500.label").write_bytes(
        b"DESC:manner How did serfdom develop ?\n"
        b"ENTY:animal What fowl grabs the spotlight ?\n"
        b"DESC:manner How did serfdom develop ?\n"  # an exact repeat: kept once
        b"NUM:count How many hearts does an octopus have ?\n"  # a test question (other case): dropped
        b"ABBR:exp What is the full form of .com ?\n"
        b"LOC:other What is the sister\xf0city of Lyon ?\n"  # the official file's stray non-UTF-8 byte
        b"\n"
    )
    (folder / "TREC_10.label").write_text(
        "NUM:count How many Hearts does an octopus have ?\nHUM:desc Who was Galileo ?\n"
    )
    return folder


def test_trec_strict_train_split_labels_and_options(tmp_path):
    _trec_files(tmp_path)
    task = get_task("trec", tmp_path)
    assert task.kind == "choice" and task.metric == "accuracy"
    train, test = task.load("train"), task.load("test")
    assert [e.response for e in train] == ["definition", "object", "meaning", "location"]
    assert [e.response for e in test] == ["amount", "person"]
    options = ["meaning", "definition", "object", "person", "location", "amount"]
    assert all(e.options == options and e.options[e.label] == e.response for e in train + test)
    assert [e.label for e in train] == [1, 2, 0, 4]
    assert train[0].prompt.startswith("Question: How did serfdom develop ?\n")
    assert train[0].prompt.endswith("meaning, definition, object, person, location or amount.")
    (tmp_path / "trec" / "TREC_10.label").write_text("what is this ?\n")
    with pytest.raises(ValueError, match=r"TREC_10.label:1: expected 'COARSE:fine question'"):
        task.load("test")


# ------------------------------------------------------------------------------------------ CoNaLa


def reference_conala_bleu(hyps: list[list[str]], refs: list[list[str]], max_order: int = 4) -> float:
    """The official evaluation's compute_bleu (one reference each, no smoothing), written out independently."""
    import math
    from collections import Counter

    matches, possible = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hyp, ref in zip(hyps, refs):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_order + 1):
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum((h & r).values())
            possible[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = [m / p if p else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) == 0:
        return 0.0
    geo = math.exp(sum(math.log(p) for p in precisions) / max_order)
    ratio = hyp_len / ref_len
    return 100 * geo * (1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio))


def test_conala_tokenizer_as_the_official_evaluation():
    assert tokenize_for_bleu_eval("sum(d * 10 ** i for i, d in enumerate(x[::-1]))") == [
        "sum",
        "(",
        "d",
        "*",
        "10",
        "*",
        "*",
        "i",
        "for",
        "i",
        ",",
        "d",
        "in",
        "enumerate",
        "(",
        "x",
        "[",
        ":",
        ":",
        "-",
        "1",
        "]",
        ")",
        ")",
    ]
    # camelCase split, both quote styles become a backtick, whitespace does not matter
    assert tokenize_for_bleu_eval("df['myCol'].apply(str)") == [
        "df",
        "[",
        "`",
        "my",
        "Col",
        "`",
        "]",
        ".",
        "apply",
        "(",
        "str",
        ")",
    ]
    assert tokenize_for_bleu_eval('df[ "myCol" ].apply( str )') == tokenize_for_bleu_eval("df['myCol'].apply(str)")
    assert tokenize_for_bleu_eval("snake_case_name") == ["snake_case_name"]


def test_conala_bleu_equals_the_official_formula_and_exact_match():
    refs = [
        "os.kill(os.getpid(), signal.SIGUSR1)",
        "sorted(d.items(), key=lambda x: x[1])",
        "df['col'].apply(lambda v: v * 2)",
        "print(' '.join(map(str, lst)))",
    ]
    hyps = [
        "os.kill(os.getpid(), signal.SIGKILL)",
        "sorted(d.items(), key=lambda x: x[1], reverse=True)",
        'df["col"].apply(lambda v: v * 2)',
        "print(lst)",
    ]
    scores = conala_bleu(hyps, refs)
    expected = reference_conala_bleu(
        [tokenize_for_bleu_eval(h) for h in hyps], [tokenize_for_bleu_eval(r) for r in refs]
    )
    assert 0 < expected < 100 and scores["bleu"] == pytest.approx(expected, abs=1e-9)
    assert scores["exact_match"] == 0.25  # the third: only the quote style differs
    # shorter than the references: the brevity penalty applies
    short = conala_bleu(["os.kill(os.getpid())"], [refs[0]])["bleu"]
    assert short == pytest.approx(
        reference_conala_bleu([tokenize_for_bleu_eval("os.kill(os.getpid())")], [tokenize_for_bleu_eval(refs[0])])
    )
    assert conala_bleu(refs, refs) == {"bleu": pytest.approx(100.0), "exact_match": 1.0}
    assert conala_bleu(["x"], ["y = 1"])["bleu"] == 0.0  # no 4-gram match, no smoothing
    with pytest.raises(ValueError):
        conala_bleu(["x"], [])


def test_conala_snippet_from_a_fenced_answer():
    assert extract_snippet("```python\nx = [1, 2]\n```\nThis makes a list.") == "x = [1, 2]"
    assert extract_snippet("```x.sort()```") == "x.sort()"
    assert extract_snippet("  x.sort()  ") == "x.sort()"
    assert extract_snippet("Use:\n```\nos.remove(path)") == "os.remove(path)"  # unclosed (cut by max tokens)


def test_conala_reads_intents_drops_repeats_and_scores(tmp_path):
    folder = tmp_path / "conala"
    folder.mkdir()
    a = {"intent": "How to sort?", "rewritten_intent": "sort list `x`", "snippet": "x.sort()", "question_id": 1}
    b = {"intent": "delete a file", "rewritten_intent": None, "snippet": "os.remove(path)", "question_id": 2}
    (folder / "conala-train.json").write_text(json.dumps([a, b, a]))
    (folder / "conala-test.json").write_text(json.dumps([b, b]))
    task = get_task("conala", tmp_path)
    assert task.kind == "generate" and task.metric == "bleu"
    train = task.load("train")
    assert [e.response for e in train] == ["x.sort()", "os.remove(path)"]  # the repeated record kept once
    assert train[0].prompt.endswith("sort list `x`") and train[1].prompt.endswith("delete a file")  # null: intent
    test = task.load("test")
    assert len(test) == 2  # the test split is scored as released
    scores = task.score(["```python\nos.remove( path )\n```", "os.unlink(path)"], test)
    assert scores["exact_match"] == 0.5
    (folder / "conala-test.json").write_text(json.dumps([{"intent": "x"}]))
    with pytest.raises(ValueError, match='record 0 has no "snippet"'):
        task.load("test")


@pytest.mark.parametrize("task", [E2E(), CoNaLa()], ids=["e2e", "conala"])
def test_bleu_from_summed_item_statistics_equals_the_corpus_score(task):
    """The quality study's bootstrap scores a resample by adding per-item BLEU statistics: on the whole set
    and on a resample with repeats that gives exactly what scoring the texts gives."""
    rng = random.Random(3)
    words = "the cafe near river city x = y + 1 ( ) def return print list".split()

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randrange(4, 14)))

    examples = [Example("p", text(), references=[text() for _ in range(rng.randrange(1, 4))]) for _ in range(60)]
    # half the predictions copy a reference, so every n-gram order has matches
    predictions = [e.references[0] if i % 2 else text() for i, e in enumerate(examples)]
    rows = task.item_statistics(predictions, examples)
    for items in (list(range(60)), [rng.randrange(60) for _ in range(60)]):
        expected = task.score([predictions[i] for i in items], [examples[i] for i in items])[task.metric]
        assert 0 < expected < 100
        assert task.metric_from([sum(column) for column in zip(*(rows[i] for i in items))]) == pytest.approx(
            expected, abs=1e-9
        )
