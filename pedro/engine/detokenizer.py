"""Incremental detokenisation: a growing list of generated token ids -> its text, at constant work per token.

Decoding the whole output at every step costs O(length) per token, O(length^2) per request. Instead each step
decodes only a small window: the tokens of the last emitted chunk (context, so that decoders which treat a
sequence's first token specially -- SentencePiece's leading space -- decode the new tokens as they would inside
the full text) plus the tokens since. What the window decodes to beyond the context's own text is the new text
(the scheme of vLLM's detokenizer and tokenizers' ``DecodeStream``). A window whose text ends in U+FFFD is an
incomplete UTF-8 character (an emoji or CJK character split across byte-level tokens) and is held until the
character completes; a special token skipped by the decode adds no text and is simply carried in the window.

The engine decodes the full output once more when a request finishes, so the final text is exactly
``tokenizer.decode(ids, skip_special_tokens=True)``; a decoder for which the window's text does not extend the
context's (not prefix-consistent) makes this sequence fall back to full decodes.
"""

from __future__ import annotations

from typing import Callable

Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """The text so far of one sequence's generated ids; ``update`` after each new token."""

    __slots__ = ("prefix_offset", "read_offset", "prefix_text", "text", "incremental")

    def __init__(self) -> None:
        self.prefix_offset = 0  # first token of the context (the last emitted chunk)
        self.read_offset = 0  # first token not yet turned into text
        self.prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self.text = ""
        self.incremental = True

    def update(self, ids: list[int], decode: Decode) -> str:
        """``ids``: every generated id so far (the previous call's plus the new ones) -> the text so far, without
        a trailing incomplete character. ``decode`` decodes a list of ids (skipping special tokens)."""
        if not self.incremental:
            self.text = decode(ids)
            return self.text
        window = decode(ids[self.prefix_offset :])
        if len(window) <= len(self.prefix_text) or window.endswith("\ufffd"):
            return self.text  # nothing new yet (a skipped special token), or an incomplete character
        if not window.startswith(self.prefix_text):
            self.incremental = False
            return self.update(ids, decode)
        self.text += window[len(self.prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.prefix_text = decode(ids[self.prefix_offset : self.read_offset])
        return self.text


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` begin a UTF-8 character that ``data`` does not finish (0-3)."""
    for k in range(1, min(4, len(data)) + 1):
        byte = data[-k]
        if byte & 0xC0 == 0x80:  # a continuation byte: the character began further back
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return k if k < need else 0
    return 0


def added_text(pending: bytes, token: bytes) -> str:
    """The text a token of bytes ``token`` adds after text whose last bytes ``pending`` are an unfinished
    character: the characters it finishes and any whole ones after, not the one it leaves unfinished (which the
    token completing it adds). Undecodable bytes read as U+FFFD, as a lossy decode of the whole text does."""
    data = pending + token
    return data[: len(data) - incomplete_tail(data)].decode("utf-8", "replace")


def is_text(data: bytes) -> bool:
    """Whether ``data`` is whole UTF-8 text by itself."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
