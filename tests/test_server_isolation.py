"""A bad request or adapter from one tenant, against a live server, while another tenant streams: the bad one
gets a specific error, the bystander's stream is token-identical to its run alone, /health stays 200, and no
answer names another tenant's adapter. A dead engine thread (in-process) turns /health 503."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import tiny_model, tiny_tokenizer
from fastapi.testclient import TestClient
from server_kit import TENANTS, make_backbone, write_config
from server_process import ServerProcess, auth, upload
from test_engine_isolation import _pedro

from pedro.engine import Engine
from pedro.server.app import create_app
from pedro.server.auth import KeyRing
from pedro.server.backend import LocalBackend
from pedro.server.config import ServerConfig

ALICE, BOB = TENANTS["alice"], TENANTS["bob"]
BOB_ADAPTER = "bob-private-adapter"
BYSTANDER = {"model": BOB_ADAPTER, "prompt": "3 4 5 6", "max_tokens": 150, "temperature": 0, "stream": True}


def pedro_adapter(root: Path, name: str, scale: float, seed: int) -> Path:
    """The two files a PEDRO adapter uploads as (weights ~ ``scale``; 1e20 overflows at the first layer)."""
    path = Path(_pedro(root, name, scale, seed))
    (path / "README.md").unlink(missing_ok=True)
    return path


def stream_tokens(url: str, body: dict) -> str:
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", headers=auth(BOB), json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.append(chunk["choices"][0]["text"])
    return "".join(text)


class Bystander:
    """Bob's greedy stream, running in a thread while a test does something hostile."""

    def __init__(self, url: str) -> None:
        self.result: list[str] = []
        self.thread = threading.Thread(target=lambda: self.result.append(stream_tokens(url, BYSTANDER)))

    def __enter__(self) -> "Bystander":
        self.thread.start()
        time.sleep(0.3)  # it is admitted and decoding before the hostile request arrives
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)

    @property
    def text(self) -> str:
        return self.result[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-isolation")
    backbone = make_backbone(root / "backbone", endless=True)
    config = write_config(
        root, backbone, max_batch=3, max_queued=4, max_seq_len=256, max_prompt_tokens=64, max_tokens=200
    )
    with ServerProcess(config, root / "server.log") as server:
        assert upload(server.url, BOB, BOB_ADAPTER, pedro_adapter(root, "bob", 0.3, seed=3)).status_code == 201
        solo = stream_tokens(server.url, BYSTANDER)
        yield SimpleNamespace(url=server.url, root=root, solo=solo)


def alice(live, method: str, path: str, **kwargs) -> httpx.Response:
    response = httpx.request(method, f"{live.url}{path}", headers=auth(ALICE), timeout=60, **kwargs)
    assert BOB_ADAPTER not in response.text and "bob" not in response.text.lower()
    return response


def wait_for(live, condition, timeout: float = 30.0) -> None:
    """Poll /health until ``condition(body)`` holds (the machine may be slow; the state is what matters)."""
    deadline = time.monotonic() + timeout
    while not condition(health := httpx.get(f"{live.url}/health").json()):
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def healthy(live) -> bool:
    return httpx.get(f"{live.url}/health").status_code == 200


@pytest.mark.parametrize(
    "sampling", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300}]
)
def test_extreme_sampling_values_are_served_and_the_bystander_is_exact(live, sampling):
    with Bystander(live.url) as bob:
        for stream in (False, True):
            response = alice(
                live,
                "POST",
                "/v1/completions",
                json={"model": "tiny", "prompt": "5 6", "max_tokens": 8, "stream": stream, **sampling},
            )
            assert response.status_code == 200, response.text
    assert bob.text == live.solo and healthy(live)


def test_an_adapter_that_overflows_fails_alone_with_a_400(live):
    assert upload(live.url, ALICE, "huge", pedro_adapter(live.root, "huge", 1e20, seed=4)).status_code == 201
    with Bystander(live.url) as bob:
        for stream in (False, True):
            response = alice(
                live,
                "POST",
                "/v1/completions",
                json={"model": "huge", "prompt": "5 6", "max_tokens": 8, "stream": stream},
            )
            assert response.status_code == 400 and response.json()["error"]["code"] == "numeric_overflow", response.text
    assert bob.text == live.solo and healthy(live)
    # the failed rows' cache slots are reused by the next requests: the bystander alone again is still exact
    assert stream_tokens(live.url, BYSTANDER) == live.solo
    assert alice(live, "DELETE", "/v1/adapters/huge").status_code == 200


def test_deleting_an_adapter_a_queued_request_uses_is_409(live):
    """The batch (3 rows) is full of bob's streams while alice's request for her adapter waits; deleting the
    adapter then is a 409 and the waiting request is served in full. On a slow host the queued request can be
    admitted and finish between /health's answer and the DELETE (then the DELETE is a 200 and is legitimate):
    the scene is played again until the DELETE lands while the request waits, and a deleted adapter must never
    cost the queued request its answer."""
    conflicts = []
    for _ in range(5):
        assert upload(live.url, ALICE, "mine", pedro_adapter(live.root, "mine", 0.3, seed=5)).status_code == 201
        fillers = [Bystander(live.url) for _ in range(3)]
        for filler in fillers:
            filler.thread.start()
        queued: list[httpx.Response] = []
        body = {"model": "mine", "prompt": "5 6", "max_tokens": 4, "temperature": 0}
        waiter = threading.Thread(target=lambda: queued.append(alice(live, "POST", "/v1/completions", json=body)))
        with contextlib.suppress(AssertionError):  # the fillers may all finish before the batch is seen full
            wait_for(live, lambda health: health["running"] == 3, timeout=10)
            waiter.start()
            wait_for(live, lambda health: health["waiting"] == 1, timeout=10)
        deleted = alice(live, "DELETE", "/v1/adapters/mine")
        for filler in fillers:
            filler.__exit__()
        if waiter.is_alive() or queued:
            waiter.join(120)
            # served in full whatever the DELETE's answer (an empty list: the request itself raised)
            assert queued and queued[0].status_code == 200, queued and queued[0].text
        assert [f.text for f in fillers] == [live.solo] * 3
        if deleted.status_code == 409:
            conflicts.append(deleted)
            break
        assert deleted.status_code == 200, deleted.text
    assert conflicts, "the DELETE never landed while the request waited"
    error = conflicts[0].json()["error"]
    assert error["code"] == "adapter_in_use" and "'mine' is in use" in error["message"]
    assert "@" not in conflicts[0].text  # the caller's name, not the engine's versioned one
    assert alice(live, "DELETE", "/v1/adapters/mine").status_code == 200


def test_over_long_prompts_are_refused_with_context_length_exceeded(live):
    with Bystander(live.url) as bob:
        for prompt in (" ".join(["7"] * 65), "7 " * 100_000):  # over the token limit; over it by far (200 kB)
            response = alice(live, "POST", "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4})
            error = response.json()["error"]
            assert (
                response.status_code == 400
                and error["code"] == "context_length_exceeded"
                and error["param"] == "prompt"
            )
        assert "without tokenising" in error["message"]
    assert bob.text == live.solo and healthy(live)


def test_a_tenant_over_its_request_cap_gets_429_and_others_are_still_admitted(live):
    """max_requests_per_tenant defaults to (max_batch + max_queued) // 2 = 3 here: alice's fourth concurrent
    request is refused, her three others and bob's stream are served."""
    body = {"model": "tiny", "prompt": "5 6", "max_tokens": 200, "temperature": 0}
    with Bystander(live.url) as bob, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: alice(live, "POST", "/v1/completions", json=body), range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert "this tenant" in refused.json()["error"]["message"]
    assert bob.text == live.solo


def test_a_dead_engine_thread_turns_health_503_and_requests_get_a_clean_503(tmp_path, monkeypatch):
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=2, max_seq_len=64)
    config = ServerConfig(
        backbone="tiny",
        adapters_dir=tmp_path / "adapters",
        max_seq_len=64,
        max_prompt_tokens=32,
        max_tokens=16,
        default_max_tokens=4,
    )
    backend = LocalBackend(engine, config)
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("step bug")))
    monkeypatch.setattr(engine, "reset", lambda reason: (_ for _ in ()).throw(RuntimeError("reset bug")))
    try:
        with TestClient(create_app(config, backend, KeyRing({}, []))) as client:
            assert client.get("/health").status_code == 200
            response = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 4})
            assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            again = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6], "max_tokens": 4})
            assert again.status_code == 503
    finally:
        backend.shutdown()
