"""(prompt, response) data -> tokenised training rows with the prompt boundary, and the collator that pads them.

The boundary is the point of this module: the loss covers the response tokens only, and PEDRO's pooler must
see exactly the tokens the engine will see at inference (the formatted prompt), so the prompt and the
response are tokenised separately and concatenated: no BPE merge can straddle the boundary, and the prompt
tokens of a training row are identical to the tokens ``encode_prompt`` gives at inference.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pedro.backbones import format_prompt
from pedro.model import IGNORE_INDEX
from pedro.records import Example, Prompt, read_jsonl
from pedro.tasks import TASKS, get_task

OVERFLOW = ("truncate", "drop", "error")


def record_to_example(row: dict[str, Any], where: str) -> Example:
    """``{"prompt", "response"}`` or chat ``{"messages": [..., {"role": "assistant", ...}]}`` -> Example.

    A chat record's last turn must be the assistant's: it is the response, every turn before it the prompt.
    """
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in messages)
        ):
            raise ValueError(f'{where}: "messages" must be a list of at least two {{role, content}} objects')
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer, got {messages[-1]['role']!r}")
        return Example(prompt=messages[:-1], response=messages[-1]["content"], where=where)
    missing = [k for k in ("prompt", "response") if k not in row or row[k] is None]
    not_text = [k for k in ("prompt", "response") if k not in missing and not isinstance(row[k], str)]
    if missing or not_text:
        problems = ([f"missing {missing}"] if missing else []) + ([f"not strings: {not_text}"] if not_text else [])
        raise ValueError(f'{where}: needs string fields "prompt" and "response" (or "messages"); {"; ".join(problems)}')
    return Example(prompt=row["prompt"], response=row["response"], where=where)


def _is_empty(example: Example) -> bool:
    prompt = example.prompt
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    return not text.strip() or not example.response.strip()


def _check_empty(examples: list[Example], where: list[str]) -> list[Example]:
    empty = [w for e, w in zip(examples, where) if _is_empty(e)]
    if empty:
        raise ValueError(
            f"{len(empty)} record(s) have an empty prompt or response (e.g. {', '.join(empty[:5])}); remove them"
        )
    if not examples:
        raise ValueError("the data holds no records")
    return examples


def load_records(source: str | Path, split: str = "train", data_dir: str | Path | None = None) -> list[Example]:
    """Training records from a JSONL file, a local ``datasets`` folder (saved with ``save_to_disk``, or
    arrow/parquet/json files), or a task name from the registry (``sst2``, ``jsonl:DIR`` ...)."""
    path = Path(source)
    if not path.exists() and (str(source) in TASKS or str(source).startswith("jsonl:")):
        return get_task(str(source), data_dir).load(split)
    if path.is_file():
        rows = list(read_jsonl(path))
        examples = [record_to_example(row, f"{path}:{n}") for n, row in rows]
        return _check_empty(examples, [f"{path}:{n}" for n, _ in rows])
    if path.is_dir():
        dataset = _load_dataset_dir(path, split)
        examples = [record_to_example(dict(row), f"{path} row {i}") for i, row in enumerate(dataset)]
        return _check_empty(examples, [f"{path} row {i}" for i in range(len(examples))])
    what = "training data" if split == "train" else "held-out data"
    raise FileNotFoundError(
        f"{what} {str(source)!r} is neither a file, a directory, nor a task ({sorted(TASKS)} or jsonl:DIR)"
    )


def _load_dataset_dir(path: Path, split: str):
    """A ``datasets`` folder: ``save_to_disk`` output, or the split's data files: ``<split>.<ext>`` or shards
    ``<split>-*.<ext>``. A folder without them is refused, naming the files it holds: reading the other files
    instead would train on a test split sitting next to the data."""
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has splits {list(loaded)}, not {split!r}")
            return loaded[split]
        return loaded
    formats = ((".parquet", "parquet"), (".arrow", "arrow"), (".jsonl", "json"), (".json", "json"))
    found = []
    for suffix, builder in formats:
        files = sorted(path.glob(f"*{suffix}"))
        chosen = [f for f in files if f.stem == split or f.stem.startswith(f"{split}-")]
        if chosen:
            return datasets.load_dataset(builder, data_files=[str(f) for f in chosen], split="train")
        found += [f.name for f in files]
    if found:
        raise FileNotFoundError(
            f"{path} has no {split!r} split: no {split}.jsonl (or .json/.parquet/.arrow, or {split}-* shards) among "
            f"{found}. Rename the {split} data to {split}.jsonl, or pass its file as the data"
        )
    raise FileNotFoundError(f"{path} holds no dataset (save_to_disk output, or .parquet/.arrow/.jsonl/.json files)")


# ------------------------------------------------------------------------------------------ tokenisation


def prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt as the model reads it: the chat template when the backbone has one."""
    if isinstance(prompt, str):
        return format_prompt(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in prompt)


def prompt_format(tokenizer: Any) -> str:
    """How encode_prompt encodes a text prompt for this tokenizer: "chat_template" or "raw" (pedro.io records
    it with a trained adapter)."""
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "raw"


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt token ids, identical at training and inference. A chat template writes its own special
    tokens; a plain prompt gets the tokenizer's usual ones (e.g. BOS)."""
    templated = prompt_format(tokenizer) == "chat_template"
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]


def encode_response(tokenizer: Any, response: str, eos: bool = True) -> list[int]:
    """Response ids, ending in EOS (for a chat model that closes the assistant turn) so the model learns to stop."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else ids


@dataclass
class DataReport:
    """What tokenisation did to the records: kept, truncated (response cut to fit) and dropped."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    max_length: int = 0
    tokens: int = 0
    # each record as where it was read ("file.jsonl:6"), or its 0-based number among those given
    examples_truncated: list[int | str] = field(default_factory=list)
    examples_dropped: list[int | str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.kept}/{self.total} records kept ({self.tokens:,} tokens, max length {self.max_length})"
        if self.truncated:
            text += (
                f"; {self.truncated} truncated (response cut at max length; e.g. records {self.examples_truncated[:5]})"
            )
        if self.dropped:
            text += f"; {self.dropped} dropped (prompt alone too long; e.g. records {self.examples_dropped[:5]})"
        return text

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("total", "kept", "truncated", "dropped", "max_length", "tokens")}


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int, overflow: str = "truncate"
) -> tuple[list[dict[str, Any]], DataReport]:
    """Rows ``{"input_ids", "labels", "prompt_length"}``: labels are -100 on the prompt.

    A row longer than ``max_length``: ``truncate`` cuts the response (a record whose prompt leaves no room
    for one response token is dropped: cutting the prompt would change what the pooler sees), ``drop``
    drops it, ``error`` refuses the data with the counts. Indices in the report are 0-based record numbers.
    """
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    report = DataReport(total=len(examples), max_length=max_length)
    rows = []
    for index, example in enumerate(examples):
        prompt = encode_prompt(tokenizer, example.prompt)
        response = encode_response(tokenizer, example.response)
        if len(prompt) + len(response) > max_length:
            if overflow == "truncate" and len(prompt) < max_length:
                response = response[: max_length - len(prompt)]
                report.truncated += 1
                report.examples_truncated.append(example.where or index)
            else:
                report.dropped += 1
                report.examples_dropped.append(example.where or index)
                continue
        rows.append(
            {
                "input_ids": prompt + response,
                "labels": [IGNORE_INDEX] * len(prompt) + response,
                "prompt_length": len(prompt),
            }
        )
        report.tokens += len(prompt) + len(response)
    report.kept = len(rows)
    over = report.truncated + report.dropped
    if overflow == "error" and over:
        raise ValueError(
            f"{over} of {len(examples)} records exceed max_length={max_length} "
            f"(e.g. records {report.examples_dropped[:5]}); raise --max-length or use --overflow truncate|drop"
        )
    if not rows:
        raise ValueError(f"no record fits max_length={max_length}: {report}")
    return rows, report


def tokenize_choice_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int, overflow: str = "truncate"
) -> tuple[list[dict[str, Any]], DataReport]:
    """Rows ``{"input_ids", "prompt_length", "option_ids", "choice"}`` for the ``choice`` objective: the prompt
    alone, each option's token id (options encoded as evaluation encodes them) and the right option's index.

    Every option must be one token: its log-likelihood is then the logit at the prompt's last position, which is
    what the objective trains. A prompt longer than ``max_length`` cannot be cut (the pooler would see another
    prompt): ``truncate`` and ``drop`` drop the record, ``error`` refuses the data."""
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    report = DataReport(total=len(examples), max_length=max_length)
    rows = []
    for index, example in enumerate(examples):
        if not example.options or example.label is None:
            raise ValueError(f"record {index}: the choice objective needs choice records (options and label)")
        option_ids = []
        for option in example.options:
            ids = encode_response(tokenizer, option, eos=False)
            if len(ids) != 1:
                raise ValueError(
                    f"record {index}: option {option!r} is {len(ids)} tokens; the choice objective needs options of "
                    "one token each (use the lm objective)"
                )
            option_ids.append(ids[0])
        prompt = encode_prompt(tokenizer, example.prompt)
        if len(prompt) > max_length:
            report.dropped += 1
            report.examples_dropped.append(example.where or index)
            continue
        rows.append(
            {"input_ids": prompt, "prompt_length": len(prompt), "option_ids": option_ids, "choice": example.label}
        )
        report.tokens += len(prompt)
    report.kept = len(rows)
    if overflow == "error" and report.dropped:
        raise ValueError(
            f"{report.dropped} of {len(examples)} prompts exceed max_length={max_length} "
            f"(e.g. records {report.examples_dropped[:5]}); raise --max-length or use --overflow drop"
        )
    if not rows:
        raise ValueError(f"no prompt fits max_length={max_length}: {report}")
    return rows, report


@dataclass
class Collator:
    """Pads rows into a batch: input_ids, attention_mask, labels (-100 on prompt and padding) -- or, for choice
    rows, option_ids, option_mask and choice -- and, for PEDRO, ``prompt_lengths`` (each row's prompt token
    count, which the model maps onto either padding side)."""

    pad_token_id: int
    padding_side: str = "right"
    with_prompt_lengths: bool = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        width = max(len(r["input_ids"]) for r in rows)

        def pad(seq: list[int], value: int) -> list[int]:
            fill = [value] * (width - len(seq))
            return fill + list(seq) if self.padding_side == "left" else list(seq) + fill

        batch = {
            "input_ids": torch.tensor([pad(r["input_ids"], self.pad_token_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
        }
        if "option_ids" in rows[0]:  # choice rows (tokenize_choice_examples): option lists padded, masked
            most = max(len(r["option_ids"]) for r in rows)
            batch["option_ids"] = torch.tensor([r["option_ids"] + [0] * (most - len(r["option_ids"])) for r in rows])
            batch["option_mask"] = torch.tensor([[i < len(r["option_ids"]) for i in range(most)] for r in rows])
            batch["choice"] = torch.tensor([r["choice"] for r in rows])
        else:
            batch["labels"] = torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows])
        if self.with_prompt_lengths:
            batch["prompt_lengths"] = torch.tensor([r["prompt_length"] for r in rows])
        return batch


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Row indices in an order where every ``batch_size`` consecutive indices (one batch) have similar lengths,
    so the per-batch padding of :class:`Collator` is small, while the batches still come in a random order.

    Each epoch: a seeded shuffle of all rows, cut into groups of ``group_batches`` batches; each group is sorted
    by length and cut into batches; then the full batches of all groups are shuffled, and the one short batch
    (if the row count is not a multiple of ``batch_size``) goes last, since a short batch in the middle would
    shift the boundaries of every batch after it. Unlike transformers' sampler of the same name, batches are
    not served longest-first within a group, so batch length does not follow the schedule. The order depends
    only on ``(seed, epoch)`` (see ``set_epoch``), so a resumed run sees exactly the batches of a straight one.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_batches: int = 50) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be positive, got {batch_size}, {group_batches}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they are served."""
        rng = random.Random(f"length-grouped:{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group = self.batch_size * self.group_batches
        full: list[list[int]] = []
        short: list[list[int]] = []
        for start in range(0, len(order), group):
            rows = sorted(order[start : start + group], key=self.lengths.__getitem__)
            for b in range(0, len(rows), self.batch_size):
                batch = rows[b : b + self.batch_size]
                (full if len(batch) == self.batch_size else short).append(batch)
        rng.shuffle(full)
        return full + short

    def __iter__(self) -> Iterator[int]:
        return (index for batch in self.batches() for index in batch)


def umask_mode(path: str | Path) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would have: temp files and folders are created
    private (0600 / 0700), which would keep an adapter or a result from the other users a umask lets read it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def write_jsonl_atomic(path: str | Path, records: Sequence[Any]) -> None:
    """One JSON object per line, written to a temp file in the same folder and renamed over ``path``, so a
    reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")
        tmp = handle.name
    umask_mode(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """``payload`` as indented JSON, written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(payload, handle, indent=2, default=str)
        tmp = handle.name
    umask_mode(tmp)
    os.replace(tmp, path)
