"""Unit tests of the server's start-up inputs: the YAML config with CLI overrides, API keys, safe names."""

from __future__ import annotations

import pytest

from pedro.server.auth import ADMIN_TENANT, OPEN_TENANT, KeyRing, Principal, check_name
from pedro.server.config import ServerConfig


def test_yaml_values_with_flags_on_top(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("backbone: /models/x\nmax_batch: 4\nray:\n  replicas: 3\n")
    config = ServerConfig.load(path, max_batch=8, port=None, ray_num_cpus=0.5)
    assert (config.backbone, config.max_batch, config.port) == ("/models/x", 8, 8000)
    assert (config.ray.replicas, config.ray.num_cpus) == (3, 0.5)
    assert config.served_model_name == "x"


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("max_batch: 0\n", "max_batch"),
        ("max_bach: 4\n", "max_bach"),
        ("max_prompt_tokens: 2000\nmax_seq_len: 1024\n", "max_prompt_tokens"),
        ("default_max_tokens: 500\n", "default_max_tokens"),
        ("ray:\n  min_replicas: 1\n", "both"),
        ("ray:\n  replicas: 9\n  min_replicas: 1\n  max_replicas: 4\n", "within"),
        ("- a list\n", "mapping"),
        ("dtype: fp8\n", "dtype"),
        ("device: gpu\n", "device"),
        ("ray:\n  num_gpus: 1\n", "num_gpus"),
    ],
)
def test_a_bad_config_names_the_field(tmp_path, yaml_text, fragment):
    path = tmp_path / "server.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=fragment):
        ServerConfig.load(path)


def test_replicas_reserve_a_gpu_only_when_the_engine_runs_on_one():
    assert ServerConfig.load().ray.num_gpus == 0
    assert ServerConfig.load(device="cuda").ray.num_gpus == 1
    assert ServerConfig.load(device="cuda:1", ray_num_gpus=0.5).ray.num_gpus == 0.5


def test_fast_gemms_reach_the_engine(tmp_path, monkeypatch):
    """exact_gemms from the YAML (or --fast-gemms) is what the served engine is built with; exact by default."""
    from pedro.server import backend

    built = []
    monkeypatch.setattr(backend, "Engine", lambda *a, **kw: built.append(kw) or object())
    monkeypatch.setattr(backend, "AsyncEngine", lambda engine: engine)
    path = tmp_path / "server.yaml"
    path.write_text("exact_gemms: false\n")
    backend.LocalBackend.from_config(ServerConfig.load(path))
    backend.LocalBackend.from_config(ServerConfig.load())
    assert [kw["exact_gemms"] for kw in built] == [False, True]


def test_keys_from_file_and_environment(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("tenants:\n  alice: [sk-alice-123]\n  bob: sk-bob-12345\nadmin: [sk-admin-123]\n")
    ring = KeyRing.load(
        keys, environ={"PEDRO_API_KEYS": "carol=sk-carol-123, alice=sk-alice-456", "PEDRO_ADMIN_KEYS": "sk-root-1234"}
    )
    assert not ring.open
    for key, who in [
        ("sk-alice-123", Principal("alice")),
        ("sk-alice-456", Principal("alice")),
        ("sk-bob-12345", Principal("bob")),
        ("sk-carol-123", Principal("carol")),
        ("sk-admin-123", Principal(ADMIN_TENANT, True)),
        ("sk-root-1234", Principal(ADMIN_TENANT, True)),
    ]:
        assert ring.resolve(f"Bearer {key}") == who
    for header in (None, "", "Bearer ", "Bearer sk-nobody-123", "sk-alice-123", "Basic sk-alice-123"):
        assert ring.resolve(header) is None


def test_no_keys_means_open_single_tenant():
    ring = KeyRing.load(None, environ={})
    assert ring.open and ring.resolve(None) == Principal(OPEN_TENANT, admin=True)


@pytest.mark.parametrize(
    "tenants, admin, fragment",
    [
        ({"alice": ["short"]}, [], "at least 8"),
        ({"alice": ["sk-shared-1"], "bob": ["sk-shared-1"]}, [], "two tenants"),
        ({"admin": ["sk-admin-123"]}, [], "reserved"),
        ({"../etc": ["sk-evil-1234"]}, [], "invalid tenant name"),
    ],
)
def test_bad_keys_are_refused_at_start(tenants, admin, fragment):
    with pytest.raises(ValueError, match=fragment):
        KeyRing(tenants, admin)


@pytest.mark.parametrize("name", ["a", "support-bot", "v1.2_final", "A" * 64])
def test_safe_names(name):
    assert check_name("adapter", name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "../x", "a/b", "/abs", "a:b", ".hidden", "-x", "a..b", "A" * 65, "é", "a b", "x\n"]
)
def test_unsafe_names(name):
    with pytest.raises(ValueError, match="invalid adapter name"):
        check_name("adapter", name)


def test_pedro_serve_refuses_a_bad_config_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from pedro.cli import app

    path = tmp_path / "server.yaml"
    path.write_text("max_bach: 4\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert isinstance(result.exception, ValueError) and "max_bach" in str(result.exception)
    keys = tmp_path / "keys.yaml"
    keys.write_text("tenants:\n  alice: [short]\n")
    result = CliRunner().invoke(app, ["serve", "--keys-file", str(keys), "--backbone", "/nonexistent"])
    assert isinstance(result.exception, ValueError) and "at least 8" in str(result.exception)
