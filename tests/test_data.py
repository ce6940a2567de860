"""pedro.data: the prompt/response boundary, padding on either side, and clear errors for bad records."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import pedro
from pedro.data import Collator, Example, encode_prompt, load_records, tokenize_examples
from pedro.model import build_prompt_mask

# the tiny tokenizer's words are numbers; 0, 1, 2 are its special tokens, so words containing those digits
# would be split by them: tests use words made of the digits 3..9 only
CHAT_TEMPLATE = (
    "{% for m in messages %}33 {{ m['content'] }} 34 {% endfor %}{% if add_generation_prompt %}35 {% endif %}"
)


def test_plain_prompt_rows_mask_the_prompt_and_end_in_eos():
    rows, report = tokenize_examples([Example("5 6 7", "8 9")], tiny_tokenizer(), max_length=16)
    assert rows == [{"input_ids": [5, 6, 7, 8, 9, 1], "labels": [-100, -100, -100, 8, 9, 1], "prompt_length": 3}]
    assert (report.kept, report.truncated, report.dropped, report.tokens) == (1, 0, 0, 6)


def test_chat_template_boundary_is_after_the_generation_prompt():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    rows, _ = tokenize_examples([Example("5 6", "8 9")], tokenizer, max_length=16)
    # "33 5 6 34 35 " is the templated prompt: the response starts right after the generation prompt 35
    assert rows[0]["input_ids"] == [33, 5, 6, 34, 35, 8, 9, 1]
    assert rows[0]["labels"] == [-100] * 5 + [8, 9, 1]
    assert rows[0]["prompt_length"] == 5
    # a chat record: every turn before the last assistant turn is the prompt
    messages = [
        {"role": "user", "content": "5"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "7"},
    ]
    rows, _ = tokenize_examples([Example(messages, "9")], tokenizer, max_length=32)
    assert rows[0]["input_ids"] == [33, 5, 34, 33, 6, 34, 33, 7, 34, 35, 9, 1]
    assert rows[0]["prompt_length"] == 10


def test_prompt_tokens_at_training_equal_inference_tokens():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    rows, _ = tokenize_examples([Example("5 6 7", "8")], tokenizer, max_length=16)
    assert rows[0]["input_ids"][: rows[0]["prompt_length"]] == encode_prompt(tokenizer, "5 6 7")
    formatted = pedro.format_prompt(tokenizer, "5 6 7")
    assert (
        rows[0]["input_ids"][: rows[0]["prompt_length"]] == tokenizer(formatted, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_and_model_mask_covers_exactly_the_prompt(side):
    examples = [Example("5 6 7", "43 44"), Example("5", "43 44 45 46"), Example("5 6 7 8 9 55", "43")]
    rows, _ = tokenize_examples(examples, tiny_tokenizer(), max_length=32)
    batch = Collator(pad_token_id=0, padding_side=side)(rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (3, 8)
    pads = ids == 0
    assert torch.equal(~pads, mask.bool())
    if side == "left":
        assert pads[:, 0].any() and not pads[:, -1].any()
    else:
        assert pads[:, -1].any() and not pads[:, 0].any()
    # labels are -100 on prompt and padding, the tokens themselves on the response (43..46 and EOS=1)
    response = ((ids >= 43) & (ids <= 46)) | (ids == 1)
    assert torch.equal(batch["labels"] != -100, response)
    assert torch.equal(batch["labels"][response], ids[response])
    # the model's prompt mask from prompt_lengths is exactly the prompt tokens, whatever the side
    prompt_mask = build_prompt_mask(mask, tuple(ids.shape), ids.device, prompt_lengths=batch["prompt_lengths"])
    assert torch.equal(prompt_mask, ((ids >= 5) & (ids <= 9)) | (ids == 55))


def test_records_are_named_by_where_they_were_read(tmp_path):
    """A report or an error names a record by its file and line, whatever order training shuffled it into; a
    field of the wrong type is not called missing."""
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "5 6", "response": "7"}] * 5 + [{"prompt": "5 " * 9, "response": "6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_records(path)
    records.reverse()  # as a shuffle would
    with pytest.raises(ValueError, match=rf"e.g. records \['{path}:6'\]"):
        tokenize_examples(records, tiny_tokenizer(), max_length=8, overflow="error")
    path.write_text(json.dumps({"prompt": "5 6", "response": 5}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: .*not strings: \['response'\]"):
        load_records(path)
    path.write_text(json.dumps({"prompt": "5 6"}) + "\n")
    with pytest.raises(ValueError, match=r"missing \['response'\]"):
        load_records(path)


def test_overflow_policies_report_counts():
    tokenizer = tiny_tokenizer()
    examples = [Example("5 6", "7 8"), Example("5 6 7 8 9 55", "43 44 45"), Example("5 " * 9, "6")]
    rows, report = tokenize_examples(examples, tokenizer, max_length=8, overflow="truncate")
    assert [len(r["input_ids"]) for r in rows] == [5, 8]
    assert rows[1]["input_ids"] == [5, 6, 7, 8, 9, 55, 43, 44]  # response cut, prompt intact
    assert (report.total, report.kept, report.truncated, report.dropped) == (3, 2, 1, 1)
    assert report.examples_truncated == [1] and report.examples_dropped == [2]
    assert "1 truncated" in str(report) and "1 dropped" in str(report)
    rows, report = tokenize_examples(examples, tokenizer, max_length=8, overflow="drop")
    assert (report.kept, report.dropped) == (1, 2)
    with pytest.raises(ValueError, match="2 of 3 records exceed max_length=8"):
        tokenize_examples(examples, tokenizer, max_length=8, overflow="error")
    with pytest.raises(ValueError, match="no record fits"):
        tokenize_examples([examples[2]], tokenizer, max_length=8)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "5", "response": "6"}\n\n{"prompt": "5", "response": \n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: not valid JSON"):
        load_records(path)
    path.write_text('{"prompt": "5", "response": "6"}\n{"prompt": "5"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: needs string fields"):
        load_records(path)
    path.write_text(
        '{"prompt": "5", "response": "6"}\n{"prompt": " ", "response": "6"}\n{"prompt": "5", "response": ""}\n'
    )
    with pytest.raises(ValueError, match=r"2 record\(s\) have an empty prompt or response \(e.g. .*:2, .*:3\)"):
        load_records(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "5"}, {"role": "user", "content": "6"}]}))
    with pytest.raises(ValueError, match="last message must be the assistant"):
        load_records(path)
    with pytest.raises(FileNotFoundError, match="neither a file, a directory, nor a task"):
        load_records(tmp_path / "missing.jsonl")


def test_records_from_jsonl_and_a_datasets_folder_agree(tmp_path):
    import datasets

    rows = [
        {"prompt": "5 6", "response": "7"},
        {"messages": [{"role": "user", "content": "8"}, {"role": "assistant", "content": "9"}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    from_jsonl = load_records(path)
    assert from_jsonl[0] == Example("5 6", "7")
    assert from_jsonl[1] == Example([{"role": "user", "content": "8"}], "9")
    datasets.Dataset.from_list([rows[0]] * 3).save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved") == [Example("5 6", "7")] * 3
    parquet = tmp_path / "pq"
    parquet.mkdir()
    datasets.Dataset.from_list([rows[0]] * 2).to_parquet(str(parquet / "train.parquet"))
    assert load_records(parquet) == [Example("5 6", "7")] * 2


def test_training_rows_give_the_same_vectors_as_the_prompt_alone():
    """The independent check of the boundary: PEDRO's vectors from a padded prompt+response training batch
    equal the vectors from a forward over each prompt alone."""
    from conftest import randomize

    model = pedro.get_pedro_model(tiny_model("llama"), r=4, pooler="mean")
    randomize(model)
    examples = [Example("5 6 7", "43 44"), Example("9 8", "45 46 47 48")]
    rows, _ = tokenize_examples(examples, tiny_tokenizer(), max_length=32)
    state = model.base_model.pedro_state
    for side in ("left", "right"):
        batch = Collator(0, side)(rows)
        with torch.no_grad():
            model(**batch)
        batched = {k: v.clone() for k, v in state.vectors.items()}
        for i, row in enumerate(rows):
            with torch.no_grad():
                model(input_ids=torch.tensor([row["input_ids"][: row["prompt_length"]]]))
            for key, z in state.vectors.items():
                torch.testing.assert_close(batched[key][i], z[0], rtol=1e-5, atol=1e-6)
