"""Next-token choice for a batch of rows, each with its own sampling parameters and random generator.

Greedy rows take one batched argmax. Sampled rows get temperature / top-k / top-p applied as batched tensor
ops; only the final draw loops over rows, because each request owns its torch.Generator (so a seeded request
gives the same tokens whatever else is in the batch).

A row whose logits are not finite (an adapter whose weights overflow) gets no token: the engine fails that
request alone. Hostile values cannot reach a kernel: temperatures below GREEDY_BELOW are greedy (SamplingParams)
and a top_k beyond the vocabulary is "off".
"""

from __future__ import annotations

import torch

from pedro.engine.request import SamplingParams


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (N, V) -> log-probabilities after temperature, top-k (0 = off) and top-p (1 = off) per row."""
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1])
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = ranks[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest prefix whose mass reaches top_p; the first token always stays (a top_p that rounds to
    # 0 in float32, such as 1e-300, would otherwise drop every token)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits).log_softmax(-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int | None]:
    """One next token per row of ``logits`` (N, V); None for a row whose logits are not all finite."""
    finite = torch.isfinite(logits).all(-1).tolist()
    tokens: list[int | None] = [t if ok else None for t, ok in zip(logits.argmax(-1).tolist(), finite)]
    sampled = [i for i, p in enumerate(params) if not p.greedy and finite[i]]
    if sampled:
        vocab = logits.shape[-1]
        rows = torch.tensor(sampled)
        logprobs = filter_logits(
            logits[rows].float(),
            torch.tensor([params[i].temperature for i in sampled], dtype=torch.float32),
            torch.tensor([min(params[i].top_k, vocab) for i in sampled]),
            torch.tensor([params[i].top_p for i in sampled], dtype=torch.float32),
        )
        probs = logprobs.exp()
        for j, i in enumerate(sampled):
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i])[0])
    return tokens
