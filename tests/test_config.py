import json

import pytest

import pedro
from pedro import PedroConfig


def test_defaults_follow_the_design():
    config = PedroConfig()
    assert (config.r, config.pooler, config.targets, config.layers, config.share_generator) == (
        8,
        "last",
        ["q", "v", "up"],
        None,
        False,
    )
    assert config.peft_type == "PEDRO" and config.task_type == "CAUSAL_LM"


def test_json_round_trip(tmp_path):
    config = PedroConfig(r=5, pooler="attention", activation="rational", targets=["up", "k"], layers=[2, 0])
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "PEDRO" and on_disk["targets"] == ["k", "up"] and on_disk["layers"] == [0, 2]
    loaded = PedroConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("r", 0, "a positive integer"),
        ("r", 2.5, "a positive integer"),
        ("pooler", "first", "one of ['last', 'mean', 'max', 'attention']"),
        ("activation", "tanh", "one of ['relu', 'gelu', 'silu', 'rational']"),
        ("targets", ["q", "w"], "['q', 'k', 'v', 'o', 'gate', 'up']"),
        ("targets", [], "non-empty list of distinct names"),
        ("targets", ["q", "q"], "non-empty list of distinct names"),
        ("layers", [0, -1], "distinct non-negative integers"),
        ("layers", [], "non-empty list"),
        ("pool_source", "embeddings", "one of ['normed', 'raw']"),
        ("share_generator", "yes", "a bool"),
        ("normalize_pooled", 1, "a bool"),
        ("scale_bound", 0, "None or a finite number > 0"),
        ("scale_bound", -0.5, "None or a finite number > 0"),
        ("scale_bound", float("inf"), "None or a finite number > 0"),
        ("scale_bound", True, "None or a finite number > 0"),
        ("scale_bound", "0.5", "None or a finite number > 0"),
        ("task_type", "SEQ_CLS", "CAUSAL_LM"),
    ],
)
def test_bad_values_are_refused_naming_field_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        PedroConfig(**{field: value})
    message = str(err.value)
    assert f"PedroConfig.{field}" in message
    assert allowed in message
    assert f"got {value!r}" in message


def test_unknown_field_in_saved_config_fails_clearly(tmp_path, tiny_llama):
    model = pedro.get_pedro_model(tiny_llama, r=2)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["bottleneck_dropout"] = 0.1
    path.write_text(json.dumps(data))
    from conftest import tiny_model
    from peft import PeftModel

    with pytest.raises(ValueError, match="bottleneck_dropout"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
