"""The OpenAI sampling and output options through a live server and the official client: n, batched prompts,
logprobs (both formats), echo, penalties, logit_bias, usage -- each checked against the engine run directly in
this process (whose sampler is checked against a hand-written reference in test_sampling.py) -- the prompt's
logprobs of echo + logprobs (and max_tokens 0, lm-evaluation-harness's loglikelihood request) against the
prompt run through transformers with the adapter loaded by PEFT, and a table of every field of the installed
``openai`` package's request types: honoured, accepted without effect on the answer, or refused with a 400
naming it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import peft
import pytest
import torch
from server_kit import TENANTS, make_adapter, make_backbone, write_config
from server_process import ServerProcess, auth, upload
from transformers import AutoModelForCausalLM

from pedro.engine import Engine, Request, SamplingParams, TokenLogprob, nth_seed
from pedro.io import read_prompt_format, record_prompt_format
from pedro.server.generation import chat_logprobs, completion_logprobs

ALICE = TENANTS["alice"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-sampling")
    backbone = make_backbone(root / "backbone", endless=True)
    with ServerProcess(write_config(root, backbone), root / "server.log") as server:
        assert upload(server.url, ALICE, "p", make_adapter(root / "p", "pedro", seed=3)).status_code == 201
        engine = Engine(str(backbone), max_batch=16, max_seq_len=128)
        engine.add_adapter("p", root / "p")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0, timeout=60)
        yield SimpleNamespace(url=server.url, engine=engine, client=client, root=root, backbone=backbone)


def direct(live, prompt, adapter=None, chat=False, **sampling):
    """The engine's own answer (a completion prompt is raw text, a chat prompt gets the chat template)."""
    request = Request(
        prompt, adapter=adapter, raw_prompt=not chat, sampling=SamplingParams(**{"max_new_tokens": 8, **sampling})
    )
    return live.engine.generate([request])[0]


def test_n_samples_are_reproducible_one_by_one_with_seed_plus_index(live):
    out = live.client.completions.create(model="p", prompt="3 4 5", n=3, max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.text for c in out.choices]
    assert texts == [direct(live, "3 4 5", "p", temperature=1.0, seed=11 + i).text for i in range(3)]
    assert len(set(texts)) > 1  # independent samples, not one answer three times
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 24


def test_n_samples_seeds_wrap_around_the_64_bit_range(live):
    """The largest seed a request may carry: sample 1 runs with the smallest (int64 wrap-around), not a 500."""
    top = 2**63 - 1
    out = live.client.completions.create(model="p", prompt="3 4 5", n=2, max_tokens=8, temperature=1.0, seed=top)
    texts = [c.text for c in out.choices]
    assert texts == [direct(live, "3 4 5", "p", temperature=1.0, seed=s).text for s in (top, -(2**63))]
    assert [nth_seed(top, k) for k in range(3)] == [top, -(2**63), -(2**63) + 1]
    assert nth_seed(-(2**63), 2) == -(2**63) + 2 and nth_seed(5, 0) == 5


def test_n_samples_share_one_prefill():
    from conftest import tiny_model, tiny_tokenizer

    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64)
    requests = [
        Request([3, 4, 5, 6], sampling=SamplingParams(max_new_tokens=4, temperature=1.0, seed=s, ignore_eos=True))
        for s in range(3)
    ]
    outs = engine.generate(requests)
    assert [n for n, _ in engine.stats["prefill"]] == [4]  # three rows admitted, one prompt's tokens prefilled
    alone = [
        Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64).generate([r])[0].token_ids
        for r in requests
    ]
    assert [o.token_ids for o in outs] == alone


def test_n_samples_behind_a_server_share_one_prefill_while_the_engine_is_busy():
    """The server's n samples reach the engine in one command: even while other rows keep it stepping, and
    with each sample's prompt encoded at its own pace, they are admitted in one step and prefilled once."""
    import asyncio
    import time

    from conftest import tiny_model, tiny_tokenizer

    from pedro.server.backend import LocalBackend

    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64)
    backend = LocalBackend(engine, SimpleNamespace(max_prompt_tokens=None))
    encode = backend.encode
    calls = []

    def slow_encode(prompt, adapter=None, raw_prompt=None):  # each encode slower than several steps
        calls.append(prompt)
        time.sleep(0.05 * len(calls))
        return encode(prompt, adapter, raw_prompt)

    backend.encode = slow_encode
    sampling = SamplingParams(max_new_tokens=3, temperature=1.0, seed=1, ignore_eos=True)
    busy = SamplingParams(max_new_tokens=40, ignore_eos=True)

    async def main() -> list[list[int]]:
        (running,) = await backend.stream_all([([7, 8], busy, None)], None, None)
        await running.__anext__()  # the engine is now stepping for it
        streams = await backend.stream_all([([3, 4, 5, 6], sampling, None)] * 3, None, None)
        outs = [[o async for o in s][-1].token_ids for s in streams]
        await running.aclose()
        return outs

    try:
        engine.reset_stats()
        outs = asyncio.run(main())
    finally:
        backend.shutdown()
    assert len(outs) == 3 and all(len(o) == 3 for o in outs)
    prefilled = [n for *_, n, _ in engine.stats["prefill"]] + [n for _, n, _ in engine.stats["mixed"]]
    assert sorted(prefilled) == [2, 4]  # the busy row's prompt, then the samples' prompt once for all three


def test_batched_prompts_number_choices_prompt_major(live):
    prompts = ["3 4 5", "9 8"]
    out = live.client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    expected = [direct(live, p, max_new_tokens=5).text for p in prompts]
    assert [c.text for c in out.choices] == [expected[0], expected[0], expected[1], expected[1]]
    ids = live.client.completions.create(model="tiny", prompt=[[3, 4, 5], [9, 8]], max_tokens=5, temperature=0)
    assert [c.text for c in ids.choices] == expected
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 20


def test_completion_logprobs_match_the_engine_and_stream_the_same(live):
    out = live.client.completions.create(model="p", prompt="3 4 5", max_tokens=6, temperature=0, logprobs=2)
    reference = direct(live, "3 4 5", "p", max_new_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.tokens) == 6
    assert lp.token_logprobs == pytest.approx([e.logprob for e in reference.logprobs], abs=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    streamed = list(
        live.client.completions.create(model="p", prompt="3 4 5", max_tokens=6, temperature=0, logprobs=2, stream=True)
    )
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for chunk in streamed for c in chunk.choices if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_streamed_logprobs_come_with_the_text_of_their_tokens_under_a_stop_string(live):
    """With a stop string the engine holds back the text that could still become it; each chunk's logprobs are
    those of the tokens its text shows (offsets within what has been streamed), and together they are the
    non-streamed ones."""
    kw = dict(model="p", prompt="3 4 5", max_tokens=8, temperature=0, logprobs=1, stop="no such stop text")
    whole = live.client.completions.create(**kw).choices[0]
    chunks = [c for chunk in live.client.completions.create(**kw, stream=True) for c in chunk.choices]
    streamed_text, tokens, offsets, lagged = "", [], [], False
    for c in chunks:
        streamed_text += c.text
        if c.logprobs:
            for token, offset in zip(c.logprobs.tokens, c.logprobs.text_offset):
                assert offset + len(token) <= len(streamed_text), (token, offset, streamed_text)
            tokens += c.logprobs.tokens
            offsets += c.logprobs.text_offset
        lagged |= len("".join(tokens)) < len(streamed_text)  # a token's text was only partly streamed
    assert streamed_text == whole.text and tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert lagged

    messages = [{"role": "user", "content": "3 4 5"}]
    chat = dict(model="p", messages=messages, max_tokens=8, temperature=0, logprobs=True, stop="no such stop text")
    whole_chat = live.client.chat.completions.create(**chat).choices[0]
    content, shown = "", ""
    for chunk in live.client.chat.completions.create(**chat, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            shown += "".join(e.token for e in (c.logprobs.content if c.logprobs else ()))
            assert content.startswith(shown), (content, shown)
    assert content == shown == whole_chat.message.content


def test_tokens_that_split_a_character_show_their_bytes():
    """A token holding part of a character (the engine's ``raw``) is shown as OpenAI shows one: its bytes escaped
    (``bytes:`` before them in completions), chat's ``bytes`` the token's own, so that consecutive tokens' bytes
    join to their text; alternatives stay distinct, and offsets point where each token's text starts."""
    party = "🎉".encode()
    entries = [
        TokenLogprob(1, -0.1, ((1, -0.1), (2, -2.0)), "", ("", ""), party[:2], (party[:2], b"\xf0\x9f\x98")),
        TokenLogprob(3, -0.2, ((3, -0.2),), "", ("",), party[2:3], (party[2:3],)),
        TokenLogprob(4, -0.3, ((4, -0.3),), "🎉", ("🎉",), party[3:], (party[3:],)),
        TokenLogprob(5, -0.4, ((5, -0.4),), " ok", (" ok",), None, (None,)),
    ]
    chat = chat_logprobs(entries).content
    assert bytes(b for e in chat for b in e.bytes).decode() == "🎉 ok"
    assert [e.token for e in chat] == ["\\xf0\\x9f", "\\x8e", "\\x89", " ok"]
    assert [t.token for t in chat[0].top_logprobs] == ["\\xf0\\x9f", "\\xf0\\x9f\\x98"]
    legacy = completion_logprobs(entries, 0)
    assert legacy.tokens == ["bytes:\\xf0\\x9f", "bytes:\\x8e", "bytes:\\x89", " ok"]
    assert legacy.text_offset == [0, 0, 0, 1]
    assert list(legacy.top_logprobs[0]) == ["bytes:\\xf0\\x9f", "bytes:\\xf0\\x9f\\x98"]


def test_chat_logprobs_in_chats_format(live):
    messages = [{"role": "user", "content": "3 4 5"}]
    out = live.client.chat.completions.create(
        model="p", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    reference = direct(live, messages, "p", chat=True, max_new_tokens=6, logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(e.token for e in content) == out.choices[0].message.content
    assert [e.logprob for e in content] == pytest.approx([e.logprob for e in reference.logprobs], abs=1e-5)
    assert all(len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token for e in content)
    plain = live.client.chat.completions.create(model="p", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_penalties_and_logit_bias_are_honoured(live):
    echoed = live.client.completions.create(model="tiny", prompt="3 4 5", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "3 4 5" + direct(live, "3 4 5", max_new_tokens=4).text
    # a bias makes "11" repeat; the frequency penalty then pushes it out
    biased = {"model": "tiny", "prompt": "3 4 5", "max_tokens": 8, "temperature": 0, "logit_bias": {"11": 4.0}}
    penalised = live.client.completions.create(**biased, frequency_penalty=2.0, presence_penalty=0.5)
    assert (
        penalised.choices[0].text
        == direct(live, "3 4 5", logit_bias={11: 4.0}, frequency_penalty=2.0, presence_penalty=0.5).text
    )
    assert penalised.choices[0].text != live.client.completions.create(**biased).choices[0].text
    biased = live.client.completions.create(
        model="tiny", prompt="3 4 5", max_tokens=4, temperature=0, logit_bias={"11": 100}
    )
    assert biased.choices[0].text.split() == ["11"] * 4
    repeat = httpx.post(
        f"{live.url}/v1/completions",
        headers=auth(ALICE),
        json={"model": "p", "prompt": "3 4 5", "max_tokens": 8, "temperature": 0, "repetition_penalty": 1.5},
    )
    assert repeat.json()["choices"][0]["text"] == direct(live, "3 4 5", "p", repetition_penalty=1.5).text


def test_streamed_n_with_usage(live):
    chunks = list(
        live.client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "3 4"}],
            n=2,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
    assert text[0] == text[1] == direct(live, [{"role": "user", "content": "3 4"}], chat=True, max_new_tokens=5).text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


# Every field of the installed openai package's request types, and what this server does with a non-default value.
HONOURED, NO_EFFECT, REFUSED = "honoured", "no effect on the answer", "refused"
FIELDS = {
    "completions": {
        "model": HONOURED,
        "prompt": HONOURED,
        "max_tokens": HONOURED,
        "temperature": HONOURED,
        "top_p": HONOURED,
        "n": HONOURED,
        "stop": HONOURED,
        "seed": HONOURED,
        "logprobs": HONOURED,
        "echo": HONOURED,
        "logit_bias": HONOURED,
        "presence_penalty": HONOURED,
        "frequency_penalty": HONOURED,
        "stream_options": HONOURED,
        "user": NO_EFFECT,
        "best_of": (REFUSED, 2),
        "suffix": (REFUSED, "x"),
    },
    "chat": {
        "model": HONOURED,
        "messages": HONOURED,
        "max_tokens": HONOURED,
        "max_completion_tokens": HONOURED,
        "temperature": HONOURED,
        "top_p": HONOURED,
        "n": HONOURED,
        "stop": HONOURED,
        "seed": HONOURED,
        "logprobs": HONOURED,
        "top_logprobs": HONOURED,
        "logit_bias": HONOURED,
        "presence_penalty": HONOURED,
        "frequency_penalty": HONOURED,
        "stream_options": HONOURED,
        "user": (NO_EFFECT, "u1"),
        "metadata": (NO_EFFECT, {"k": "v"}),
        "store": (NO_EFFECT, True),
        "service_tier": (NO_EFFECT, "default"),
        "safety_identifier": (NO_EFFECT, "s"),
        "prompt_cache_key": (NO_EFFECT, "k"),
        "prompt_cache_retention": (NO_EFFECT, "24h"),
        "prompt_cache_options": (NO_EFFECT, {}),
        "parallel_tool_calls": (NO_EFFECT, False),
        "tools": (REFUSED, [{"type": "function", "function": {"name": "f"}}]),
        "tool_choice": (REFUSED, "required"),
        "functions": (REFUSED, [{"name": "f"}]),
        "function_call": (REFUSED, "auto"),
        "response_format": (REFUSED, {"type": "json_object"}),
        "audio": (REFUSED, {"voice": "alloy", "format": "wav"}),
        "modalities": (REFUSED, ["text", "audio"]),
        "prediction": (REFUSED, {"type": "content", "content": "x"}),
        "web_search_options": (REFUSED, {"search_context_size": "low"}),
        "moderation": (REFUSED, {"policy": {}}),
        "verbosity": (REFUSED, "high"),
        "reasoning_effort": (REFUSED, "high"),
    },
}


def test_every_field_of_the_openai_request_types_is_classified():
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    assert set(completion_create_params.CompletionCreateParamsBase.__annotations__) == set(FIELDS["completions"])
    assert set(chat_params.CompletionCreateParamsBase.__annotations__) == set(FIELDS["chat"])


@pytest.mark.parametrize(
    "endpoint,field", [(e, f) for e, fields in FIELDS.items() for f, v in fields.items() if isinstance(v, tuple)]
)
def test_fields_without_effect_are_accepted_and_the_rest_refused_by_name(live, endpoint, field):
    kind, value = FIELDS[endpoint][field]
    base = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    body, path = (
        ({**base, "prompt": "3 4"}, "/v1/completions")
        if endpoint == "completions"
        else ({**base, "messages": [{"role": "user", "content": "3 4"}]}, "/v1/chat/completions")
    )
    response = httpx.post(f"{live.url}{path}", headers=auth(ALICE), json={**body, field: value}, timeout=30)
    if kind == REFUSED:
        assert response.status_code == 400 and field in response.json()["error"]["message"], response.text
    else:
        plain = httpx.post(f"{live.url}{path}", headers=auth(ALICE), json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert _text(response) == _text(plain)


def _text(response: httpx.Response) -> str:
    choice = response.json()["choices"][0]
    return choice.get("text") or choice["message"]["content"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "3 4", "max_tokens": 0},
        {"prompt": "3 4", "max_tokens": -1, "echo": True},
        {"prompt": "3 4", "echo": True, "logprobs": 1, "prompt_logprobs": 1},
        {"prompt": "3 4", "stream_options": {"include_usage": True}},
        {"prompt": "3 4", "n": 17},
        {"prompt": "3 4", "logit_bias": {"x": 1}},
        {"prompt": "3 4", "logprobs": 21},
        {"prompt": []},
        {"prompt": ["3 4", ""]},
    ],
)
def test_inconsistent_options_are_400s_naming_the_field(live, body):
    response = httpx.post(
        f"{live.url}/v1/completions", headers=auth(ALICE), json={"model": "tiny", "max_tokens": 4, **body}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    named = [k for k in body if k != "model"]
    assert any(k in error["message"] or k == error["param"] for k in named), json.dumps(error)


def test_a_completion_reaches_an_adapter_as_its_training_encoded_prompts(live, tmp_path):
    """An adapter that pedro train trained on chat-templated prompts records it with its weights; a completion's
    text then goes through the chat template, unless the request asks for the raw text (raw_prompt)."""
    directory = make_adapter(tmp_path / "pc", "pedro", seed=3)  # the same weights as "p", which has no record
    record_prompt_format(directory, "chat_template")
    assert read_prompt_format(directory) == "chat_template"
    assert upload(live.url, ALICE, "pc", directory).status_code == 201
    templated = live.client.completions.create(model="pc", prompt="3 4 5", max_tokens=6, temperature=0)
    assert templated.choices[0].text == direct(live, "3 4 5", "p", chat=True, max_new_tokens=6).text
    assert templated.usage.prompt_tokens > 3  # the template's tokens are there
    raw = live.client.completions.create(
        model="pc", prompt="3 4 5", max_tokens=6, temperature=0, extra_body={"raw_prompt": True}
    )
    assert raw.choices[0].text == direct(live, "3 4 5", "p", max_new_tokens=6).text != templated.choices[0].text
    unrecorded = live.client.completions.create(model="p", prompt="3 4 5", max_tokens=6, temperature=0)
    assert unrecorded.choices[0].text == raw.choices[0].text


def test_top_p_zero_keeps_only_the_most_likely_token(live):
    out = live.client.completions.create(model="tiny", prompt="3 4 5", max_tokens=6, temperature=1.0, top_p=0, seed=3)
    assert out.choices[0].text == direct(live, "3 4 5", max_new_tokens=6).text  # greedy


# ------------------------------------------------------------------------------------------------ prompt logprobs


def scored(live, adapter, ids: list[int]) -> torch.Tensor:
    """log-softmax (T, V) of ``ids`` through transformers, the adapter loaded by PEFT: an independent reference."""
    model = AutoModelForCausalLM.from_pretrained(live.backbone)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, live.root / adapter)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(live):
    out = live.client.completions.create(
        model="p", prompt="3 4 5 6", max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    choice, ids = out.choices[0], [3, 4, 5, 6]
    generated = direct(live, "3 4 5 6", "p", max_new_tokens=3, logprobs=2)
    assert choice.text == "3 4 5 6" + generated.text
    lp = choice.logprobs
    assert lp.tokens[:4] == ["3", " 4", " 5", " 6"] and "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    reference = scored(live, "p", ids)
    assert lp.token_logprobs[1:4] == pytest.approx([float(reference[i, ids[i + 1]]) for i in range(3)], abs=1e-4)
    assert lp.token_logprobs[4:] == pytest.approx([e.logprob for e in generated.logprobs], abs=1e-5)
    for i, (token, value, top) in enumerate(zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]), 1):
        assert top[token] == value and 2 <= len(top) <= 3  # the 2 most likely, and the token itself
        if i < 4:
            best = reference[i - 1].topk(2)
            assert sorted(top.values(), reverse=True)[:2] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 3


@pytest.mark.parametrize("model", ["tiny", "p"])
def test_a_loglikelihood_request_returns_the_prompts_logprobs_only(live, model):
    """What lm-evaluation-harness sends to score a continuation: token ids, echo, logprobs 1, max_tokens 0."""
    prompts = [[5, 17, 33, 8, 41, 9], [60, 61, 62]]
    out = live.client.completions.create(
        model=model, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == 9
    for choice, ids in zip(out.choices, prompts):
        assert choice.finish_reason == "length" and choice.text == " ".join(map(str, ids))
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        reference = scored(live, None if model == "tiny" else model, ids)
        expected = [float(reference[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert sum(lp.token_logprobs[1:]) == pytest.approx(sum(expected), abs=1e-4)
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        # lm-evaluation-harness's is_greedy: each token's logprob is the best of its top_logprobs
        greedy = [int(reference[i].argmax()) == ids[i + 1] for i in range(len(ids) - 1)]
        assert [value == max(top.values()) for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:])] == greedy
    # lm-evaluation-harness's local-completions asks for one token and drops it ([ctxlen:-1]): the same numbers
    one = live.client.completions.create(
        model=model, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    for with_token, scored_only in zip(one.choices, out.choices):
        assert with_token.logprobs.token_logprobs[:-1] == scored_only.logprobs.token_logprobs
        assert with_token.logprobs.tokens[:-1] == scored_only.logprobs.tokens


def test_echo_of_token_id_prompts_is_their_decoded_text(live):
    out = live.client.completions.create(
        model="tiny", prompt=[[5, 6, 7], [2, 9]], max_tokens=2, temperature=0, echo=True
    )
    assert [c.text for c in out.choices] == [
        "5 6 7" + direct(live, [5, 6, 7], max_new_tokens=2).text,
        "9" + direct(live, [2, 9], max_new_tokens=2).text,  # 2 is the tokenizer's special unknown token: not text
    ]
    assert out.choices[0].logprobs is None


def test_streamed_echo_with_logprobs_sends_the_prompts_logprobs_first(live):
    body = dict(model="p", prompt="3 4 5", max_tokens=4, temperature=0, logprobs=1, echo=True, n=2, seed=5)
    whole = live.client.completions.create(**body)
    chunks = list(live.client.completions.create(**body, stream=True))
    for index in (0, 1):
        mine = [c for chunk in chunks for c in chunk.choices if c.index == index]
        assert mine[0].text.startswith("3 4 5") and mine[0].logprobs.tokens[:3] == ["3", " 4", " 5"]
        assert mine[0].logprobs.token_logprobs[0] is None
        expected = whole.choices[index].logprobs
        assert "".join(c.text for c in mine) == whole.choices[index].text
        assert [t for c in mine if c.logprobs for t in c.logprobs.tokens] == expected.tokens
        assert [o for c in mine if c.logprobs for o in c.logprobs.text_offset] == expected.text_offset
        assert [v for c in mine if c.logprobs for v in c.logprobs.token_logprobs] == pytest.approx(
            expected.token_logprobs
        )
    # n samples of one prompt: one prefill, the same prompt logprobs
    assert whole.choices[0].logprobs.token_logprobs[:3] == whole.choices[1].logprobs.token_logprobs[:3]
    scoring = list(
        live.client.completions.create(model="tiny", prompt=[7, 8, 9], max_tokens=0, echo=True, logprobs=0, stream=True)
    )
    pieces = [c for chunk in scoring for c in chunk.choices]
    assert len(pieces) == 1 and pieces[0].finish_reason == "length" and pieces[0].text == "7 8 9"
    assert pieces[0].logprobs.tokens == ["7", " 8", " 9"] and pieces[0].logprobs.token_logprobs[0] is None


def test_chat_has_no_prompt_logprobs(live):
    messages = [{"role": "user", "content": "3 4"}]
    for extra in ({"max_tokens": 0}, {"max_completion_tokens": 0}, {"prompt_logprobs": 1}):
        response = httpx.post(
            f"{live.url}/v1/chat/completions",
            headers=auth(ALICE),
            json={"model": "tiny", "messages": messages, **extra},
            timeout=30,
        )
        assert response.status_code == 400 and next(iter(extra)) in response.json()["error"]["message"], response.text
