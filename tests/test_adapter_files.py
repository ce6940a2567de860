"""pedro.io.save_adapter_atomic: an adapter directory is replaced whole, so a crash never mixes two adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_model
from safetensors.torch import load_file

import pedro
import pedro.io
from pedro.io import CONFIG_NAME, WEIGHTS_NAME, evaluations_in, read_prompt_format, save_adapter_atomic


def _adapter(r: int, seed: int):
    model = pedro.get_pedro_model(tiny_model("llama"), pedro.PedroConfig(r=r))
    randomize(model, seed=seed)
    return model


def _state(directory):
    return json.loads((directory / CONFIG_NAME).read_text())["r"], load_file(str(directory / WEIGHTS_NAME))


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_a_new_adapter_replaces_the_old_whole_and_keeps_the_other_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(pedro.io, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    save_adapter_atomic(_adapter(4, 1), out, backbone="tiny", prompts="raw")
    (out / "train_log.jsonl").write_text("{}\n")
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "state.pt").write_bytes(b"x")
    save_adapter_atomic(_adapter(2, 2), out, prompts="chat_template")
    assert _state(out)[0] == 2
    assert read_prompt_format(out) == "chat_template"
    assert (out / "train_log.jsonl").read_text() == "{}\n" and (
        out / "checkpoints" / "step-2" / "state.pt"
    ).read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary directory left behind
    restored = pedro.get_pedro_model(tiny_model("llama"), pedro.PedroConfig(r=2))
    restored.load_adapter(str(out), adapter_name="check")  # every tensor present, with r = 2's shapes


def test_evaluations_of_the_old_adapter_go_with_it(tmp_path):
    out = tmp_path / "run"
    save_adapter_atomic(_adapter(4, 1), out)
    result = {"task": "sst2", "split": "test", "metric": "accuracy", "accuracy": 0.9}
    (out / "eval_sst2_test.json").write_text(
        json.dumps({**result, "predictions": str(out / "eval_sst2_test_predictions.jsonl")})
    )
    (out / "eval_sst2_test_predictions.jsonl").write_text("{}\n")
    (out / "eval_notes.json").write_text('{"mine": true}')  # a user's own file: not an evaluation result
    stale = evaluations_in(out)
    assert stale == ["eval_sst2_test.json", "eval_sst2_test_predictions.jsonl"]
    save_adapter_atomic(_adapter(2, 2), out, drop=stale)
    assert _state(out)[0] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("eval_")) == ["eval_notes.json"]


def test_a_crash_while_writing_leaves_the_old_adapter_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_adapter_atomic(_adapter(4, 1), out)
    before = _state(out)
    new = _adapter(2, 2)
    original = type(new).save_pretrained

    def crash_after_the_config(self, directory, **kwargs):
        original(self, directory, **kwargs)
        (directory / WEIGHTS_NAME).write_bytes(b"half a file")  # the weights were being written when it died
        raise KeyboardInterrupt

    monkeypatch.setattr(type(new), "save_pretrained", crash_after_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter_atomic(new, out)
    after = _state(out)
    assert after[0] == before[0] == 4
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_written_files_get_the_permissions_the_umask_gives(tmp_path):
    """Temp files and folders are private (0600 / 0700) until renamed: an adapter or a result written through
    them must end up as readable as a plain write makes it (here umask 022: 0755 folders, 0644 files)."""
    import os
    import stat

    from pedro.data import write_json_atomic

    previous = os.umask(0o022)
    try:
        save_adapter_atomic(_adapter(4, 1), tmp_path / "run", backbone="tiny")
        write_json_atomic(tmp_path / "run" / "summary.json", {"a": 1})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "run", *(tmp_path / "run").iterdir()]}
    assert modes.pop("run") == 0o755 and modes and set(modes.values()) == {0o644}, modes
