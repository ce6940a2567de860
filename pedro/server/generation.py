"""One API request as several engine requests, and their outputs as OpenAI choices.

A request has ``len(prompts) * n`` choices; choice ``i`` is prompt ``i // n``, sample ``i % n`` (OpenAI's
numbering) and, when the request has a seed, runs with seed ``seed + i % n`` (wrapping around the signed
64-bit range, ``nth_seed``), so each choice can be reproduced alone. Every choice reaches the engine in one
command (``Backend.stream_all``), so it admits the n samples of a prompt together and prefills that prompt
once (engine.py), however busy it is. Every choice is opened (admitted, first token out)
before the caller answers, so a refusal of any of them is an HTTP error and the others are aborted; afterwards
their outputs are merged in arrival order.

Logprobs are rendered in both of OpenAI's shapes: the completions' parallel lists and chat's ``content`` list.
Completions' ``echo`` puts the prompt in front of a choice's text (a text prompt as given, token ids decoded by
the engine) and, with ``logprobs``, the prompt's tokens in front of its logprobs, scored by the engine's prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import AsyncGenerator, Optional, Sequence

from pedro.engine import RequestOutput, SamplingParams, TokenLogprob, nth_seed
from pedro.server.backend import Backend, Prompt
from pedro.server.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_index: int
    prompt: Prompt
    sampling: SamplingParams
    echo: bool = False  # the prompt goes in front of the completion (completions' ``echo``)
    raw_prompt: Optional[bool] = None  # how a text prompt is encoded (Backend.stream)

    def echo_text(self, out: RequestOutput) -> str:
        """What goes in front of the completion: nothing, the text prompt as given, or the token ids decoded."""
        if not self.echo:
            return ""
        return self.prompt if isinstance(self.prompt, str) else out.prompt_text or ""


def choices(
    prompts: Sequence[Prompt], n: int, sampling: SamplingParams, echo: bool = False, raw_prompt: Optional[bool] = None
) -> list[Choice]:
    """``len(prompts) * n`` choices. With ``echo`` the engine also decodes a token-id prompt and, when the request
    asks for logprobs, scores the prompt's tokens (the same number of alternatives)."""
    out = []
    for p, prompt in enumerate(prompts):
        prompt_logprobs, prompt_text = sampling.prompt_logprobs, sampling.return_prompt_text
        if echo:
            prompt_logprobs, prompt_text = sampling.logprobs, not isinstance(prompt, str)
        for k in range(n):
            seed = None if sampling.seed is None else nth_seed(sampling.seed, k)
            params = dataclasses.replace(
                sampling, seed=seed, prompt_logprobs=prompt_logprobs, return_prompt_text=prompt_text
            )
            out.append(Choice(p * n + k, p, prompt, params, echo, raw_prompt))
    return out


@dataclass
class Opened:
    choice: Choice
    first: RequestOutput
    rest: AsyncGenerator[RequestOutput, None]


async def open_all(backend: Backend, wanted: list[Choice], adapter: Optional[str], tenant: str) -> list[Opened]:
    """Start every choice and wait for each one's first output; if any fails, close the others (their engine
    requests are aborted) and raise its error."""
    streams = await backend.stream_all([(c.prompt, c.sampling, c.raw_prompt) for c in wanted], adapter, tenant)
    firsts: list[RequestOutput] = []
    for first in await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True):
        if isinstance(first, BaseException):
            await close_all(streams)
            raise first
        firsts.append(first)
    return [Opened(c, f, s) for c, f, s in zip(wanted, firsts, streams)]


async def close_all(streams: list[AsyncGenerator[RequestOutput, None]]) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def merged(opened: list[Opened]) -> AsyncGenerator[tuple[Choice, RequestOutput], None]:
    """Every choice's outputs, first outputs first, then as they arrive; an error of any one is raised."""
    for o in opened:
        yield o.choice, o.first
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(o: Opened) -> None:
        try:
            async for out in o.rest:
                await queue.put((o.choice, out))
        except BaseException as err:  # handed to the consumer, which stops everything
            await queue.put((o.choice, err))
        finally:
            await queue.put((o.choice, None))

    live = [o for o in opened if not o.first.finished]
    tasks = [asyncio.ensure_future(pump(o)) for o in live]
    try:
        remaining = len(tasks)
        while remaining:
            choice, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([o.rest for o in opened])


# ------------------------------------------------------------------------------------------------ logprobs


def _shown(text: str, raw: Optional[bytes], prefix: str = "") -> str:
    """How a token is shown: its text, or for a token that holds part of a UTF-8 character (``raw``: its bytes)
    those bytes escaped (``\\xf0\\x9f``), as OpenAI shows them (with ``bytes:`` before them in completions)."""
    return text if raw is None else prefix + raw.decode("utf-8", "backslashreplace")


def completion_logprobs(
    entries: Sequence[TokenLogprob], offset: int, prompt: Sequence[TokenLogprob] = ()
) -> CompletionLogprobs:
    """The completions format; ``offset``: where the first token's text starts in the choice's text. ``prompt``:
    an echoed prompt's entries, put first, their offsets counted from the start of the text. As OpenAI's legacy
    completions do, each top_logprobs holds the token itself besides the k most likely (so up to k + 1 entries);
    a prompt's first token has null for both, as nothing predicts it. A token that holds part of a character is
    shown as ``bytes:`` and its bytes escaped; its offset is where the character it belongs to starts."""
    result = CompletionLogprobs()
    for part, start in ((prompt, 0), (entries, offset)):
        for entry in part:
            shown = _shown(entry.text, entry.raw, "bytes:")
            top = None
            if entry.logprob is not None:
                top = {_shown(text, raw, "bytes:"): value for text, raw, value in entry.alternatives()}
                top.setdefault(shown, entry.logprob)
            result.tokens.append(shown)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append(top)
            result.text_offset.append(start)
            start += len(entry.text)
    return result


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """The chat format: ``bytes`` are each token's own bytes (for a token that holds part of a character, the
    part: joining the bytes of consecutive tokens gives their text back, what OpenAI documents them for)."""

    def top(text: str, raw: Optional[bytes], value: float) -> TopLogprob:
        return TopLogprob(token=_shown(text, raw), logprob=value, bytes=list(raw if raw is not None else text.encode()))

    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                token=_shown(e.text, e.raw),
                logprob=e.logprob,
                bytes=list(e.raw if e.raw is not None else e.text.encode()),
                top_logprobs=[top(text, raw, value) for text, raw, value in e.alternatives()],
            )
            for e in entries
        ]
    )


def streamed(held: list[TokenLogprob], room: int, finished: bool) -> list[TokenLogprob]:
    """Take from the front of ``held`` the logprobs of the tokens whose text lies within the next ``room``
    characters streamed (all of them once the choice has finished): the engine holds text back while it could
    still become a stop string, and a chunk's logprobs must be those of the tokens its text shows."""
    ready = 0
    while ready < len(held) and (finished or len(held[ready].text) <= room):
        room -= len(held[ready].text)
        ready += 1
    taken = held[:ready]
    del held[:ready]
    return taken


def new_logprobs(out: RequestOutput) -> list[TokenLogprob]:
    """The logprobs of the tokens this output added."""
    if not out.logprobs or not out.delta_token_ids:
        return []
    return out.logprobs[len(out.logprobs) - len(out.delta_token_ids) :]


def usage_counts(finals: list[tuple[Choice, RequestOutput]]) -> tuple[int, int]:
    """(prompt tokens, each prompt counted once however many samples it has; completion tokens of every choice)."""
    prompts = {choice.prompt_index: out.prompt_tokens for choice, out in finals}
    return sum(prompts.values()), sum(len(out.token_ids) for _, out in finals)
