"""Every refused request gets the right status, an OpenAI-style error with a clear message, and changes nothing
in the adapters directory (byte for byte)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_kit import ADMIN_KEY, TENANTS, make_adapter, make_backbone, snapshot, write_config
from server_process import ServerProcess, auth, upload

ALICE, BOB = TENANTS["alice"], TENANTS["bob"]
UPLOAD_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-security")
    backbone = make_backbone(root / "backbone")
    good = make_adapter(root / "good", "pedro", seed=3)
    other_backbone = make_adapter(root / "other", "pedro", seed=4, hidden_size=64, intermediate_size=96)
    server = ServerProcess(write_config(root, backbone, max_upload_bytes=UPLOAD_LIMIT), root / "server.log").start()
    try:
        assert upload(server.url, ALICE, "mine", good).status_code == 201
        yield SimpleNamespace(root=root, url=server.url, good=good, other=other_backbone)
    finally:
        server.stop()


def files_of(directory, **replace: bytes) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    return {**files, **replace}


def weights_with(live, change) -> bytes:
    tensors = load_file(str(live.good / "adapter_model.safetensors"))
    change(tensors)
    path = live.root / "tmp.safetensors"
    save_file(tensors, str(path))
    return path.read_bytes()


def pickled(live) -> bytes:
    buffer = io.BytesIO()
    torch.save(load_file(str(live.good / "adapter_model.safetensors")), buffer)
    return buffer.getvalue()


def config_with(live, **fields) -> bytes:
    config = json.loads((live.good / "adapter_config.json").read_text())
    return json.dumps({**config, **fields}).encode()


def post(live, path, key=ALICE, **kwargs) -> httpx.Response:
    headers = {**(auth(key) if key else {}), **kwargs.pop("headers", {})}
    return httpx.post(f"{live.url}{path}", headers=headers, timeout=60, **kwargs)


def complete(live, key=ALICE, **body) -> httpx.Response:
    return post(live, "/v1/completions", key, json={"model": "mine", "prompt": "3 4 5", "max_tokens": 4, **body})


def nan(tensors):
    next(iter(tensors.values()))[0] = float("nan")


CASES = {
    # authentication
    "no key": (lambda lv: complete(lv, key=None), 401, "API key"),
    "wrong key": (lambda lv: complete(lv, key="sk-not-a-real-key"), 401, "API key"),
    "no key upload": (lambda lv: upload(lv.url, None, "x", lv.good), 401, "API key"),
    "wrong key list": (lambda lv: httpx.get(f"{lv.url}/v1/adapters", headers=auth("sk-wrong-key-123")), 401, "API key"),
    # other tenants' adapters: not found, never forbidden (names do not leak)
    "use another tenant's adapter": (lambda lv: complete(lv, key=BOB), 404, "does not exist"),
    "use it by qualified name": (lambda lv: complete(lv, key=BOB, model="alice:mine"), 404, "does not exist"),
    "delete another tenant's adapter": (
        lambda lv: httpx.delete(f"{lv.url}/v1/adapters/mine", headers=auth(BOB)),
        404,
        "does not exist",
    ),
    "delete it by qualified name": (
        lambda lv: httpx.delete(f"{lv.url}/v1/adapters/alice:mine", headers=auth(BOB)),
        404,
        "does not exist",
    ),
    "overwrite via tenant field": (lambda lv: upload(lv.url, BOB, "mine", lv.good, tenant="alice"), 403, "admin key"),
    "overwrite via qualified name": (
        lambda lv: upload(lv.url, BOB, "alice:mine", lv.good),
        400,
        "invalid adapter name",
    ),
    "overwrite own without delete": (lambda lv: upload(lv.url, ALICE, "mine", lv.good), 409, "already exists"),
    # names and paths
    "traversal name": (lambda lv: upload(lv.url, ALICE, "../x", lv.good), 400, "invalid adapter name"),
    "dot-dot name": (lambda lv: upload(lv.url, ALICE, "..", lv.good), 400, "invalid adapter name"),
    "absolute path name": (lambda lv: upload(lv.url, ALICE, "/tmp/x", lv.good), 400, "invalid adapter name"),
    "slash name": (lambda lv: upload(lv.url, ALICE, "a/b", lv.good), 400, "invalid adapter name"),
    "no name": (lambda lv: upload(lv.url, ALICE, None, lv.good), 400, "give the adapter a name"),
    "base model's name": (lambda lv: upload(lv.url, ALICE, "tiny", lv.good), 400, "base model"),
    "traversal tenant": (
        lambda lv: upload(lv.url, ADMIN_KEY, "x", lv.good, tenant="../alice"),
        400,
        "invalid tenant name",
    ),
    "encoded traversal delete": (
        lambda lv: httpx.delete(f"{lv.url}/v1/adapters/..%2F..%2Fregistry.json", headers=auth(ALICE)),
        404,
        "",
    ),
    "server path as a tenant": (
        lambda lv: post(lv, "/v1/adapters", json={"name": "x", "path": str(lv.good)}),
        403,
        "admin key",
    ),
    "relative server path": (
        lambda lv: post(lv, "/v1/adapters", ADMIN_KEY, json={"name": "x", "path": "../good"}),
        400,
        "absolute path",
    ),
    "server path without adapter": (
        lambda lv: post(lv, "/v1/adapters", ADMIN_KEY, json={"name": "x", "path": "/etc"}),
        400,
        "has no adapter_config.json",
    ),
    # file contents
    "pickle .bin upload": (
        lambda lv: upload(
            lv.url,
            ALICE,
            "x",
            lv.good,
            files={"adapter_config.json": config_with(lv), "adapter_model.bin": pickled(lv)},
        ),
        400,
        "pickle",
    ),
    "pickle named .safetensors": (
        lambda lv: upload(
            lv.url, ALICE, "x", lv.good, files=files_of(lv.good, **{"adapter_model.safetensors": pickled(lv)})
        ),
        400,
        "safetensors",
    ),
    "truncated safetensors": (
        lambda lv: upload(
            lv.url,
            ALICE,
            "x",
            lv.good,
            files=files_of(
                lv.good, **{"adapter_model.safetensors": (lv.good / "adapter_model.safetensors").read_bytes()[:-100]}
            ),
        ),
        400,
        "truncated",
    ),
    "a save's README.md beside the two files": (
        lambda lv: upload(lv.url, ALICE, "x", lv.good, files=files_of(lv.good, **{"README.md": b"# x"})),
        400,
        "too many files: upload exactly ['adapter_config.json', 'adapter_model.safetensors']",
    ),
    "name given twice": (
        lambda lv: post(
            lv,
            "/v1/adapters",
            data={"name": ["x", "y"]},
            files=[("files", (n, c)) for n, c in files_of(lv.good).items()],
        ),
        400,
        "form field 'name' given twice",
    ),
    "missing weights": (
        lambda lv: upload(lv.url, ALICE, "x", lv.good, files={"adapter_config.json": config_with(lv)}),
        400,
        "lacks",
    ),
    "shapes of another backbone": (lambda lv: upload(lv.url, ALICE, "x", lv.other), 400, "different backbone"),
    "NaN weights": (
        lambda lv: upload(
            lv.url, ALICE, "x", lv.good, files=files_of(lv.good, **{"adapter_model.safetensors": weights_with(lv, nan)})
        ),
        400,
        "NaN",
    ),
    "oversized upload": (
        lambda lv: upload(
            lv.url,
            ALICE,
            "x",
            lv.good,
            files=files_of(lv.good, **{"adapter_model.safetensors": b"\0" * (UPLOAD_LIMIT + 1)}),
        ),
        413,
        "limit",
    ),
    "config not JSON": (
        lambda lv: upload(lv.url, ALICE, "x", lv.good, files=files_of(lv.good, **{"adapter_config.json": b"{nope"})),
        400,
        "not valid JSON",
    ),
    "config of an unserved type": (
        lambda lv: upload(
            lv.url,
            ALICE,
            "x",
            lv.good,
            files=files_of(lv.good, **{"adapter_config.json": config_with(lv, peft_type="PROMPT_TUNING")}),
        ),
        400,
        "peft_type",
    ),
    "config with an unknown field": (
        lambda lv: upload(
            lv.url, ALICE, "x", lv.good, files=files_of(lv.good, **{"adapter_config.json": config_with(lv, surprise=1)})
        ),
        400,
        "surprise",
    ),
    "config with a bad value": (
        lambda lv: upload(
            lv.url,
            ALICE,
            "x",
            lv.good,
            files=files_of(lv.good, **{"adapter_config.json": config_with(lv, pooler="median")}),
        ),
        400,
        "pooler",
    ),
    # request bodies
    "malformed JSON": (
        lambda lv: post(
            lv, "/v1/completions", content=b'{"model": "mine",', headers={"content-type": "application/json"}
        ),
        400,
        "not valid JSON",
    ),
    "body not an object": (lambda lv: post(lv, "/v1/completions", json=[1, 2]), 400, "JSON object"),
    "string max_tokens": (lambda lv: complete(lv, max_tokens="5"), 400, "max_tokens"),
    "string temperature": (lambda lv: complete(lv, temperature="hot"), 400, "temperature"),
    "negative max_tokens": (lambda lv: complete(lv, max_tokens=-1), 400, "max_tokens"),
    "huge max_tokens": (lambda lv: complete(lv, max_tokens=10**9), 400, "at most 48"),
    "top_p out of range": (lambda lv: complete(lv, top_p=1.5), 400, "top_p"),
    "empty prompt": (lambda lv: complete(lv, prompt=""), 400, "empty"),
    "empty token list": (lambda lv: complete(lv, prompt=[]), 400, "empty"),
    "token id out of vocabulary": (lambda lv: complete(lv, prompt=[5, 100000]), 400, "token ids"),
    "prompt over the limit": (lambda lv: complete(lv, prompt=" ".join(["7"] * 65)), 400, "at most 64"),
    "no messages": (
        lambda lv: post(lv, "/v1/chat/completions", json={"model": "mine", "messages": []}),
        400,
        "messages",
    ),
    "bad role": (
        lambda lv: post(
            lv, "/v1/chat/completions", json={"model": "mine", "messages": [{"role": "wizard", "content": "3"}]}
        ),
        400,
        "role",
    ),
    "n over the limit": (lambda lv: complete(lv, n=17), 400, "n"),
    "best_of": (lambda lv: complete(lv, best_of=2), 400, "best_of"),
    "logprobs over the limit": (lambda lv: complete(lv, logprobs=21), 400, "logprobs"),
    "unknown model": (lambda lv: complete(lv, model="nobody"), 404, "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_and_nothing_changes_on_disk(live, case):
    send, status, fragment = CASES[case]
    before = snapshot(live.root / "adapters")
    response = send(live)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert snapshot(live.root / "adapters") == before


def test_a_body_that_is_not_utf8_is_a_400_saying_so(live):
    headers = {**auth(ALICE), "content-type": "application/json"}
    body = b'{"model": "mine", "prompt": "\xff\xfe"}'
    response = httpx.post(f"{live.url}/v1/completions", headers=headers, content=body, timeout=60)
    assert response.status_code == 400 and "valid UTF-8 JSON" in response.json()["error"]["message"]


def test_deleting_a_name_that_does_not_exist_names_the_path_parameter(live):
    response = httpx.delete(f"{live.url}/v1/adapters/nothing-here", headers=auth(BOB))
    assert response.status_code == 404 and response.json()["error"]["param"] == "name"


def test_unknown_request_fields_are_ignored(live):
    plain = complete(live, temperature=0)
    extra = complete(live, temperature=0, frequency_penalty_v2=1, metadata={"x": 1})
    assert plain.status_code == extra.status_code == 200
    assert extra.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_a_refused_upload_leaves_no_staging_files(live):
    assert list((live.root / "adapters" / ".staging").iterdir()) == []
