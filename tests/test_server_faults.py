"""Faults against a live server: a client killed mid-stream, a full queue, a crash during an upload and a restart.

The backbone here has no EOS token, so a request runs exactly to max_tokens: a cancelled request is visible
as one that stopped early."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from server_kit import ADMIN_KEY, TENANTS, make_adapter, make_backbone, write_config
from server_process import ServerProcess, auth, upload

ALICE = TENANTS["alice"]
LONG = 3000  # tokens: ~10 s of decoding here, far longer than any check below waits
SIZE = dict(max_position_embeddings=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-faults")
    backbone = make_backbone(root / "backbone", endless=True, **SIZE)

    def config_in(directory):
        directory.mkdir()
        # one tenant may fill the whole queue here: these tests are about the engine's bound, not fairness
        return write_config(
            directory,
            backbone,
            max_batch=2,
            max_queued=2,
            max_seq_len=4096,
            max_tokens=LONG,
            max_requests_per_tenant=100,
        )

    return SimpleNamespace(root=root, config_in=config_in, adapter=make_adapter(root / "keep", "pedro", seed=5, **SIZE))


@pytest.fixture(scope="module")
def server(setup):
    with ServerProcess(setup.config_in(setup.root / "shared"), setup.root / "server.log") as process:
        yield process


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=auth(ADMIN_KEY)).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def cancellations(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=auth(ADMIN_KEY)).text
    return sum(float(v) for v in re.findall(r'^pedro_requests_total{[^}]*outcome="cancelled"[^}]*} (\S+)$', text, re.M))


def wait_idle(url: str, timeout: float = 8.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0 and health["in_flight"] == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"the server still has requests after {timeout} s: {health}")


def test_killed_client_cancels_its_request_and_frees_the_slot(server):
    client = textwrap.dedent(f"""
        import openai, sys
        c = openai.OpenAI(base_url="{server.url}/v1", api_key="{ALICE}", max_retries=0)
        for chunk in c.completions.create(model="tiny", prompt="3 4 5", max_tokens={LONG}, temperature=0, stream=True):
            print("chunk", flush=True)
    """)
    tokens, cancelled = metric(server.url, "pedro_generated_tokens_total"), cancellations(server.url)
    proc = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
    for _ in range(3):
        assert proc.stdout.readline() == "chunk\n"
    assert httpx.get(f"{server.url}/health").json()["running"] == 1
    proc.kill()
    proc.wait()
    wait_idle(server.url)
    assert metric(server.url, "pedro_generated_tokens_total") - tokens < LONG / 2
    assert cancellations(server.url) == cancelled + 1
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0)
    assert c.completions.create(model="tiny", prompt="3 4 5", max_tokens=5, temperature=0).usage.completion_tokens == 5


def test_a_client_gone_before_its_first_token_is_cancelled_too(server):
    tokens, cancelled = metric(server.url, "pedro_generated_tokens_total"), cancellations(server.url)
    with pytest.raises(httpx.ReadTimeout):  # hangs up while its (non-streaming) request is still running
        httpx.post(
            f"{server.url}/v1/completions",
            headers=auth(ALICE),
            timeout=1.0,
            json={"model": "tiny", "prompt": "3 4", "max_tokens": LONG, "temperature": 0},
        )
    wait_idle(server.url)
    assert metric(server.url, "pedro_generated_tokens_total") - tokens < LONG / 2
    assert cancellations(server.url) == cancelled + 1


def test_full_queue_answers_429_with_retry_after_then_recovers(server):
    async def one(c: openai.AsyncOpenAI):
        try:
            return await c.completions.create(model="tiny", prompt="3 4 5", max_tokens=300, temperature=0)
        except openai.RateLimitError as err:
            return err

    async def burst():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c) for _ in range(10)))

    results = asyncio.run(burst())
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(served) + len(refused) == 10
    assert len(served) >= 4 and refused  # 2 running + 2 queued fit; the rest is refused
    assert all(r.usage.completion_tokens == 300 for r in served)
    for err in refused:
        assert err.response.headers["retry-after"] == "1"
        assert "capacity" in err.message and err.body["type"] == "rate_limit_error"
    wait_idle(server.url)
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0)
    assert c.completions.create(model="tiny", prompt="3 4 5", max_tokens=5).usage.completion_tokens == 5


def test_restart_keeps_adapters_and_never_shows_a_half_written_upload(setup):
    config = setup.config_in(setup.root / "restart")  # a server of its own: it gets killed
    adapters = setup.root / "restart" / "adapters"
    with ServerProcess(config, setup.root / "server.log") as first:
        assert upload(first.url, ALICE, "keep", setup.adapter).status_code == 201
        c = openai.OpenAI(base_url=f"{first.url}/v1", api_key=ALICE, max_retries=0)
        before = c.completions.create(model="keep", prompt="3 4 5", max_tokens=8, temperature=0).choices[0].text

        # an upload that stalls half-way, then the server dies (SIGKILL) under it
        files = [("files", (p.name, p.read_bytes())) for p in sorted(setup.adapter.iterdir())]
        request = httpx.Request(
            "POST", f"{first.url}/v1/adapters", headers=auth(ALICE), data={"name": "half"}, files=files
        )
        body = request.read()
        stalled = threading.Event()

        def stall():
            yield body[: len(body) // 2]
            stalled.set()
            time.sleep(30)
            yield body[len(body) // 2 :]

        sender = threading.Thread(
            target=lambda: pytest.raises(
                httpx.HTTPError, httpx.post, request.url, headers=request.headers, content=stall(), timeout=60
            ),
            daemon=True,
        )
        sender.start()
        assert stalled.wait(10)
        time.sleep(0.5)
        first.kill()

    # a crash between "files moved into the store" and "index written" leaves an unindexed directory
    shutil.copytree(setup.adapter, adapters / "store" / "alice" / "ghost")
    (adapters / ".staging" / "leftover").mkdir(parents=True, exist_ok=True)

    with ServerProcess(config, setup.root / "server.log") as second:
        listed = [a["name"] for a in httpx.get(f"{second.url}/v1/adapters", headers=auth(ALICE)).json()["data"]]
        assert listed == ["keep"]
        c = openai.OpenAI(base_url=f"{second.url}/v1", api_key=ALICE, max_retries=0)
        assert c.completions.create(model="keep", prompt="3 4 5", max_tokens=8, temperature=0).choices[0].text == before
    assert not (adapters / "store" / "alice" / "ghost").exists()
    assert not (adapters / "store" / "alice" / "half").exists()
    assert list((adapters / ".staging").iterdir()) == []
    assert [a["name"] for a in json.loads((adapters / "registry.json").read_text())["adapters"]] == ["keep"]


def test_a_restart_keeps_adapters_that_fail_their_checks_as_unavailable_to_their_owner(setup):
    """A damaged file or a folder gone since the last run: the server starts, serves the rest, and answers 409
    for those two until their owner deletes them (then the names upload again)."""
    config = setup.config_in(setup.root / "damaged")
    store = setup.root / "damaged" / "adapters" / "store" / "alice"
    with ServerProcess(config, setup.root / "server.log") as first:
        for name in ("good", "damaged", "gone"):
            assert upload(first.url, ALICE, name, setup.adapter).status_code == 201
    weights = store / "damaged" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    shutil.rmtree(store / "gone")
    with ServerProcess(config, setup.root / "server.log") as second:
        c = openai.OpenAI(base_url=f"{second.url}/v1", api_key=ALICE, max_retries=0)
        assert c.completions.create(model="good", prompt="3 4 5", max_tokens=4).usage.completion_tokens == 4
        for name in ("damaged", "gone"):
            with pytest.raises(openai.ConflictError) as caught:
                c.completions.create(model=name, prompt="3 4 5", max_tokens=4)
            assert caught.value.body["code"] == "adapter_unavailable" and "upload it again" in caught.value.message
            assert httpx.delete(f"{second.url}/v1/adapters/{name}", headers=auth(ALICE)).status_code == 200
            assert upload(second.url, ALICE, name, setup.adapter).status_code == 201
            assert c.completions.create(model=name, prompt="3 4 5", max_tokens=4).usage.completion_tokens == 4
