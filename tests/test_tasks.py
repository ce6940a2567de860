"""The task registry: metrics on hand-made cases, the real data sets when present, clear errors when not."""

from __future__ import annotations

import json

import pytest

from pedro.data import Example
from pedro.tasks import (
    TASKS,
    JsonlTask,
    Task,
    TaskDataMissing,
    accuracy,
    bleu_rouge,
    final_number,
    get_task,
    register_task,
)
from pedro.tasks.base import default_data_dirs


def _data_dir():
    return next((d for d in default_data_dirs() if (d / "sst2").is_dir()), None)


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
    examples = [Example("q", "a", references=["7"]), Example("q", "a", references=["1000"]), Example("q", "a", references=["3"])]
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


def test_generic_jsonl_task_choice_and_exact_match(tmp_path):
    choice = tmp_path / "choice"
    choice.mkdir()
    rows = [{"prompt": "2+2?", "response": "4", "options": ["3", "4"]}, {"prompt": "1+1?", "options": ["2", "5"], "label": 0,
                                                                          "response": "2"}]
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
            return [Example(f"opposite of {w}?", o, options=["up", "down"], label=["up", "down"].index(o))
                    for w, o in zip(words, reversed(words))]

    try:
        assert [e.response for e in get_task("flip-test", tmp_path).load("test")] == ["down", "up"]
    finally:
        TASKS.pop("flip-test")


@needs_data
@pytest.mark.parametrize(
    "name, n_train, n_test",
    [("sst2", 67349, 872), ("rte", 2490, 277), ("gsm8k", 7473, 1319), ("e2e", 4672, 630)],
)
def test_real_tasks_load_with_readme_counts(name, n_train, n_test):
    task = get_task(name)
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (n_train, n_test)  # E2E test: one example per distinct MR
    if task.kind == "choice":
        assert all(e.options[e.label] == e.response for e in test)
        assert {e.label for e in test} == {0, 1}
    if name == "gsm8k":
        assert all(e.references[0] == final_number(e.response) for e in train[:200])
        assert "<<" not in train[0].response  # calculator annotations stripped
    if name == "e2e":
        assert sum(len(e.references) for e in test) == 4693  # every test row is a reference of its MR
        assert all(e.response in e.references for e in train[:50])
