"""Decode-step time of the engine's per-row scaling, side by side in one process: the current form (tables hold z,
applied as x + x * z in one torch.addcmul) against the former one (tables held 1 + z in the backbone's dtype,
applied as x * (1 + z)), on the same running batch of PEDRO rows.

    python benchmarks/scale_form.py                      # SmolLM2-135M, bf16, batch 32, 1 torch thread

The two forms alternate in blocks of a few decoding steps over one batch (the cache grows by one token per
step, so interleaving keeps both at the same lengths); the median step time of each is reported with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import pedro
from pedro.engine import Engine, Request, SamplingParams
from pedro.engine import runner as engine_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=24, help="blocks per form")
    parser.add_argument("--steps", type=int, default=3, help="decoding steps per block")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = pedro.load_backbone(args.backbone, dtype=args.dtype, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = pedro.load_backbone(args.backbone, dtype="float32", quiet=True)
        adapter = pedro.get_pedro_model(base, pedro.PedroConfig())
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if "pedro_" in name:
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        adapter.save_pretrained(tmp)
        del base, adapter
        total = args.prompt_len + 2 * args.blocks * args.steps + 8
        engine = Engine(
            model, tokenizer, max_batch=args.batch, max_seq_len=total, max_prefill_tokens=args.batch * args.prompt_len
        )
        engine.add_adapter("p", tmp)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.batch):
            prompt = torch.randint(100, 40000, (args.prompt_len,), generator=g).tolist()
            engine.add_request(
                Request(prompt, adapter="p", sampling=SamplingParams(max_new_tokens=total, ignore_eos=True))
            )
        while engine.num_running < args.batch:
            engine.step()  # prefill (the adapter loads on a background thread first)

    rows, runner = engine.rows, engine.runner
    current = engine_runner._Context.scale
    one_plus = {point: (1 + table.float()).to(table.dtype) for point, table in rows.scales.items()}

    def former(ctx, layer, point, x, inplace):  # the former decode path: one multiply by a slice of 1 + z
        return x * one_plus[point][layer][: x.shape[0]]

    in_scale = [0.0]

    def timed(form):  # the time spent in the scaling itself, summed over a step
        def scale(ctx, layer, point, x, inplace):
            start = time.perf_counter()
            out = form(ctx, layer, point, x, inplace)
            in_scale[0] += time.perf_counter() - start
            return out

        return scale

    tokens = torch.tensor([seq.output_ids[-1] for seq in engine.scheduler.running])
    times: dict[str, list[float]] = {"former x * (1 + z)": [], "current x + x * z": []}
    scale_times: dict[str, list[float]] = {name: [] for name in times}
    forms = {"former x * (1 + z)": timed(former), "current x + x * z": timed(current)}
    runner.decode(tokens)  # warm-up
    for block in range(2 * args.blocks):
        name = list(forms)[block % 2]
        engine_runner._Context.scale = forms[name]
        for _ in range(args.steps):
            in_scale[0] = 0.0
            start = time.perf_counter()
            runner.decode(tokens)
            times[name].append(time.perf_counter() - start)
            scale_times[name].append(in_scale[0])
    engine_runner._Context.scale = current
    medians = {name: statistics.median(t) for name, t in times.items()}
    points = sorted(f"{side}:{module}" for side, module in rows.live_points())
    print(
        f"{args.backbone} {args.dtype}, batch {args.batch} PEDRO rows (points {', '.join(points)}), "
        f"prompt {args.prompt_len}, {args.threads} thread(s), {len(times['current x + x * z'])} steps per form"
    )
    for name, median in medians.items():
        print(
            f"  {name:20s} decode step median {median * 1e3:7.2f} ms, of which scaling "
            f"{statistics.median(scale_times[name]) * 1e3:5.2f} ms"
        )
    ratio = medians["current x + x * z"] / medians["former x * (1 + z)"]
    print(f"  current / former: {ratio:.3f}")


if __name__ == "__main__":
    main()
