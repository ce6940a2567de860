"""Which adapter configs and tensor dtypes the engine serves, decided before anything is loaded.

An ``adapter_config.json`` is parsed by the config class of its ``peft_type`` (``peft.LoraConfig``,
``peft.IA3Config``, ``pedro.PedroConfig``), so PEFT's own validation runs, but more strictly than PEFT's loader:

1. ``peft_type`` must be PEDRO, LORA or IA3;
2. a key that is not a field of that class is refused by name (PEFT drops unknown keys with a warning, which
   would load an adapter trained with an option this version does not know as a different adapter);
3. every field whose value is not the class default must be a feature the engine implements (an allow-list:
   a new PEFT option is refused until someone decides the engine serves it), so DoRA, trained biases,
   ``rank_pattern``, ``layer_replication``, ... are refused by name instead of served wrongly;
4. the served fields are type-checked (``r`` a positive integer, ``lora_alpha`` a finite number, ...);
5. the class is constructed from the dict, and whatever its ``__post_init__`` refuses is refused here too.

Every refusal is an AdapterConfigError naming the field. ``read_adapter_files`` is the one reading of an adapter
directory: the engine's registration and dry run (``pedro.engine.adapters.read_adapter``, ``Engine.check_adapter``)
and the server's upload check (``pedro.server.validate.check_adapter``) all go through it, so they accept exactly
the same directories.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import peft
from safetensors import SafetensorError, safe_open

from pedro.config import PedroConfig
from pedro.io import WEIGHTS_NAME, AdapterFileError, check_adapter_dir

CONFIG_FILE = "adapter_config.json"

# Bookkeeping fields of every PeftConfig: they describe the adapter, they do not change what it computes.
METADATA = (
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)

# LoRA: what the engine computes is x @ A.T @ B.T * scaling on decoder-layer linear modules, with
# scaling = lora_alpha / r (or / sqrt(r) with use_rslora). Which modules and layers are adapted is read from the
# tensors' names, so the selection fields (target_modules, exclude_modules, layers_to_transform,
# layers_pattern) are served whatever their value. lora_dropout acts only in training. init_lora_weights only
# says how training started; the values listed in LORA_INITS leave the base weights untouched.
LORA_SERVED = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "eva_config",
)
# Fields that only matter together with a refused feature (megatron_config, use_qalora, modules_to_save /
# trainable_token_indices), so their value alone changes nothing.
LORA_INERT = ("megatron_core", "qalora_group_size", "ensure_weight_tying")
# PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA change the base weights at initialisation: such an adapter is only
# correct on that modified backbone unless it was saved converted (save_pretrained(...,
# path_initial_model_for_weight_conversion=...)), which stores it as a plain LoRA with init_lora_weights=True.
# MiCA is a LoRA variant with its own forward.
LORA_INITS = (True, False, "gaussian", "orthogonal", "eva")

# (IA)3: a learned vector scales a module's output (or, for feed-forward modules, its input).
IA3_SERVED = ("target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights")

CLASSES: dict[str, type] = {"PEDRO": PedroConfig, "LORA": peft.LoraConfig, "IA3": peft.IA3Config}
SERVED: dict[str, tuple[str, ...]] = {"LORA": LORA_SERVED, "IA3": IA3_SERVED}
INERT: dict[str, tuple[str, ...]] = {"LORA": LORA_INERT, "IA3": ()}
DESCRIBED = {
    "LORA": ("LoRA", "plain LoRA (A and B matrices, one scaling) on decoder-layer linear modules"),
    "IA3": ("(IA)3", "(IA)3 scaling vectors on decoder-layer linear modules"),
}

# safetensors dtype names the engine loads; everything else (float8, integers, bool) is refused by name.
SERVED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class AdapterConfigError(ValueError):
    """An adapter config (or tensor dtype) the engine does not serve; the message names the field."""


# ----------------------------------------------------------------------------------------------- helpers


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, set, str)) and len(value) == 0)


def _is_default(value: Any, default: Any) -> bool:
    """``value`` leaves the field as the class default would (None, {} and False all mean "off")."""
    try:
        if value == default:
            return True
    except Exception:  # an exotic __eq__ (a nested dataclass against a dict): not the default
        return False
    return _is_off(value) and _is_off(default)


def _refuse(field: str, wanted: str, got: Any) -> None:
    raise AdapterConfigError(f"{CONFIG_FILE}: {field} must be {wanted}, got {_short(got)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_str_or_list(values: Mapping[str, Any], name: str) -> None:
    value = values.get(name)
    if value is None or (isinstance(value, str) and value):
        return
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return
    _refuse(name, "null, a non-empty string or a list of non-empty strings", value)


def _check_metadata(values: Mapping[str, Any]) -> None:
    for name in ("task_type", "peft_version", "base_model_name_or_path", "revision"):
        if values.get(name) is not None and not isinstance(values[name], str):
            _refuse(name, "null or a string", values[name])
    if "inference_mode" in values and not isinstance(values["inference_mode"], bool):
        _refuse("inference_mode", "a bool", values["inference_mode"])
    if values.get("auto_mapping") is not None and not isinstance(values["auto_mapping"], dict):
        _refuse("auto_mapping", "null or an object", values["auto_mapping"])


def _check_layers(values: Mapping[str, Any]) -> None:
    layers = values.get("layers_to_transform")
    if layers is None or (_is_int(layers) and layers >= 0):
        return
    if isinstance(layers, list) and layers and all(_is_int(i) and i >= 0 for i in layers):
        return
    _refuse("layers_to_transform", "null, a non-negative integer or a non-empty list of them", layers)


def _check_lora_types(values: Mapping[str, Any]) -> None:
    r = values.get("r", 8)
    if not _is_int(r) or r < 1:
        _refuse("r", "a positive integer", r)
    alpha = values.get("lora_alpha", 8)
    if not _is_number(alpha) or not math.isfinite(alpha):
        _refuse("lora_alpha", "a finite number", alpha)
    dropout = values.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        _refuse("lora_dropout", "a number in [0, 1)", dropout)
    if not isinstance(values.get("use_rslora", False), bool):
        _refuse("use_rslora", "a bool", values["use_rslora"])
    init = values.get("init_lora_weights", True)
    if not any(init is ok if isinstance(ok, bool) else init == ok for ok in LORA_INITS):
        _refuse(
            "init_lora_weights",
            f"one of {list(LORA_INITS)} (PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA change the base weights: save such an "
            "adapter converted, with save_pretrained(..., path_initial_model_for_weight_conversion=...); MiCA is not served)",
            init,
        )
    eva = values.get("eva_config")
    if eva is not None:
        known = {f.name for f in dataclasses.fields(peft.EvaConfig)}
        if not isinstance(eva, dict) or not set(eva) <= known:
            _refuse("eva_config", f"null or an object with fields from {sorted(known)}", eva)
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        _check_str_or_list(values, name)
    _check_layers(values)


def _check_ia3_types(values: Mapping[str, Any]) -> None:
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        _check_str_or_list(values, name)
    if not isinstance(values.get("init_ia3_weights", True), bool):
        _refuse("init_ia3_weights", "a bool", values["init_ia3_weights"])


def _unserved(kind: str, values: Mapping[str, Any]) -> list[str]:
    """``name=value`` for every field of ``values`` that is set (not the default) and not served for ``kind``."""
    served = set(METADATA) | set(SERVED[kind]) | set(INERT[kind])
    fields = {f.name: f for f in dataclasses.fields(CLASSES[kind])}
    return [
        f"{name}={_short(value)}"
        for name, value in values.items()
        if name in fields and name not in served and not _is_default(value, _default(fields[name]))
    ]


def _refuse_unserved(kind: str, values: Mapping[str, Any]) -> None:
    bad = _unserved(kind, values)
    if bad:
        name, served = DESCRIBED[kind]
        raise AdapterConfigError(
            f"{name} adapter uses {', '.join(bad)}, which the engine does not serve; it serves {served}, "
            f"set by the fields {list(SERVED[kind])}"
        )


# ----------------------------------------------------------------------------------------------- API


def parse_adapter_config(raw: Any) -> Any:
    """The config object (PedroConfig, peft.LoraConfig or peft.IA3Config) for the parsed JSON of an
    ``adapter_config.json``, or AdapterConfigError naming what is refused."""
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{CONFIG_FILE} must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("peft_type")
    if not isinstance(kind, str) or kind not in CLASSES:
        raise AdapterConfigError(f"{CONFIG_FILE}: peft_type must be one of {list(CLASSES)}, got {_short(kind)}")
    cls = CLASSES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise AdapterConfigError(
            f"{CONFIG_FILE} has unknown field(s) {unknown} for a {kind} config: {cls.__name__} of this version has "
            "no such field, and ignoring it could serve a different adapter than the one trained"
        )
    _check_metadata(raw)
    if kind == "LORA":
        _refuse_unserved(kind, raw)
        _check_lora_types(raw)
    elif kind == "IA3":
        _refuse_unserved(kind, raw)
        _check_ia3_types(raw)
    try:
        return cls(**raw)
    except (TypeError, ValueError, KeyError, AttributeError, ImportError) as err:
        raise AdapterConfigError(f"{CONFIG_FILE} is not a valid {kind} config: {err}") from None


def check_served(config: Any) -> None:
    """The allow-list alone, for a config object already built (an in-memory PeftModel's): AdapterConfigError
    naming every set feature the engine does not serve. PEDRO configs are served whole."""
    for kind, cls in CLASSES.items():
        if kind in SERVED and isinstance(config, cls):
            _refuse_unserved(kind, {f.name: getattr(config, f.name, None) for f in dataclasses.fields(cls)})
            return


def check_dtypes(dtypes: Iterable[tuple[str, str]]) -> None:
    """``(tensor name, safetensors dtype name)`` pairs (from the file header, before any value is read):
    AdapterConfigError naming the first tensor whose dtype is not float32 / float16 / bfloat16 / float64."""
    for key, dtype in dtypes:
        if dtype not in SERVED_DTYPES:
            raise AdapterConfigError(
                f"adapter tensor {key} has dtype {dtype}; adapters must hold {', '.join(SERVED_DTYPES.values())} "
                "weights (float8, integer and bool tensors are refused)"
            )


def read_adapter_files(directory: Path, max_config_bytes: int | None = None) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """Read and check an adapter directory without loading a tensor value -> (config object, tensor name -> shape).

    The config must parse and be served (``parse_adapter_config``; at most ``max_config_bytes`` when given); the
    weights must be a readable safetensors file, never a pickle (``pedro.io.check_adapter_dir``), whose header
    lists only served dtypes (``check_dtypes``). AdapterConfigError or AdapterFileError say what is wrong; the
    messages do not name ``directory``, so a caller decides whether its path may be shown (an upload's is not).
    """
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        if directory.is_file():
            raise AdapterFileError(f"a file, not an adapter directory (give the folder that holds {CONFIG_FILE})")
        raise AdapterFileError(f"not an adapter directory (no {CONFIG_FILE})")
    if max_config_bytes is not None and config_path.stat().st_size > max_config_bytes:
        raise AdapterConfigError(f"{CONFIG_FILE} is larger than {max_config_bytes} bytes")
    try:
        raw = json.loads(config_path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise AdapterConfigError(
            f"cannot read the adapter config: {CONFIG_FILE} is not valid JSON: nested too deeply"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterConfigError(f"cannot read the adapter config: {CONFIG_FILE} is not valid JSON: {err}") from None
    config = parse_adapter_config(raw)
    check_adapter_dir(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"the adapter has no {WEIGHTS_NAME}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            check_dtypes((key, s.get_dtype()) for key, s in slices.items())
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
    except SafetensorError as err:
        raise AdapterFileError(
            f"{WEIGHTS_NAME} is not a valid safetensors file (corrupt or truncated): {err}"
        ) from None
    return config, shapes
