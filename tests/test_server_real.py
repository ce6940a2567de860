"""End to end on the real backbone: ``pedro serve`` with SmolLM2-135M-Instruct, a PEDRO adapter uploaded over
HTTP, and the official client's chat answers equal to the engine's own (greedy)."""

from __future__ import annotations

import copy

import openai
import pytest
from conftest import randomize
from server_kit import TENANTS, write_config
from server_process import ServerProcess, upload

import pedro
from pedro.engine import Engine, Request, SamplingParams

pytestmark = pytest.mark.real
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_served_with_a_pedro_adapter(tmp_path):
    model, tokenizer = pedro.load_backbone("smollm2-135m", quiet=True)
    engine = Engine(copy.deepcopy(model), tokenizer, max_batch=2, max_seq_len=512)  # the bare backbone, loaded once
    adapter = pedro.get_pedro_model(model, pedro.PedroConfig(r=4))
    randomize(adapter, seed=7, scale=0.01)  # a small change: still fluent, but not the identity
    adapter.save_pretrained(tmp_path / "pedro-adapter")
    (tmp_path / "pedro-adapter" / "README.md").unlink(missing_ok=True)
    del model, adapter

    config = write_config(
        tmp_path,
        "smollm2-135m",
        model_name="smollm2",
        max_seq_len=512,
        max_prompt_tokens=256,
        max_batch=4,
        max_upload_bytes=2**24,
    )
    with ServerProcess(config, tmp_path / "server.log") as server:
        assert upload(server.url, TENANTS["alice"], "geo", tmp_path / "pedro-adapter").status_code == 201
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TENANTS["alice"], max_retries=0, timeout=120)
        base = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=16, temperature=0)
        tuned = client.chat.completions.create(model="geo", messages=QUESTION, max_tokens=16, temperature=0)
        streamed = client.chat.completions.create(
            model="geo", messages=QUESTION, max_tokens=16, temperature=0, stream=True
        )
        streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)

    engine.add_adapter("geo", tmp_path / "pedro-adapter")
    sampling = SamplingParams(max_new_tokens=16)
    ref_base, ref_tuned = engine.generate(
        [Request(QUESTION, sampling=sampling), Request(QUESTION, adapter="geo", sampling=sampling)]
    )
    assert "Paris" in base.choices[0].message.content
    assert base.choices[0].message.content == ref_base.text
    assert tuned.choices[0].message.content == streamed_text == ref_tuned.text
    assert ref_tuned.token_ids != ref_base.token_ids  # the adapter is really applied
