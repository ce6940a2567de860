"""pedro.engine.adapter_config: which adapter configs and tensor dtypes the engine serves.

Configs saved by PEFT / pedro are accepted; every unknown field, unserved feature, ill-typed value and non-float
tensor dtype is refused with the field (or tensor) named, by the parser and through the engine's read_adapter."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import pedro
from pedro.engine.adapter_config import (
    CLASSES,
    IA3_SERVED,
    LORA_INERT,
    LORA_SERVED,
    METADATA,
    AdapterConfigError,
    check_dtypes,
    check_served,
    parse_adapter_config,
)
from pedro.engine.adapters import AdapterError, read_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def saved(tmp_path_factory, name, model) -> dict:
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return {"dir": path, "config": json.loads((path / "adapter_config.json").read_text())}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_rich = peft.LoraConfig(
        r=2,
        lora_alpha=3.5,
        lora_dropout=0.1,
        use_rslora=True,
        init_lora_weights="gaussian",
        target_modules=["q_proj", "up_proj"],
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        task_type="CAUSAL_LM",
    )
    ia3 = peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    return {
        "lora": saved(tmp_path_factory, "lora", peft.get_peft_model(tiny_model("llama"), lora)),
        "lora_rich": saved(tmp_path_factory, "lora_rich", peft.get_peft_model(tiny_model("llama"), lora_rich)),
        "ia3": saved(tmp_path_factory, "ia3", peft.get_peft_model(tiny_model("llama"), ia3)),
        "pedro": saved(tmp_path_factory, "pedro", pedro.get_pedro_model(tiny_model("llama"), pedro.PedroConfig(r=4))),
        "pedro_shared": saved(
            tmp_path_factory,
            "pedro_shared",
            pedro.get_pedro_model(
                tiny_model("llama"), pedro.PedroConfig(r=2, share_generator=True, targets=["k", "o"], layers=[1])
            ),
        ),
    }


# ------------------------------------------------------------------------------------------------ accepted


@pytest.mark.parametrize(
    "name,cls",
    [
        ("lora", peft.LoraConfig),
        ("lora_rich", peft.LoraConfig),
        ("ia3", peft.IA3Config),
        ("pedro", pedro.PedroConfig),
        ("pedro_shared", pedro.PedroConfig),
    ],
)
def test_configs_saved_by_peft_and_pedro_are_accepted(adapters, name, cls):
    raw = adapters[name]["config"]
    config = parse_adapter_config(raw)
    assert type(config) is cls
    for key in ("r", "lora_alpha", "use_rslora", "pooler", "share_generator", "targets"):
        if key in raw:
            assert getattr(config, key) == raw[key]
    config, shapes, directory, _ = read_adapter(adapters[name]["dir"])  # the engine's path parses the same way
    assert type(config) is cls and shapes and directory == adapters[name]["dir"]


def test_in_memory_peft_models_are_checked_too():
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(read_adapter(model)[0], peft.LoraConfig)
    dora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter(dora)
    for kwargs, named in (
        (dict(bias="lora_only"), "bias"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
    ):
        with pytest.raises(AdapterConfigError, match=named):
            check_served(peft.LoraConfig(r=4, **kwargs))
    check_served(peft.LoraConfig(r=4, use_rslora=True, lora_alpha=7))
    check_served(pedro.PedroConfig(r=4))


def test_every_field_of_the_config_classes_is_decided():
    """A field PEFT adds in a new version is refused (not default) until it is added to an allow-list."""
    import dataclasses

    lora_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(LORA_SERVED) | set(LORA_INERT) | set(METADATA) <= lora_fields
    assert set(IA3_SERVED) | set(METADATA) <= {f.name for f in dataclasses.fields(peft.IA3Config)}
    assert set(CLASSES) == {"PEDRO", "LORA", "IA3"}


# ------------------------------------------------------------------------------------------------ refused

LORA_REFUSED = {  # field: a value that turns on a feature the engine does not implement
    "use_dora": True,
    "layer_replication": [[0, 2], [1, 3]],
    "rank_pattern": {"q_proj": 2},
    "alpha_pattern": {"q_proj": 2},
    "modules_to_save": ["lm_head"],
    "bias": "all",
    "fan_in_fan_out": True,
    "megatron_config": {"tensor_model_parallel_size": 2},
    "loftq_config": {"loftq_bits": 4},
    "lora_bias": True,
    "use_qalora": True,
    "trainable_token_indices": [1, 2],
    "target_parameters": ["mlp.experts.down_proj"],
    "alora_invocation_tokens": [5, 6],
    "use_bdlora": {"nblocks": 2},
    "runtime_config": {"ephemeral_gpu_offload": True},
}


@pytest.mark.parametrize("field", sorted(LORA_REFUSED))
def test_unserved_lora_features_are_refused_by_name(adapters, field):
    if field not in {f for f in peft.LoraConfig.__dataclass_fields__}:
        pytest.skip(f"this PEFT version has no {field}")
    raw = {**adapters["lora"]["config"], field: LORA_REFUSED[field]}
    with pytest.raises(AdapterConfigError, match=rf"LoRA adapter uses {field}=.*does not serve"):
        parse_adapter_config(raw)


@pytest.mark.parametrize("field,value", [("fan_in_fan_out", True), ("modules_to_save", ["lm_head"])])
def test_unserved_ia3_features_are_refused_by_name(adapters, field, value):
    with pytest.raises(AdapterConfigError, match=rf"\(IA\)3 adapter uses {field}="):
        parse_adapter_config({**adapters["ia3"]["config"], field: value})


@pytest.mark.parametrize("kind", ["lora", "ia3", "pedro"])
def test_unknown_fields_are_refused_by_name(adapters, kind):
    with pytest.raises(AdapterConfigError, match=r"unknown field\(s\) \['surprise', 'zzz_new_option'\]"):
        parse_adapter_config({**adapters[kind]["config"], "surprise": 1, "zzz_new_option": True})


BAD_LORA_VALUES = [
    ("r", "8", "r must be a positive integer, got '8'"),
    ("r", 8.5, "r must be a positive integer, got 8.5"),
    ("r", True, "r must be a positive integer, got True"),
    ("r", 0, "r must be a positive integer, got 0"),
    ("r", -4, "r must be a positive integer"),
    ("r", None, "r must be a positive integer"),
    ("lora_alpha", float("inf"), "lora_alpha must be a finite number, got inf"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("lora_alpha", "16", "lora_alpha must be a finite number"),
    ("lora_alpha", False, "lora_alpha must be a finite number"),
    ("lora_dropout", 1.0, "lora_dropout must be a number in [0, 1)"),
    ("lora_dropout", -0.1, "lora_dropout must be a number in [0, 1)"),
    ("use_rslora", "yes", "use_rslora must be a bool"),
    ("init_lora_weights", "pissa", "init_lora_weights must be one of"),
    ("init_lora_weights", "olora", "init_lora_weights must be one of"),
    ("init_lora_weights", "mica", "init_lora_weights must be one of"),
    ("init_lora_weights", 1, "init_lora_weights must be one of"),
    ("target_modules", [1, 2], "target_modules must be null, a non-empty string or a list of non-empty strings"),
    ("target_modules", {"q_proj": 1}, "target_modules must be"),
    ("layers_to_transform", [-1], "layers_to_transform must be"),
    ("layers_to_transform", "0", "layers_to_transform must be"),
    ("layers_pattern", 3, "layers_pattern must be"),
    ("task_type", 5, "task_type must be null or a string"),
    ("inference_mode", "true", "inference_mode must be a bool"),
    ("base_model_name_or_path", ["x"], "base_model_name_or_path must be null or a string"),
    ("eva_config", {"rho": 2.0, "bogus": 1}, "eva_config must be"),
]


@pytest.mark.parametrize("field,value,message", BAD_LORA_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_LORA_VALUES])
def test_ill_typed_lora_values_are_refused_by_name(adapters, field, value, message):
    with pytest.raises(AdapterConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_adapter_config({**adapters["lora"]["config"], field: value})


def test_json_infinity_from_a_file_is_refused():
    """``1e400`` in JSON text parses to inf in Python: still refused, by name."""
    raw = json.loads('{"peft_type": "LORA", "r": 4, "lora_alpha": 1e400, "target_modules": ["q_proj"]}')
    with pytest.raises(AdapterConfigError, match="lora_alpha must be a finite number, got inf"):
        parse_adapter_config(raw)
    raw = json.loads('{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity}')
    with pytest.raises(AdapterConfigError, match="lora_alpha"):
        parse_adapter_config(raw)


def test_peft_own_validation_runs(adapters):
    """What LoraConfig / IA3Config.__post_init__ refuse is refused too, as the same error type."""
    with pytest.raises(AdapterConfigError, match="not a valid LORA config.*layers_to_transform"):
        parse_adapter_config({**adapters["lora"]["config"], "layers_pattern": "layers", "layers_to_transform": None})
    with pytest.raises(AdapterConfigError, match="not a valid LORA config"):
        parse_adapter_config({**adapters["lora"]["config"], "task_type": "NOT_A_TASK"})
    with pytest.raises(AdapterConfigError, match="not a valid IA3 config.*feedforward"):
        parse_adapter_config({**adapters["ia3"]["config"], "feedforward_modules": ["up_proj"]})


@pytest.mark.parametrize(
    "field,value",
    [
        ("pooler", "median"),
        ("r", "4"),
        ("r", 0),
        ("targets", ["q", "zz"]),
        ("layers", [-1]),
        ("share_generator", "no"),
        ("task_type", "SEQ_CLS"),
    ],
)
def test_pedro_config_validation_names_the_field(adapters, field, value):
    with pytest.raises(AdapterConfigError, match=f"not a valid PEDRO config.*{field}"):
        parse_adapter_config({**adapters["pedro"]["config"], field: value})


@pytest.mark.parametrize(
    "raw,message",
    [
        ([1, 2], "must be a JSON object"),
        ({"r": 4}, "peft_type must be one of"),
        ({"peft_type": "PROMPT_TUNING"}, "peft_type must be one of"),
        ({"peft_type": ["LORA"]}, "peft_type must be one of"),
    ],
)
def test_peft_type_must_be_served(raw, message):
    with pytest.raises(AdapterConfigError, match=message):
        parse_adapter_config(raw)


def test_inert_and_off_values_are_accepted(adapters):
    """Fields that only matter with a refused feature, and "off" written as null / {} / false, are fine."""
    raw = {
        **adapters["lora"]["config"],
        "megatron_core": "other.core",
        "qalora_group_size": 32,
        "ensure_weight_tying": True,
        "use_dora": None,
        "rank_pattern": None,
        "loftq_config": None,
        "layer_replication": [],
    }
    assert isinstance(parse_adapter_config(raw), peft.LoraConfig)


# ------------------------------------------------------------------------------------------------ through the engine


def test_read_adapter_refuses_with_adapter_error(adapters, tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes(
        (adapters["lora"]["dir"] / "adapter_model.safetensors").read_bytes()
    )
    for change, named in (
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"r": "4"}, "r must be"),
        ({"x": 1}, "'x'"),
    ):
        (directory / "adapter_config.json").write_text(json.dumps({**adapters["lora"]["config"], **change}))
        with pytest.raises(AdapterError, match=named):
            read_adapter(directory)
    (directory / "adapter_config.json").write_text("[" * 100_000)
    with pytest.raises(AdapterError, match="cannot read the adapter config"):
        read_adapter(directory)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "int8", "int64", "bool", "uint8"])
def test_non_float_tensor_dtypes_are_refused_from_the_header(adapters, tmp_path, dtype):
    tensors = load_file(str(adapters["lora"]["dir"] / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(getattr(torch, dtype))
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapters["lora"]["config"]))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"adapter tensor {key} has dtype"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_float_tensor_dtypes_are_served(adapters, tmp_path, dtype):
    tensors = {
        k: v.to(getattr(torch, dtype))
        for k, v in load_file(str(adapters["lora"]["dir"] / "adapter_model.safetensors")).items()
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapters["lora"]["config"]))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert isinstance(read_adapter(tmp_path)[0], peft.LoraConfig)


def test_check_dtypes_names_tensor_and_dtype():
    check_dtypes([("a", "F32"), ("b", "BF16"), ("c", "F16"), ("d", "F64")])
    with pytest.raises(AdapterConfigError, match="adapter tensor w has dtype F8_E4M3"):
        check_dtypes([("a", "F32"), ("w", "F8_E4M3")])
