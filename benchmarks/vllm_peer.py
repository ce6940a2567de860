"""vLLM as a peer engine: runs inside vLLM's own virtual environment, driven by benchmarks/peer.py.

vLLM pins its own torch and transformers, so it cannot share pedro's environment; this script imports nothing
from pedro. It loads the model once, then answers one JSON command per stdin line with one JSON line on stdout:

    {"prompts": [[ids...], ...], "adapters": [path | null, ...], "max_tokens": 128}
    -> {"seconds": wall time of the generate call, "tokens": [[generated ids], ...]}

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): vLLM's default puts it in a
second process, which was slower on the 2-core host the benchmark was measured on (docs/engine.md, "vLLM as a
peer").

Every request is greedy with ``ignore_eos``, so both engines generate exactly ``max_tokens`` per prompt. The
first line of argv is a JSON spec: {"model": dir, "dtype": "bfloat16" | "float32", "max_num_seqs": n,
"max_model_len": n, "lora": {"max_loras": n, "max_lora_rank": r, "target_modules": [...]} | null}.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    # vLLM logs to stdout: the answers get a private copy of it, and everything else (this process's and its
    # workers') goes to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    lora = spec.get("lora")
    extra = {}
    if lora:
        extra = dict(
            enable_lora=True,
            max_loras=lora["max_loras"],
            max_cpu_loras=lora["max_loras"],
            max_lora_rank=lora["max_lora_rank"],
            lora_target_modules=lora["target_modules"],
        )
    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "bfloat16"),
        max_num_seqs=spec["max_num_seqs"],
        max_model_len=spec["max_model_len"],
        seed=0,
        **extra,
    )
    ids: dict[str, int] = {}
    print(json.dumps({"ready": True}), file=answers, flush=True)

    def requests(command: dict) -> tuple[list, SamplingParams, list | None]:
        sampling = SamplingParams(max_tokens=command["max_tokens"], temperature=0.0, ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in command["prompts"]]
        if not any(command["adapters"]):
            return prompts, sampling, None
        loras = [
            LoRARequest(path, ids.setdefault(path, len(ids) + 1), path) if path else None
            for path in command["adapters"]
        ]
        return prompts, sampling, loras

    for line in sys.stdin:
        prompts, sampling, loras = requests(json.loads(line))
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, lora_request=loras, use_tqdm=False)
        seconds = time.perf_counter() - start
        answer = {"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
