"""The sampler's logit adjustments and logprobs against independent computations: a hand-written loop over the
backbone's own forward (transformers, no cache), adjusting logits as OpenAI / vLLM define it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from pedro.engine import Engine, Request, RequestError, SamplingParams
from pedro.engine.sampling import ARGMAX_BLOCK, adjust_logits, finite_rows, first_argmax, sample

PROMPT = [3, 4, 5, 6, 5]


def _reference(params: dict, new_tokens: int = 10) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by hand: full forward each step, penalties applied to the last logits as specified.
    -> the tokens and each step's raw log-softmax."""
    model = tiny_model("llama")
    ids, raw = list(PROMPT), []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        raw.append(logits.log_softmax(-1))
        adjusted = logits.clone()
        output = ids[len(PROMPT) :]
        for token, bias in params.get("logit_bias", {}).items():
            adjusted[token] += bias
        penalty = params.get("repetition_penalty", 1.0)
        for token in set(ids):
            adjusted[token] = adjusted[token] / penalty if adjusted[token] > 0 else adjusted[token] * penalty
        for token in set(output):
            adjusted[token] -= output.count(token) * params.get("frequency_penalty", 0.0) + params.get(
                "presence_penalty", 0.0
            )
        ids.append(int(adjusted.argmax()))
    return ids[len(PROMPT) :], raw


def _engine_run(params: dict, new_tokens: int = 10, **extra):
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **params, **extra)
    bystander = Request([7, 8, 9], sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    out, alone = engine.generate([Request(PROMPT, sampling=sampling), bystander])
    solo = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=4, max_seq_len=64).generate([bystander])[0]
    assert alone.token_ids == solo.token_ids  # another row's adjustments never leak into this one
    return out


@pytest.mark.parametrize(
    "params",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"frequency_penalty": -0.5, "presence_penalty": 1.5},
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.5},
        {"logit_bias": {11: 100.0}},
        {"logit_bias": {11: 5.0, 12: -100.0}, "frequency_penalty": 1.0},
    ],
)
def test_logit_adjustments_match_a_hand_computed_reference(params):
    expected, _ = _reference(params)
    plain, _ = _reference({})
    assert expected != plain  # the adjustment changes the answer, so equality below is not vacuous
    assert _engine_run(params).token_ids == expected


def test_adjust_logits_on_a_known_vector():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={2: 1.0})
    got = adjust_logits(logits, params, ([0, 1], [3, 3, 1]))
    # bias: [2, -1, 1.5, 3]; repetition over {0, 1, 3}: [1, -2, 1.5, 1.5]; counts [0, 1, 0, 2]:
    # subtract [0, 0.5 + 0.25, 0, 1.0 + 0.25]
    assert torch.allclose(got, torch.tensor([1.0, -2.75, 1.5, 0.25]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # the input is not modified


def test_logprobs_are_the_backbones_own_log_softmax():
    tokens, raw = _reference({})
    out = _engine_run({}, logprobs=3)
    assert out.token_ids == tokens and len(out.logprobs) == len(tokens)
    for step, (token, entry) in enumerate(zip(tokens, out.logprobs)):
        assert entry.token == token and entry.logprob == pytest.approx(float(raw[step][token]), abs=1e-4)
        top = raw[step].topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_are_absent_unless_asked_and_bad_values_are_refused():
    assert _engine_run({}).logprobs is None
    assert all(e.top == () for e in _engine_run({}, logprobs=0).logprobs)
    for bad in (
        dict(logprobs=21),
        dict(logprobs=-1),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=float("nan")),
        dict(repetition_penalty=0),
        dict(logit_bias={5: 101}),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={True: 1.0}),
    ):
        with pytest.raises(RequestError, match=next(iter(bad))):
            SamplingParams(**bad)
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=2, max_seq_len=64)
    out = engine.generate([Request(PROMPT, sampling=SamplingParams(logit_bias={10_000: 1.0}))])[0]
    assert out.finish_reason == "error" and "logit_bias token ids must be in [0, 97)" in out.error


def test_non_finite_rows_are_found_and_finite_extremes_kept():
    logits = torch.randn(6, 50)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, 0] = float("-inf")
    logits[4, :2] = 3e38  # finite, but its sum overflows: checked element by element, kept
    logits[5, 10] = logits[5, 20] = 100.0  # a tie for the maximum: the first index wins, as argmax's
    assert finite_rows(logits) == [True, False, False, False, True, True]
    greedy = [SamplingParams()] * 6
    tokens = sample(logits, greedy, [torch.Generator()] * 6, [None] * 6)
    assert tokens[1:4] == [None, None, None]
    assert tokens[0] == int(logits[0].argmax()) and tokens[4] == 0 and tokens[5] == 10


@pytest.mark.parametrize("vocab", [ARGMAX_BLOCK - 1, 2 * ARGMAX_BLOCK, 3 * ARGMAX_BLOCK + 5, 49_152, 151_936])
def test_first_argmax_is_the_first_maximum_in_blocked_and_short_vocabularies(vocab):
    """Greedy decoding's argmax by blocks picks what ``max(-1).indices`` picks -- the first of tied maxima --
    wherever the maximum sits: in a whole block, in the last short block, at the very last column, in
    several blocks at once (the first block's copy wins), and in a row of -inf but one column."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-4, 4, (12, vocab), generator=generator).float()  # many ties at the maximum
    logits[1, -1] = 9.0
    logits[2, vocab - vocab % ARGMAX_BLOCK - 1] = 9.0
    logits[3, [5, vocab - 1]] = 9.0
    logits[4, [vocab // 2, vocab // 2 + 1, vocab - 2]] = 9.0
    logits[5] = float("-inf")
    logits[5, vocab // 3] = -1e30
    logits[6] = -0.0
    logits[6, vocab // 2] = 0.0
    logits[7:] = torch.randn(5, vocab, generator=generator)
    picked = first_argmax(logits)
    assert picked.dtype == torch.long
    assert picked.tolist() == logits.max(-1).indices.tolist()
