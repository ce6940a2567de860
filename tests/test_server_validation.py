"""Bad input never reaches the engine and never gets a 500: field ranges, non-finite numbers, adapter configs
with features the engine does not serve, non-float tensor dtypes, oversized bodies; every HTTP response is
counted by status; an unexpected exception is an OpenAI-style 500 naming nothing internal."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import peft
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save
from server_kit import ADMIN_KEY, TENANTS, make_adapter, make_backbone, snapshot, write_config
from server_process import ServerProcess, auth, upload

from pedro.engine import (
    AdapterError,
    Engine,
    PromptTooLong,
    QueueFull,
    Request,
    RequestError,
    SamplingParams,
    TenantLimit,
    UnknownAdapter,
)
from pedro.server import backend

ALICE = TENANTS["alice"]
BODY_LIMIT = 4096  # small, so an adapter upload (~10 KB) is over it and shows that uploads are exempt
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-validation")
    backbone = make_backbone(root / "backbone")
    mine = make_adapter(root / "mine", "pedro", seed=3)
    lora = make_adapter(root / "lora", "lora", seed=5)
    ia3 = root / "ia3"
    ia3_config = peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    peft.get_peft_model(tiny_model("llama"), ia3_config).save_pretrained(ia3)
    (ia3 / "README.md").unlink(missing_ok=True)
    config = write_config(root, backbone, max_request_bytes=BODY_LIMIT, max_upload_bytes=256 * 1024)
    server = ServerProcess(config, root / "server.log").start()
    try:
        assert upload(server.url, ALICE, "mine", mine).status_code == 201
        yield SimpleNamespace(root=root, url=server.url, mine=mine, lora=lora, ia3=ia3)
    finally:
        server.stop()


def post(live, path, body=None, key=ALICE, **kwargs) -> httpx.Response:
    headers = {**auth(key), **kwargs.pop("headers", {})}
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{live.url}{path}", headers=headers, timeout=60, **kwargs)


def complete(live, **fields) -> httpx.Response:
    return post(live, "/v1/completions", {"model": "mine", "prompt": "3 4 5", "max_tokens": 2, **fields})


def chat(live, **fields) -> httpx.Response:
    return post(
        live,
        "/v1/chat/completions",
        {"model": "mine", "messages": [{"role": "user", "content": "3 4"}], "max_tokens": 2, **fields},
    )


def refused(response: httpx.Response, status: int, fragment: str, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error
    return error


def responses_by_status(live) -> dict[str, float]:
    text = httpx.get(f"{live.url}/metrics", headers=auth(ADMIN_KEY), timeout=30).text
    counts: dict[str, float] = {}
    for labels, value in re.findall(r"^pedro_http_responses_total\{([^}]*)\} (\S+)$", text, re.M):
        status = re.search(r'status="(\d+)"', labels).group(1)
        counts[status] = counts.get(status, 0) + float(value)
    return counts


# ------------------------------------------------------------------------------------------------ request fields

OUT_OF_RANGE = [
    ("seed", 2**63),
    ("seed", -(2**63) - 1),
    ("seed", 10**30),
    ("seed", 1.5),
    ("top_k", 2**31),
    ("top_k", -1),
    ("top_k", 10**30),
    ("max_tokens", 2**31),
    ("max_tokens", 0),
    ("max_tokens", 10**30),
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("temperature", 10**400),
    ("top_p", -0.1),
    ("top_p", 1.5),
    ("top_p", -1e308),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={v!r:.20}" for f, v in OUT_OF_RANGE])
def test_out_of_range_fields_are_400_naming_the_field(live, field, value):
    refused(complete(live, **{field: value}), 400, field, param=field)


def test_chat_limits_name_the_field(live):
    refused(chat(live, max_completion_tokens=2**31), 400, "max_completion_tokens", param="max_completion_tokens")
    refused(chat(live, max_completion_tokens=0), 400, "max_completion_tokens", param="max_completion_tokens")
    error = refused(
        post(live, "/v1/chat/completions", {"model": "mine", "messages": [{"role": "wizard", "content": "3"}]}),
        400,
        "messages.0.role",
    )
    assert error["param"] == "messages"
    refused(
        chat(live, stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
        param="stream_options",
    )


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_checks_across_fields_name_their_field(live, fields, param):
    error = refused(chat(live, **fields), 400, param, param=param)
    assert not error["message"].startswith("Value error"), error


@pytest.mark.parametrize("typo, meant", [("max_token", "max_tokens"), ("temprature", "temperature"), ("stops", "stop")])
def test_a_misspelt_field_is_400_naming_the_field_meant(live, typo, meant):
    """Ignoring it would silently answer another question (max_token: the default length instead of 5)."""
    refused(complete(live, **{typo: 5}), 400, f"did you mean {meant!r}", param=typo)
    refused(chat(live, **{typo: 5}), 400, f"did you mean {meant!r}", param=typo)


def test_fields_no_typo_of_ours_are_still_ignored(live):
    """OpenAI's fields with no meaning here, and any other unknown field, are served as before."""
    assert complete(live, store=True, metadata={"a": "b"}, service_tier="auto", x_trace="1").status_code == 200
    assert chat(live, store=True, parallel_tool_calls=False, x_trace="1").status_code == 200


def test_logit_bias_token_ids_are_ascii_digits(live):
    refused(complete(live, logit_bias={"\u0665\u0660\u0664": 100}), 400, "logit_bias", param="logit_bias")
    assert complete(live, logit_bias={"5": 100}).status_code == 200


def test_more_completions_than_a_caller_may_ever_run_are_400_not_429(live):
    """The server runs at most 40 requests of one tenant (half of max_batch + max_queued): a batch that asks for
    more could never be served, so it is a 400 naming the field, not a 429 that clients retry forever."""
    refused(complete(live, prompt=["3 4"] * 41), 400, "at most 40", param="prompt")
    refused(complete(live, prompt=["3 4"] * 3, n=16), 400, "48 completions", param="prompt")
    assert complete(live, prompt=["3 4"] * 2, n=16, max_tokens=1).status_code == 200


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_json_numbers_are_400(live, field, token):
    """Python's json module writes NaN / Infinity for float('nan') / float('inf'): refused by name."""
    body = f'{{"model": "mine", "prompt": "3 4", "max_tokens": 2, "{field}": {token}}}'.encode()
    error = refused(
        post(live, "/v1/completions", content=body, headers={"content-type": "application/json"}),
        400,
        field,
        param=field,
    )
    assert "finite" in error["message"]


def test_extreme_but_valid_values_are_served(live):
    for fields in (
        {"seed": 2**63 - 1},
        {"seed": 2**63 - 1, "n": 4, "temperature": 1},  # samples 1-3 wrap around to the lowest seeds
        {"seed": -(2**63)},
        {"top_k": 2**31 - 1},
        {"temperature": 2, "top_p": 1e-6},
    ):
        response = complete(live, **fields)
        assert response.status_code == 200, (fields, response.text)


def test_engine_refusals_map_to_4xx_naming_the_field():
    """Whatever the engine refuses, wherever the server meets it, is a 4xx naming its field in the API's terms."""
    with pytest.raises(RequestError) as caught:
        SamplingParams(max_new_tokens=-1)
    error = backend.refused(caught.value)
    assert (error.status, error.param) == (400, "max_tokens")
    assert "max_new_tokens" in error.message
    error = backend.refused(RequestError("the prompt is empty"), param="prompt")
    assert (error.status, error.param, error.code) == (400, "prompt", None)
    error = backend.refused(PromptTooLong("too long"), param="messages")
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    error = backend.refused(QueueFull("busy"))
    assert (error.status, error.code, error.retry_after) == (429, "queue_full", 1)
    error = backend.refused(TenantLimit("this tenant is at its own capacity"))
    assert (error.status, error.code, error.retry_after) == (429, "tenant_limit", 1)
    assert "server" not in error.message  # the server may have room: only this caller is at its bound


def test_an_adapter_deleted_while_its_request_was_admitted_is_404_without_the_engines_name(tmp_path):
    """A delete can land between a request finding its adapter and the engine admitting it (prompt encoding
    runs in a worker thread): the request then sees the same 404 as a name that never existed, never the
    engine's versioned name."""
    engine = Engine(tiny_model("llama"), tiny_tokenizer(), max_batch=2, max_seq_len=32)
    with pytest.raises(UnknownAdapter) as caught:
        engine.add_request(Request([5, 6], adapter="alice:gone@0123abcd"))
    assert isinstance(caught.value, RequestError) and isinstance(caught.value, AdapterError)
    with pytest.raises(UnknownAdapter):
        engine.prompt_format("alice:gone@0123abcd")
    error = backend.refused(caught.value, param="prompt")
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "@" not in error.message and "alice" not in error.message


# ------------------------------------------------------------------------------------------------ adapter uploads


def files(directory, config=None, tensors=None) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
    if config is not None:
        out["adapter_config.json"] = json.dumps({**json.loads(out["adapter_config.json"]), **config}).encode()
    if tensors is not None:
        out["adapter_model.safetensors"] = save(tensors(load_file(str(directory / "adapter_model.safetensors"))))
    return out


def retyped(dtype):
    def change(tensors):
        key = sorted(tensors)[0]
        return {**tensors, key: tensors[key].to(dtype)}

    return change


BAD_UPLOADS = {
    "float8 LoRA": ("lora", None, retyped(torch.float8_e4m3fn), "has dtype F8_E4M3"),
    "float8_e5m2 PEDRO": ("mine", None, retyped(torch.float8_e5m2), "has dtype F8_E5M2"),
    "int8 LoRA": ("lora", None, retyped(torch.int8), "has dtype I8"),
    "bool IA3": ("ia3", None, retyped(torch.bool), "has dtype BOOL"),
    "layer_replication": ("lora", {"layer_replication": [[0, 2], [1, 3]]}, None, "layer_replication"),
    "use_dora": ("lora", {"use_dora": True}, None, "use_dora=True"),
    "rank_pattern": ("lora", {"rank_pattern": {"q_proj": 2}}, None, "rank_pattern"),
    "trained bias": ("lora", {"bias": "all"}, None, "bias='all'"),
    "unknown LoRA field": ("lora", {"surprise_option": 1}, None, "surprise_option"),
    "unknown PEDRO field": ("mine", {"surprise_option": 1}, None, "surprise_option"),
    "r as a string": ("lora", {"r": "4"}, None, "r must be a positive integer"),
    "r as a float": ("lora", {"r": 4.5}, None, "r must be a positive integer"),
    "r as a bool": ("lora", {"r": True}, None, "r must be a positive integer"),
    "infinite lora_alpha": ("lora", {"lora_alpha": float("inf")}, None, "lora_alpha must be a finite number"),
    "pissa init": ("lora", {"init_lora_weights": "pissa"}, None, "init_lora_weights"),
    "IA3 fan_in_fan_out": ("ia3", {"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    "PEDRO bad pooler": ("mine", {"pooler": "median"}, None, "pooler"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_adapters_are_refused_and_nothing_changes(live, case):
    source, config, tensors, fragment = BAD_UPLOADS[case]
    directory = getattr(live, source)
    before = snapshot(live.root / "adapters")
    response = upload(live.url, ALICE, "bad", directory, files=files(directory, config, tensors))
    error = refused(response, 400, fragment)
    assert error["param"] == "adapter"
    assert snapshot(live.root / "adapters") == before
    assert list((live.root / "adapters" / ".staging").iterdir()) == []


def test_json_infinity_in_an_uploaded_config_is_refused(live):
    config = json.loads((live.lora / "adapter_config.json").read_text())
    text = json.dumps(config).replace('"lora_alpha": 8', '"lora_alpha": 1e400').encode()
    assert b"1e400" in text
    before = snapshot(live.root / "adapters")
    response = upload(live.url, ALICE, "bad", live.lora, files={**files(live.lora), "adapter_config.json": text})
    refused(response, 400, "lora_alpha must be a finite number")
    assert snapshot(live.root / "adapters") == before


@pytest.mark.parametrize("source,dtype", [("lora", torch.bfloat16), ("ia3", torch.float16), ("lora", torch.float64)])
def test_served_adapters_and_float_dtypes_are_accepted(live, source, dtype):
    directory = getattr(live, source)
    name = f"ok-{source}-{str(dtype).split('.')[-1]}"
    response = upload(
        live.url,
        ALICE,
        name,
        directory,
        files=files(directory, tensors=lambda t: {k: v.to(dtype) for k, v in t.items()}),
    )
    assert response.status_code == 201, response.text
    assert response.json()["kind"] == {"lora": "lora", "ia3": "ia3"}[source]
    assert complete(live, model=name).status_code == 200
    assert httpx.delete(f"{live.url}/v1/adapters/{name}", headers=auth(ALICE)).status_code == 200


# ------------------------------------------------------------------------------------------------ body size


def test_bodies_over_the_cap_are_413_before_parsing(live):
    big = {"model": "mine", "prompt": "3 " * BODY_LIMIT, "max_tokens": 2}
    error = refused(post(live, "/v1/completions", big), 413, f"the limit is {BODY_LIMIT}")
    assert error["code"] == "request_too_large"
    # no Content-Length (chunked transfer): counted as it arrives
    chunks = [json.dumps(big).encode()[i : i + 1000] for i in range(0, len(json.dumps(big)), 1000)]
    response = post(live, "/v1/completions", content=iter(chunks), headers={"content-type": "application/json"})
    assert refused(response, 413, f"limit of {BODY_LIMIT} bytes")["code"] == "request_too_large"
    # an invalid body over the cap is still 413, never parsed
    refused(
        post(
            live, "/v1/chat/completions", content=b"[" * (BODY_LIMIT + 1), headers={"content-type": "application/json"}
        ),
        413,
        "limit",
    )
    refused(post(live, "/v1/adapters", {"name": "x", "path": "/" + "a" * BODY_LIMIT}, key=ADMIN_KEY), 413, "limit")


def test_bodies_within_the_cap_are_served_chunked_or_not(live):
    small = json.dumps({"model": "mine", "prompt": "3 4 5", "max_tokens": 2}).encode()
    assert (
        post(
            live,
            "/v1/completions",
            content=iter([small[:10], small[10:]]),
            headers={"content-type": "application/json"},
        ).status_code
        == 200
    )
    assert post(live, "/v1/completions", content=small, headers={"content-type": "application/json"}).status_code == 200


def test_adapter_uploads_keep_their_own_limit(live):
    """The multipart upload is larger than max_request_bytes but within max_upload_bytes: accepted."""
    assert sum(len(b) for b in files(live.mine).values()) > BODY_LIMIT
    response = upload(live.url, ALICE, "big-upload", live.mine)
    assert response.status_code == 201, response.text
    assert httpx.delete(f"{live.url}/v1/adapters/big-upload", headers=auth(ALICE)).status_code == 200


# ------------------------------------------------------------------------------------------------ errors and counts


def test_405_and_404_are_typed_client_errors(live):
    response = httpx.put(f"{live.url}/v1/completions", headers=auth(ALICE), json={})
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"
    assert "POST" in response.headers.get("allow", "")
    response = httpx.get(f"{live.url}/v1/no-such-endpoint", headers=auth(ALICE))
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_every_response_is_counted_by_status(live):
    before = responses_by_status(live)
    assert complete(live, top_k=-1).status_code == 400
    assert httpx.get(f"{live.url}/v1/no-such-endpoint/alice-secret", headers=auth(ALICE)).status_code == 404
    assert (
        post(
            live, "/v1/completions", content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "application/json"}
        ).status_code
        == 413
    )
    assert complete(live).status_code == 200
    after = responses_by_status(live)
    for status in ("400", "404", "413"):
        assert after.get(status, 0) == before.get(status, 0) + 1, (status, before, after)
    assert after["200"] >= before.get("200", 0) + 2  # the completion and the first /metrics read
    text = httpx.get(f"{live.url}/metrics", headers=auth(ADMIN_KEY)).text
    assert 'route="/v1/completions"' in text and 'route="/v1/adapters/{name}"' in text
    assert "alice-secret" not in text and "no-such-endpoint" not in text  # raw paths never become labels


# ------------------------------------------------------------------------------------------------ in process: 500


class Exploding:
    """A backend whose generation raises an unexpected exception (a bug): the app must still answer JSON."""

    async def stream_all(self, *args, **kwargs):
        raise RuntimeError("secret internal detail /srv/engine.py")

    def stats(self):
        return {"running": 0, "waiting": 0, "in_flight": 0}

    async def ready(self):
        return True


def test_an_unexpected_exception_is_a_generic_openai_500(tmp_path, caplog):
    import asyncio

    from pedro.server.app import create_app
    from pedro.server.auth import KeyRing
    from pedro.server.config import ServerConfig

    config = ServerConfig(backbone="tiny", adapters_dir=tmp_path / "adapters", max_request_bytes=1024)
    app = create_app(config, Exploding(), KeyRing({}, []))

    async def run() -> tuple[httpx.Response, httpx.Response, str]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            crashed = await client.post("/v1/completions", json={"model": "tiny", "prompt": "3 4"})
            too_big = await client.post("/v1/completions", json={"model": "tiny", "prompt": "3" * 2000})
            metrics = await client.get("/metrics")
        return crashed, too_big, metrics.text

    with caplog.at_level("ERROR", logger="pedro.server"):
        crashed, too_big, metrics = asyncio.run(run())
    assert crashed.status_code == 500
    error = crashed.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret" not in crashed.text and "RuntimeError" not in crashed.text
    assert any("secret internal detail" in str(r.exc_info) for r in caplog.records)  # logged with its traceback
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert re.search(r'pedro_http_responses_total\{route="/v1/completions",status="500"\} 1\.0', metrics)
    assert re.search(r'pedro_http_responses_total\{route="/v1/completions",status="413"\} 1\.0', metrics)


@pytest.mark.parametrize("body", [b"", b"{", b"[1]", b'{"name": 5, "path": "/x"}', b'{"name": "x"}'])
def test_bad_json_registrations_are_400(live, body):
    response = post(live, "/v1/adapters", key=ADMIN_KEY, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
