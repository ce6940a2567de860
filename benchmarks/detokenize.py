"""Per-token cost of turning a streamed request's tokens into text, at a short and a long output: the engine's
incremental detokenizer (pedro/engine/detokenizer.py) against decoding the whole output at every step.

    python benchmarks/detokenize.py                # SmolLM2's tokenizer, outputs of 16 and 1024 tokens

The text is multilingual (emoji and CJK split across byte-level tokens). For each length n, the cost of the
step that adds token n is timed (median over repeats and over the last few tokens before n).
"""

from __future__ import annotations

import argparse
import statistics
import time

from pedro.backbones import resolve_backbone
from pedro.engine.detokenizer import IncrementalDetokenizer

TEXT = (
    "The engine streams text as it is generated: 👋🏽 世界, naïve café, 日本語のテキスト, ελληνικά 🤖. "
    "Each step adds one token to every running request, and its text must follow without re-reading the past. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=8, help="tokens before n whose steps are timed")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    directory, gguf, _ = resolve_backbone("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    longest = max(args.lengths)
    ids: list[int] = []
    while len(ids) < longest:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    ids = ids[:longest]

    def incremental(n: int) -> list[float]:
        detok, times, output = IncrementalDetokenizer(), [], []
        for k in range(1, n + 1):
            output.append(ids[k - 1])  # as the engine grows a sequence's output ids
            start = time.perf_counter()
            detok.update(output, decode)
            if k > n - args.window:
                times.append(time.perf_counter() - start)
        assert decode(ids[:n]).startswith(detok.text)
        return times

    def full(n: int) -> list[float]:
        times = []
        for k in range(max(1, n - args.window + 1), n + 1):
            start = time.perf_counter()
            decode(ids[:k])
            times.append(time.perf_counter() - start)
        return times

    print(f"SmolLM2 tokenizer, per-token detokenisation cost (median of {args.repeats} x {args.window} steps)")
    print(f"{'output tokens':>14} {'incremental':>14} {'full decode':>14}")
    for n in args.lengths:
        inc = statistics.median(t for _ in range(args.repeats) for t in incremental(n))
        whole = statistics.median(t for _ in range(args.repeats) for t in full(n))
        print(f"{n:>14} {inc * 1e6:>11.1f} us {whole * 1e6:>11.1f} us")


if __name__ == "__main__":
    main()
