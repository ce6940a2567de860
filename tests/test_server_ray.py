"""``pedro serve --ray --replicas 2`` on a local Ray cluster (CPU): 8 adapters, all requests succeed with the
engine's answers, and Ray Serve's model multiplexing keeps each adapter mostly on one replica.

Needs the optional extra (``pip install 'pedro-peft[ray]'``); skipped without it. About a minute."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_kit import PROMPTS, TENANTS, make_adapter, make_backbone, upload, write_config

from pedro.engine import Engine, Request, SamplingParams
from pedro.server.process import ServerProcess

pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install 'pedro-peft[ray]'")

ADAPTERS = [f"t{i}" for i in range(8)]


def test_two_replicas_serve_eight_multiplexed_adapters(tmp_path):
    backbone = make_backbone(tmp_path / "backbone")
    sources = {name: make_adapter(tmp_path / "src" / name, "pedro" if i % 2 == 0 else "lora", seed=i + 1) for i, name in enumerate(ADAPTERS)}
    config = write_config(tmp_path, backbone, ray={"replicas": 2, "num_cpus": 0.5, "max_adapters_per_replica": 8})
    jobs = [(name, prompt) for name in ADAPTERS for prompt in PROMPTS * 2]

    with ServerProcess(config, tmp_path / "server.log", extra_args=("--ray",), startup_timeout=300) as server:
        for name, directory in sources.items():
            assert upload(server.url, TENANTS["alice"], name, directory).status_code == 201

        async def one(c: openai.AsyncOpenAI, name: str, prompt: str) -> str:
            stream = await c.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        async def everyone() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=TENANTS["alice"], max_retries=0, timeout=120) as c:
                # first use of each adapter one at a time: a replica loads it and reports it to Ray Serve's router
                # (a cold burst is spread before any replica has reported the adapter)
                for name in ADAPTERS:
                    await one(c, name, PROMPTS[0])
                return await asyncio.gather(*(one(c, *job) for job in jobs))

        answers = asyncio.run(everyone())
        routing = httpx.get(f"{server.url}/health").json()["routing"]
        # a refusal raised inside an engine replica reaches the client as the same OpenAI error
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TENANTS["alice"], max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="at most 64"):
            client.completions.create(model="t0", prompt=" ".join(["7"] * 65), max_tokens=4)

    engine = Engine(str(backbone), max_batch=16, max_seq_len=128)
    for name, directory in sources.items():
        engine.add_adapter(name, directory)
    refs = engine.generate([Request(p, adapter=n, raw_prompt=True, sampling=SamplingParams(max_new_tokens=8)) for n, p in jobs])
    assert answers == [r.text for r in refs]

    print("routing counts (adapter -> replica -> requests):", json.dumps(routing, indent=1))
    assert sum(sum(c.values()) for c in routing.values()) == len(jobs) + len(ADAPTERS)
    replicas = {replica for counts in routing.values() for replica in counts}
    assert len(replicas) == 2  # the load is spread over both replicas ...
    for counts in routing.values():  # ... and each adapter mostly stays on one of them
        assert max(counts.values()) / sum(counts.values()) >= 0.75, routing
