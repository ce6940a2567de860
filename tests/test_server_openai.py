"""OpenAI API details against a live ``pedro serve`` (the official ``openai`` client where it has a call for them):
``GET /v1/models/{id}`` (``models.retrieve``) and ``DELETE /v1/models/{id}`` (``models.delete``) with tenancy, the
adapter quota (403, not a retried 429), a base model id containing '/', the Authorization
scheme in any case, no 307 redirects for a stray trailing slash, and which chat messages the chat template can
render (an assistant's null content) or not (tool results, tool calls)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest
from server_kit import ADMIN_KEY, TENANTS, make_adapter, make_backbone, write_config
from server_process import ServerProcess, auth, upload

from pedro.engine import Engine, Request, SamplingParams

BASE = "acme/tiny-base"  # a served model name with '/', as Hugging Face ids have


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-openai")
    backbone = make_backbone(root / "backbone")
    adapter = make_adapter(root / "src" / "a0", "pedro", seed=3)
    config = write_config(root, backbone, model_name=BASE, max_adapters_per_tenant=2)
    server = ServerProcess(config, root / "server.log").start()
    try:
        assert upload(server.url, TENANTS["alice"], "a0", adapter).status_code == 201
        assert upload(server.url, TENANTS["bob"], "b0", adapter).status_code == 201
        yield SimpleNamespace(server=server, url=server.url, backbone=backbone, adapter=adapter)
    finally:
        server.stop()


def client(live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------- GET /v1/models/{id}


def test_models_retrieve_the_base_model_and_the_callers_adapters(live):
    alice = client(live, TENANTS["alice"])
    base = alice.models.retrieve(BASE)  # the client sends acme%2Ftiny-base
    assert (base.id, base.object, base.owned_by) == (BASE, "model", "pedro")
    assert (
        httpx.get(f"{live.url}/v1/models/{BASE}", headers=auth(TENANTS["alice"])).json()["id"] == BASE
    )  # unencoded '/'
    own = alice.models.retrieve("a0")
    assert (own.id, own.owned_by) == ("a0", "alice") and own.created > 0
    assert [m.id for m in alice.models.list().data] == [BASE, "a0"]
    admin = client(live, ADMIN_KEY).models.retrieve("alice:a0")
    assert (admin.id, admin.owned_by, admin.created) == ("alice:a0", "alice", own.created)


@pytest.mark.parametrize("model", ["b0", "bob:b0", "alice:a0", "nope", "a0/x", "acme", "%2e%2e", "a0%2F..%2F..%2Fx"])
def test_models_retrieve_of_another_tenants_or_an_unknown_model_is_the_same_404(live, model):
    """Bob's adapter, named either way, answers alice exactly like a name that does not exist (no leak)."""
    response = httpx.get(f"{live.url}/v1/models/{model}", headers=auth(TENANTS["alice"]))
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found" and error["param"] == "model"
    if model in ("b0", "bob:b0"):
        missing = httpx.get(f"{live.url}/v1/models/{model}x", headers=auth(TENANTS["alice"])).json()["error"]
        assert error["message"].replace(model, "X") == missing["message"].replace(f"{model}x", "X")


def test_models_retrieve_needs_a_key(live):
    assert httpx.get(f"{live.url}/v1/models/a0").status_code == 401
    with pytest.raises(openai.NotFoundError):
        client(live, TENANTS["bob"]).models.retrieve("a0")


# ---------------------------------------------------------------------------------------- Authorization


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_authorization_scheme_is_case_insensitive(live, scheme):
    for header in (f"{scheme} {TENANTS['alice']}", f"{scheme}   {TENANTS['alice']}"):
        response = httpx.get(f"{live.url}/v1/models", headers={"Authorization": header})
        assert response.status_code == 200, (header, response.text)
        assert [m["id"] for m in response.json()["data"]] == [BASE, "a0"]


@pytest.mark.parametrize(
    "header",
    [f"Basic {TENANTS['alice']}", f"Bearer{TENANTS['alice']}", "Bearer", TENANTS["alice"], f"Token {TENANTS['alice']}"],
)
def test_other_authorization_schemes_are_401(live, header):
    response = httpx.get(f"{live.url}/v1/models", headers={"Authorization": header})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------------------- no redirects


@pytest.mark.parametrize(
    "method, path",
    [
        ("DELETE", "/v1/adapters/"),
        ("GET", "/v1/adapters/"),
        ("POST", "/v1/completions/"),
        ("POST", "/v1/chat/completions/"),
        ("GET", "/v1/models/"),
        ("GET", "/health/"),
        ("GET", "/metrics/"),
    ],
)
def test_a_trailing_slash_is_an_openai_error_never_a_redirect(live, method, path):
    response = httpx.request(method, f"{live.url}{path}", headers=auth(ADMIN_KEY), json={}, follow_redirects=False)
    assert response.status_code in (404, 405), (response.status_code, response.headers)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] in (
        "not_found_error",
        "invalid_request_error",
    )


def test_an_adapter_survives_a_delete_without_a_name(live):
    assert httpx.delete(f"{live.url}/v1/adapters/", headers=auth(TENANTS["alice"])).status_code in (404, 405)
    assert client(live, TENANTS["alice"]).models.retrieve("a0").id == "a0"


# ---------------------------------------------------------------------------------------- DELETE /v1/models/{id}


def test_models_delete_removes_the_callers_adapter_and_nothing_else(live):
    """``client.models.delete`` on an adapter (a fine-tuned model here): OpenAI's ModelDeleted, the adapter gone
    from the list and from generation; another tenant's adapter and the base model are refused, untouched."""
    alice = client(live, TENANTS["alice"])
    assert upload(live.url, TENANTS["alice"], "short-lived", live.adapter).status_code == 201
    deleted = alice.models.delete("short-lived")
    assert (deleted.id, deleted.object, deleted.deleted) == ("short-lived", "model", True)
    assert [m.id for m in alice.models.list().data] == [BASE, "a0"]
    with pytest.raises(openai.NotFoundError):
        alice.completions.create(model="short-lived", prompt="hi", max_tokens=1)
    for model in ("b0", "bob:b0", "short-lived"):  # another tenant's, named either way, and the one just gone
        with pytest.raises(openai.NotFoundError) as err:
            alice.models.delete(model)
        assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="base model cannot be deleted"):
        alice.models.delete(BASE)
    assert client(live, TENANTS["bob"]).models.retrieve("b0").id == "b0"


def test_a_tenant_at_its_adapter_limit_is_refused_with_403_until_it_deletes_one(live):
    """The quota does not clear by waiting, so it is not a 429 (clients retry those on their own)."""
    alice = client(live, TENANTS["alice"])
    assert upload(live.url, TENANTS["alice"], "second", live.adapter).status_code == 201  # the limit is 2
    refused = upload(live.url, TENANTS["alice"], "third", live.adapter)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "adapter_quota" and "limit of 2 adapters" in error["message"]
    assert "retry-after" not in refused.headers
    assert upload(live.url, TENANTS["bob"], "b1", live.adapter).status_code == 201  # other tenants are not limited
    alice.models.delete("second")
    assert upload(live.url, TENANTS["alice"], "third", live.adapter).status_code == 201
    alice.models.delete("third")
    client(live, TENANTS["bob"]).models.delete("b1")
    assert [m.id for m in alice.models.list().data] == [BASE, "a0"]


# ---------------------------------------------------------------------------------------- chat messages


def test_an_assistant_message_with_null_content_is_an_empty_turn(live):
    messages = [
        {"role": "user", "content": "3 4"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "5 6"},
    ]
    reply = client(live, TENANTS["alice"]).chat.completions.create(
        model="a0", messages=messages, max_tokens=8, temperature=0
    )
    engine = Engine(str(live.backbone), max_batch=2, max_seq_len=128)
    engine.add_adapter("a0", live.adapter)
    rendered = [{**m, "content": m["content"] or ""} for m in messages]
    ref = engine.generate([Request(rendered, adapter="a0", sampling=SamplingParams(max_new_tokens=8))])[0]
    assert reply.choices[0].message.content == ref.text and reply.usage.prompt_tokens == ref.prompt_tokens
    no_content = client(live, TENANTS["alice"]).chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "3"}, {"role": "assistant"}], max_tokens=2
    )
    assert no_content.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    "message, where, why",
    [
        ({"role": "tool", "tool_call_id": "call_1", "content": "42"}, "messages.1.role", "tool calling"),
        ({"role": "function", "name": "f", "content": "42"}, "messages.1.role", "tool calling"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "messages.1.tool_calls",
            "tool calling",
        ),
        (
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            "messages.1.function_call",
            "tool calling",
        ),
        ({"role": "user", "content": None}, "messages.1.content", "only an assistant message"),
        ({"role": "system"}, "messages.1.content", "only an assistant message"),
        ({"role": "wizard", "content": "3"}, "messages.1.role", "'system', 'developer', 'user' or 'assistant'"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
            "messages.1.content",
            "parts of type 'image_url' are not supported",
        ),
    ],
)
def test_messages_the_template_cannot_render_are_400_naming_the_field(live, message, where, why):
    with pytest.raises(openai.BadRequestError) as caught:
        client(live, TENANTS["alice"]).chat.completions.create(
            model="a0", messages=[{"role": "user", "content": "3"}, message], max_tokens=2
        )
    assert caught.value.body["param"] == "messages"
    assert (
        caught.value.message.startswith("Error code: 400")
        and where in caught.value.message
        and why in caught.value.message
    )


# ---------------------------------------------------------------------------------------- null means the default


def test_null_fields_mean_their_defaults(live):
    """The official client sends null for an argument passed as None: OpenAI reads it as the default, and so
    must the server (the same seeded sample as with the field left out)."""
    c = client(live, TENANTS["alice"])
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, presence_penalty=None, frequency_penalty=None)
    messages = [{"role": "user", "content": "3 4"}]
    plain = c.chat.completions.create(model="a0", messages=messages, max_tokens=4, seed=11)
    nulled = c.chat.completions.create(model="a0", messages=messages, max_tokens=4, seed=11, logprobs=None, **nulls)
    assert nulled.choices[0].message.content == plain.choices[0].message.content
    assert len(nulled.choices) == 1 and nulled.choices[0].logprobs is None
    plain_c = c.completions.create(model="a0", prompt="3 4", max_tokens=4, seed=11)
    nulled_c = c.completions.create(model="a0", prompt="3 4", max_tokens=4, seed=11, echo=None, **nulls)
    assert nulled_c.choices[0].text == plain_c.choices[0].text


def test_max_completion_tokens_and_max_tokens_must_agree(live):
    c = client(live, TENANTS["alice"])
    messages = [{"role": "user", "content": "3 4"}]
    both = c.chat.completions.create(
        model="a0", messages=messages, max_tokens=3, max_completion_tokens=3, extra_body={"ignore_eos": True}
    )
    assert both.usage.completion_tokens == 3
    newer = c.chat.completions.create(
        model="a0", messages=messages, max_completion_tokens=2, extra_body={"ignore_eos": True}
    )
    assert newer.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model="a0", messages=messages, max_tokens=6, max_completion_tokens=2)
    assert caught.value.body["param"] == "max_completion_tokens" and "differs from max_tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # the server's limit (48) applies to either name
        c.chat.completions.create(model="a0", messages=messages, max_completion_tokens=1000)
    assert caught.value.body["param"] == "max_tokens"


def test_a_participant_name_is_refused_not_dropped(live):
    with pytest.raises(openai.BadRequestError) as caught:
        client(live, TENANTS["alice"]).chat.completions.create(
            model="a0", messages=[{"role": "user", "content": "3", "name": "Zorblax"}], max_tokens=2
        )
    assert caught.value.body["param"] == "messages" and "messages.0.name" in caught.value.message
    unnamed = client(live, TENANTS["alice"]).chat.completions.create(
        model="a0", messages=[{"role": "user", "content": "3", "name": ""}], max_tokens=2
    )
    assert unnamed.usage.completion_tokens >= 1
