"""Incremental detokenisation on the real SmolLM2 tokenizer (byte-level BPE: emoji and CJK characters are split
across several tokens): the streamed text grows by constant work per token, the deltas concatenate to the final
text, and the final text is exactly ``tokenizer.decode(ids, skip_special_tokens=True)`` -- also when the output
stops in the middle of a character, carries special tokens, or ends at a stop string. The engine thread decodes
with its own tokenizer copy, so a long encode holding the encoders' lock never stalls a step."""

from __future__ import annotations

import threading

import pytest
from conftest import tiny_model

from pedro.backbones import resolve_backbone
from pedro.compat import token_bytes
from pedro.engine import Engine, Request, SamplingParams
from pedro.engine import engine as engine_module
from pedro.engine.detokenizer import IncrementalDetokenizer, added_text, incomplete_tail, is_text

pytestmark = pytest.mark.real

TEXTS = [
    "Hello 👋🏽 世界! Ça va? 🇫🇷 naïve — 日本語のテキスト 🤖",
    "👨‍👩‍👧‍👦 family; 中文字符 and ∑∫ math ✓ – ελληνικά, русский, עברית, 한국어 🎉🎉",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    directory, gguf, _ = resolve_backbone("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _scripts(tokenizer) -> dict[str, list[int]]:
    a, b = (_ids(tokenizer, t) for t in TEXTS)
    return {
        "emoji-cjk": a,
        "more-scripts": b,
        "specials-inside": a[:5] + [0, 1] + a[5:9] + [2, 3] + b[:12] + [0],  # skipped by the decode
        "invalid-bytes": [225, 225] + _ids(tokenizer, " ok") + [138, 216] + a[:3],  # lone continuation bytes
    }


def test_every_prefix_decodes_to_the_full_decode(tokenizer):
    for name, ids in _scripts(tokenizer).items():
        detok = IncrementalDetokenizer()
        for n in range(1, len(ids) + 1):
            text = detok.update(ids[:n], lambda x: _decode(tokenizer, x))
            full = _decode(tokenizer, ids[:n])
            if full.endswith("\ufffd"):  # an incomplete character is held back
                assert full.startswith(text), (name, n)
            else:
                assert text == full, (name, n)
        assert detok.incremental and detok.prefix_offset > 0, name  # it did run on windows


def test_a_decoder_that_is_not_prefix_consistent_falls_back_to_full_decodes():
    def reversed_decode(ids):  # the text of a prefix is not a prefix of the text
        return "".join(str(i) for i in reversed(ids))

    detok = IncrementalDetokenizer()
    texts = [detok.update([1, 2, 3][:n], reversed_decode) for n in (1, 2, 3)]
    assert texts == ["1", "21", "321"] and not detok.incremental


@pytest.fixture
def scripted(monkeypatch):
    """The engine's sampler replaced by scripts: a request whose prompt is [7, i] emits scripts[i] in order."""
    scripts: list[list[int]] = []

    def sample(logits, params, generators, histories):
        return [scripts[prompt[1]][len(output)] for prompt, output in histories]

    monkeypatch.setattr(engine_module, "sample", sample)
    return scripts


def _engine(tokenizer) -> Engine:
    return Engine(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, max_batch=8, max_seq_len=128)


def _stream(engine: Engine, requests: list[Request]) -> dict[str, tuple[list[str], object]]:
    """Run ``requests`` streaming -> request id -> (delta texts, final output)."""
    for request in requests:
        engine.add_request(request, track_text=True)
    deltas: dict[str, list[str]] = {r.request_id: [] for r in requests}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            deltas[out.request_id].append(out.delta_text)
            if out.finished:
                final[out.request_id] = out
    return {rid: (deltas[rid], final[rid]) for rid in deltas}


def test_streamed_text_is_the_tokenizers_decode_and_the_deltas_add_up(tokenizer, scripted):
    engine = _engine(tokenizer)
    requests = []
    for name, ids in _scripts(tokenizer).items():
        cuts = [len(ids)] + [k for k in range(2, len(ids)) if _decode(tokenizer, ids[:k]).endswith("\ufffd")][:3]
        for k in cuts:  # the whole script, and cut in the middle of a character
            scripted.append(ids)
            sampling = SamplingParams(max_new_tokens=k, ignore_eos=True)
            requests.append(Request([7, len(scripted) - 1], sampling=sampling, request_id=f"{name}-{k}"))
    results = _stream(engine, requests)
    offline = engine.generate(
        [Request(r.prompt, sampling=r.sampling, request_id=r.request_id + "-offline") for r in requests]
    )
    for request, off in zip(requests, offline):
        deltas, out = results[request.request_id]
        k = request.sampling.max_new_tokens
        ids = scripted[request.prompt[1]][:k]
        assert out.token_ids == ids and out.finish_reason == "length"
        assert out.text == _decode(tokenizer, ids), request.request_id
        assert "".join(deltas) == out.text, request.request_id
        assert off.text == out.text  # streaming == non-streaming


def test_stop_strings_and_eos_on_multibyte_text(tokenizer, scripted):
    engine = _engine(tokenizer)
    ids = _ids(tokenizer, TEXTS[0])
    eos = tokenizer.eos_token_id
    scripted.extend([ids, ids + [eos, *ids]])
    requests = [
        Request([7, 0], sampling=SamplingParams(max_new_tokens=len(ids), stop=["世界"]), request_id="cjk-stop"),
        Request([7, 0], sampling=SamplingParams(max_new_tokens=len(ids), stop=["🤖", "🇫🇷"]), request_id="emoji-stop"),
        Request([7, 1], sampling=SamplingParams(max_new_tokens=len(ids) * 2 + 1), request_id="eos"),
    ]
    results = _stream(engine, requests)
    for request, stop in zip(requests[:2], ["世界", "🇫🇷"]):
        deltas, out = results[request.request_id]
        assert out.finish_reason == "stop" and out.text == TEXTS[0][: TEXTS[0].index(stop)]
        assert "".join(deltas) == out.text and _decode(tokenizer, out.token_ids).startswith(out.text + stop)
    deltas, out = results["eos"]
    assert out.finish_reason == "stop" and out.token_ids == ids + [eos]
    assert out.text == TEXTS[0] == _decode(tokenizer, out.token_ids) == "".join(deltas)


def test_decoding_never_waits_for_an_encode(tokenizer, scripted):
    """An encode holding the encoders' lock (a long prompt being tokenised) does not stall the engine thread."""
    engine = _engine(tokenizer)
    ids = _ids(tokenizer, TEXTS[1])
    scripted.append(ids)
    engine.add_request(
        Request([7, 0], sampling=SamplingParams(max_new_tokens=len(ids), ignore_eos=True)), track_text=True
    )
    finished = threading.Event()
    outputs = []

    def run():
        while engine.has_unfinished():
            outputs.extend(engine.step())
        finished.set()

    with engine._tokenizer_lock:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert finished.wait(timeout=60), "the engine thread waited for the encoders' lock"
    assert outputs[-1].text == TEXTS[1]


def test_token_bytes_join_to_the_text(tokenizer):
    """Each token's own bytes, read from the vocabulary, even for a token holding part of a character."""
    read = token_bytes(tokenizer)
    for text in TEXTS:
        ids = _ids(tokenizer, text)
        assert b"".join(read(t) for t in ids) == text.encode()
        assert any(not is_text(read(t)) for t in ids)  # the texts do split characters over tokens


def test_added_text_holds_an_unfinished_character_until_its_last_byte():
    party = "🎉".encode()
    assert [incomplete_tail(party[:n]) for n in range(5)] == [0, 1, 2, 3, 0]
    assert added_text(b"", party[:2]) == "" and added_text(party[:2], party[2:]) == "🎉"
    assert added_text(b"", b" a" + party[:1]) == " a" and added_text(party[:1], b"b") == "\ufffdb"


def test_logprob_texts_of_split_characters_join_to_the_prompt(tokenizer):
    """A prompt token holding part of a character adds no text and keeps its bytes; the token completing it adds
    the whole character: the tokens' texts join to the prompt's text and their bytes to its bytes."""
    engine = Engine("smollm2-135m", max_batch=1, max_seq_len=128)
    ids = _ids(tokenizer, TEXTS[0])
    out = engine.generate([Request(ids, sampling=SamplingParams(max_new_tokens=1, prompt_logprobs=3))])[0]
    entries = out.prompt_logprobs
    assert "".join(e.text for e in entries) == TEXTS[0]
    assert b"".join(e.raw if e.raw is not None else e.text.encode() for e in entries) == TEXTS[0].encode()
    split = [e for e in entries if e.raw is not None]
    assert split and all(not is_text(e.raw) for e in split)
    for e in entries[1:]:  # alternatives that split a character keep their bytes too: no two look alike
        assert all(raw is None or not is_text(raw) for raw in e.top_raw)
        assert len({raw if raw is not None else text for text, raw in zip(e.top_text, e.top_raw)}) == len(e.top)
