"""Adapters the engine serves: parsed from PEFT directories (PEDRO, LoRA, (IA)3) or in-memory PeftModels,
checked against the backbone at registration, and materialised on demand into a bounded LRU resident set.

Registration reads only the config and the tensors' shapes, so thousands of adapters can be registered; the
weights are loaded when a request first needs them and dropped again when the LRU evicts them. An adapter in
use by a running request is pinned and never evicted.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Union, cast

import peft
import torch
from safetensors.torch import load_file
from torch import nn

from pedro.backbones import layer_map
from pedro.config import PedroConfig
from pedro.engine.adapter_config import AdapterConfigError, check_served, read_adapter_files
from pedro.engine.request import RequestError
from pedro.generator import HeadStack, VectorGenerator
from pedro.io import WEIGHTS_NAME, AdapterFileError, check_adapter_dir, read_prompt_format
from pedro.model import plan_sites, shape_mismatch


class AdapterError(ValueError):
    """An adapter the engine cannot register or load (format, backbone mismatch, unsupported feature)."""


class UnknownAdapter(AdapterError, RequestError):
    """A name the engine has no adapter under: never registered, or removed since the caller looked it up (a
    server deleting an adapter while a request for it was being admitted). A RequestError too, so a request
    naming it is refused alone."""


@dataclass(frozen=True)
class ModelSpec:
    """The measured sizes of one loaded backbone, which adapters are checked against and the engine allocates
    by: its layer count, each linear module's (in, out) width and the attention head width. The module names
    and paths are its family's (pedro.backbones.LayerMap)."""

    n_layers: int
    d_model: int
    module_paths: dict[str, str]  # engine module name -> path inside a decoder layer
    shapes: dict[str, tuple[int, int]]  # engine module name -> (in_features, out_features)
    layers_path: str
    head_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSpec":
        lmap = layer_map(model)
        layers = cast(nn.ModuleList, model.get_submodule(lmap.layers))
        config: Any = model.config
        paths = lmap.linears
        shapes = {}
        for name, path in paths.items():
            linear = cast(nn.Linear, layers[0].get_submodule(path))
            shapes[name] = (linear.in_features, linear.out_features)
        head_dim = shapes["k"][1] // config.num_key_value_heads
        return cls(len(layers), config.hidden_size, paths, shapes, lmap.layers, head_dim)

    def module_of(self, path: str) -> str | None:
        return next((name for name, p in self.module_paths.items() if p == path), None)


# ----------------------------------------------------------------------------------- resident adapter forms


@dataclass
class PedroWeights:
    """A PEDRO adapter ready to run: one VectorGenerator per adapted layer (the same object for every layer
    when the generator is shared) and, per layer, which slice of z scales which module's output."""

    config: PedroConfig
    generators: dict[int, VectorGenerator]
    slices: dict[int, list[tuple[str, int, int]]]  # layer -> [(module, start, end)]
    heads: dict[int, HeadStack] = field(default_factory=dict, init=False)  # layer -> its generator's head

    def __post_init__(self) -> None:
        if self.head_form is not None:
            self.heads = {layer: HeadStack.of(generator) for layer, generator in self.generators.items()}

    @cached_property
    def head_form(self) -> tuple | None:
        """Its generators' one ``head_form``, or None (they differ, or cannot be stacked): the heads of
        adapters of one form run as one batched product at prefill, stacked from their ``heads``."""
        forms = {generator.head_form() for generator in self.generators.values()}
        return forms.pop() if len(forms) == 1 else None


@dataclass
class LoraWeights:
    """Per (layer, module): A (r, d_in) and B (d_out, r) with the LoRA scaling folded into B."""

    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class VectorWeights:
    """(IA)3: per (layer, side, module) the vector z = l - 1 of the learned l that multiplies that module's output
    (side "out") or input ("in"): the engine applies every per-row scale as x + x * z (rows.py)."""

    vectors: dict[tuple[int, str, str], torch.Tensor]


Weights = Union[PedroWeights, LoraWeights, VectorWeights]


# ----------------------------------------------------------------------------------- parsing and checking


def _strip(key: str) -> str:
    return key[len("base_model.model.") :] if key.startswith("base_model.model.") else key


def _layer_and_module(key: str, spec: ModelSpec, suffix: str) -> tuple[int, str]:
    match = re.search(re.escape(spec.layers_path) + r"\.(\d+)\.(.+)\." + re.escape(suffix) + "$", _strip(key))
    module = spec.module_of(match.group(2)) if match else None
    if match is None or module is None:
        raise AdapterError(
            f"tensor {key!r} is not on a decoder-layer linear module the engine serves ({list(spec.module_paths)})"
        )
    layer = int(match.group(1))
    if layer >= spec.n_layers:
        raise AdapterError(f"tensor {key!r} is for layer {layer}, but the backbone has {spec.n_layers} layers")
    return layer, module


def _check_shape(key: str, got: tuple[int, ...], want: tuple[int, ...], r: int) -> None:
    if tuple(got) != tuple(want):
        raise AdapterError(shape_mismatch(key, got, want, r))


@dataclass
class AdapterPlan:
    """A checked adapter: its kind, config, and how to turn its tensors into resident weights."""

    kind: str  # "pedro" | "lora" | "ia3"
    config: Any
    roles: dict[str, Any]  # file key -> role (kind-specific)
    n_params: int

    def bytes_per_param(self, dtype: torch.dtype) -> int:
        """Bytes one parameter takes once resident: PEDRO generators run in torch's default dtype (fp32, see
        ``_pedro_weights``), LoRA and (IA)3 weights in the engine's dtype."""
        resident = torch.get_default_dtype() if self.kind == "pedro" else dtype
        return resident.itemsize

    def materialise(
        self,
        tensors: dict[str, torch.Tensor],
        spec: ModelSpec,
        model: nn.Module,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Weights:
        """The weights a row of this adapter runs with, where it runs them: PEDRO generators and (IA)3 vectors on
        ``device`` (they are read in the forward), LoRA weights on the host (they are copied into the runner's
        stacks on ``device`` when the adapter becomes resident, so they need no second copy there)."""
        if self.kind == "pedro":
            return _pedro_weights(self, tensors, spec, model, device)
        if self.kind == "lora":
            return _lora_weights(self, tensors, dtype)
        # l - 1 in fp32, then cast: exact for l in [0.5, 2], where casting l itself to bf16 would round it to
        # steps of 2^-7 above 1
        return VectorWeights(
            {role: (tensors[key].reshape(-1).float() - 1.0).to(device, dtype) for key, role in self.roles.items()}
        )


def _shell(config: PedroConfig, spec: ModelSpec, width: int) -> VectorGenerator:
    """A VectorGenerator without storage (meta device): its shapes, or a module to load weights into. No random
    initialisation, so loading on the engine's loader thread never draws from the global RNG that other
    threads (a user seeding torch and building a model) rely on."""
    with torch.device("meta"):
        return VectorGenerator(spec.d_model, out_features=width, **config.generator_args())


def _pedro_plan(
    config: PedroConfig, shapes: dict[str, tuple[int, ...]], spec: ModelSpec, model: nn.Module
) -> AdapterPlan:
    try:
        sites = plan_sites(config, model)
    except ValueError as err:
        raise AdapterError(f"PEDRO adapter does not fit this backbone: {err}") from err
    taps = {site.layer: site.end for site in sites.values() if site.kind == "tap"}
    lmap = layer_map(model)
    roles: dict[str, Any] = {}
    expected: dict[tuple[int | None, str], tuple[int, ...]] = {}
    param_names = set(_shell(config, spec, next(iter(taps.values()))).state_dict())
    for layer, width in taps.items():
        gen = _shell(config, spec, width)
        for name, tensor in gen.state_dict().items():
            expected[(None if config.share_generator else layer, name)] = tuple(tensor.shape)
    marker = "pedro_shared_generator." if config.share_generator else "pedro_generator."
    for key, shape in shapes.items():
        if marker not in key:
            raise AdapterError(f"PEDRO adapter has an unexpected tensor {key!r}")
        prefix, rest = key.split(marker, 1)
        if rest not in param_names:  # PEFT may keep the adapter name as one extra segment
            rest = rest.split(".", 1)[-1]
        owner: int | None = None  # the generator's layer; None for the shared generator
        if not config.share_generator:
            match = re.search(re.escape(lmap.layers) + r"\.(\d+)\." + re.escape(lmap.norm) + r"\.$", prefix)
            owner = int(match.group(1)) if match else -1
        if owner is not None and owner >= spec.n_layers:
            raise AdapterError(
                f"PEDRO adapter tensor {key!r} is for layer {owner}, but the backbone has {spec.n_layers} layers: "
                "the adapter was trained for a different backbone"
            )
        if (owner, rest) not in expected:
            raise AdapterError(f"PEDRO adapter tensor {key!r} does not belong to this config on this backbone")
        _check_shape(key, shape, expected[(owner, rest)], config.r)
        roles[key] = (owner, rest)
    missing = sorted(set(expected) - set(roles.values()), key=str)
    if missing:
        raise AdapterError(f"PEDRO adapter is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    return AdapterPlan("pedro", config, roles, sum(math.prod(s) for s in shapes.values()))


def _pedro_weights(
    plan: AdapterPlan, tensors: dict[str, torch.Tensor], spec: ModelSpec, model: nn.Module, device: torch.device
) -> PedroWeights:
    config: PedroConfig = plan.config
    sites = plan_sites(config, model)
    lmap = layer_map(model)
    by_layer: dict[int | None, dict[str, torch.Tensor]] = {}
    for key, (layer, name) in plan.roles.items():
        by_layer.setdefault(layer, {})[name] = tensors[key]
    generators: dict[int, VectorGenerator] = {}
    slices: dict[int, list[tuple[str, int, int]]] = {}
    shared = None
    for name, site in sites.items():
        if site.kind == "tap":
            if config.share_generator and shared is not None:
                generators[site.layer] = shared
                continue
            gen = _shell(config, spec, site.end)
            state = by_layer[None if config.share_generator else site.layer]
            gen.load_state_dict({k: v.to(torch.get_default_dtype()) for k, v in state.items()}, assign=True)
            generators[site.layer] = shared = gen.to(device).eval().requires_grad_(False)
        else:
            path = name.split(f"{lmap.layers}.{site.layer}.", 1)[1]
            module = spec.module_of(path)
            assert module is not None, f"{path} is a projection of the layer map, so the spec names it"
            slices.setdefault(site.layer, []).append((module, site.start, site.end))
    return PedroWeights(config, generators, slices)


def _lora_plan(config: peft.LoraConfig, shapes: dict[str, tuple[int, ...]], spec: ModelSpec) -> AdapterPlan:
    try:
        check_served(config)  # the allow-list of LoRA features the engine implements (adapter_config.py)
    except AdapterConfigError as err:
        raise AdapterError(str(err)) from None
    roles: dict[str, Any] = {}
    for key, shape in shapes.items():
        part = (
            "lora_A.weight"
            if key.endswith("lora_A.weight")
            else "lora_B.weight"
            if key.endswith("lora_B.weight")
            else None
        )
        if part is None:
            raise AdapterError(f"LoRA adapter has a tensor the engine does not serve: {key!r}")
        layer, module = _layer_and_module(key, spec, part)
        d_in, d_out = spec.shapes[module]
        _check_shape(key, shape, (config.r, d_in) if part.startswith("lora_A") else (d_out, config.r), config.r)
        roles[key] = (layer, module, part[5])
    pairs: dict[tuple[int, str], set[str]] = {}
    for layer, module, ab in roles.values():
        pairs.setdefault((layer, module), set()).add(ab)
    if any(v != {"A", "B"} for v in pairs.values()):
        raise AdapterError("LoRA adapter has an A matrix without its B (or the reverse)")
    return AdapterPlan("lora", config, roles, sum(math.prod(s) for s in shapes.values()))


def _lora_weights(plan: AdapterPlan, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> LoraWeights:
    config = plan.config
    scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, (layer, module, ab) in plan.roles.items():
        parts.setdefault((layer, module), {})[ab] = tensors[key]
    weights = {site: (p["A"].to(dtype), (p["B"] * scaling).to(dtype)) for site, p in parts.items()}
    return LoraWeights(config.r, weights)


def _ia3_plan(config: peft.IA3Config, shapes: dict[str, tuple[int, ...]], spec: ModelSpec) -> AdapterPlan:
    roles: dict[str, Any] = {}
    for key, shape in shapes.items():
        if not key.endswith("ia3_l"):
            raise AdapterError(f"(IA)3 adapter has a tensor the engine does not serve: {key!r}")
        layer, module = _layer_and_module(key, spec, "ia3_l")
        d_in, d_out = spec.shapes[module]
        if tuple(shape) not in ((d_out, 1), (1, d_in)):
            raise AdapterError(
                f"adapter tensor {key} has shape {tuple(shape)} but this backbone needs {(d_out, 1)} (output scaling) "
                f"or {(1, d_in)} (feed-forward input scaling); the adapter was trained for a different backbone"
            )
        roles[key] = (layer, "out" if tuple(shape) == (d_out, 1) else "in", module)
    return AdapterPlan("ia3", config, roles, sum(math.prod(s) for s in shapes.values()))


def plan_adapter(config: Any, shapes: dict[str, tuple[int, ...]], spec: ModelSpec, model: nn.Module) -> AdapterPlan:
    """Check an adapter's config and tensor shapes against the backbone; refuse anything it cannot serve."""
    if not shapes:
        raise AdapterError("the adapter has no tensors")
    if isinstance(config, PedroConfig):
        return _pedro_plan(config, shapes, spec, model)
    if isinstance(config, peft.LoraConfig):
        return _lora_plan(config, shapes, spec)
    if isinstance(config, peft.IA3Config):
        return _ia3_plan(config, shapes, spec)
    raise AdapterError(
        f"adapter type {getattr(config, 'peft_type', type(config).__name__)} is not served; the engine serves PEDRO, LORA and IA3"
    )


# ----------------------------------------------------------------------------------- registry + LRU


@dataclass
class Registered:
    """A registered adapter: where its tensors come from (a directory, or a CPU state dict) and its plan."""

    name: str
    plan: AdapterPlan
    directory: Path | None = None
    state: dict[str, torch.Tensor] | None = None
    prompt_format: str | None = None  # how training encoded prompts (pedro.io), when it was recorded
    pins: int = 0
    resident_index: int | None = None  # its place in the resident set (1..capacity) while resident
    weights: Weights | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.plan.kind

    def load_tensors(self) -> dict[str, torch.Tensor]:
        if self.state is not None:
            return self.state
        assert self.directory is not None, "a registered adapter has a directory or a state dict"
        check_adapter_dir(self.directory)
        return load_file(str(self.directory / WEIGHTS_NAME))


def read_adapter(
    source: Union[str, Path, nn.Module],
) -> tuple[Any, dict[str, tuple[int, ...]], Path | None, dict | None]:
    """-> (peft config, tensor shapes, directory or None, CPU state dict or None) without loading weights
    from a directory (only the safetensors header)."""
    if isinstance(source, (str, Path)):
        directory = Path(source).expanduser()
        try:
            config, shapes = read_adapter_files(directory)
        except (AdapterConfigError, AdapterFileError) as err:
            raise AdapterError(f"{directory}: {err}") from None
        return config, shapes, directory, None
    if isinstance(source, peft.PeftModel):
        name = source.active_adapter
        try:
            check_served(source.peft_config[name])
        except AdapterConfigError as err:
            raise AdapterError(str(err)) from None
        state = {
            k: v.detach().to("cpu", copy=True)
            for k, v in peft.get_peft_model_state_dict(source, adapter_name=name).items()
        }
        return source.peft_config[name], {k: tuple(v.shape) for k, v in state.items()}, None, state
    raise AdapterError(f"an adapter must be a directory or a peft.PeftModel, got {type(source).__name__}")


class AdapterStore:
    """Every registered adapter, and the bounded set of them that is resident (materialised) right now.

    Loading is split so that disk reads never run inside an engine step: ``load`` (pure: read the tensors and
    materialise them; the engine runs it on a background thread) -> ``stage`` (the weights wait, ready) ->
    ``acquire`` (between steps: install them at a free resident index, which is a memory copy, and pin).
    ``on_load(entry)`` lets the runner copy an adapter into its stacked tensors, at its resident index, when it
    becomes resident (rows.py); resident indices are 1..capacity (0 means "no adapter"). A resident index is
    neither a batch row nor a KV-cache slot (those are one and the same: rows.py).
    """

    def __init__(self, spec: ModelSpec, model: nn.Module, capacity: int, dtype: torch.dtype) -> None:
        if capacity < 1:
            raise ValueError(f"adapter capacity must be >= 1, got {capacity}")
        self.spec, self.model, self.capacity, self.dtype = spec, model, capacity, dtype
        self.device = next(model.parameters()).device
        self.registered: dict[str, Registered] = {}
        self.ready: dict[str, Weights] = {}  # loaded, waiting to become resident
        self.loads = 0
        self.evictions = 0
        self.on_load: Callable[[Registered], None] = lambda entry: None
        self.clear_resident()

    def clear_resident(self) -> None:
        """Forget every resident and staged adapter and every pin (the engine rebuilding after a failure);
        registrations stay."""
        self.resident: OrderedDict[str, Registered] = OrderedDict()  # LRU order, oldest first
        self.free_indices = list(range(self.capacity, 0, -1))
        self.ready.clear()
        for entry in self.registered.values():
            entry.pins, entry.resident_index, entry.weights = 0, None, None

    def add(self, name: str, source: Union[str, Path, nn.Module]) -> Registered:
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self.registered:
            raise AdapterError(f"adapter {name!r} is already registered; remove it first")
        try:
            plan, directory, state = self.plan(source)
        except AdapterError as err:
            raise AdapterError(f"adapter {name!r}: {err}") from None
        try:
            prompt_format = read_prompt_format(directory) if directory is not None else None
        except AdapterFileError as err:
            raise AdapterError(f"adapter {name!r}: {err}") from None
        entry = Registered(name, plan, directory, state, prompt_format)
        self.registered[name] = entry
        return entry

    def plan(self, source: Union[str, Path, nn.Module]) -> tuple[AdapterPlan, Path | None, dict | None]:
        """Read and check ``source`` against the backbone without registering it -> (plan, directory, state)."""
        config, shapes, directory, state = read_adapter(source)
        return plan_adapter(config, shapes, self.spec, self.model), directory, state

    def remove(self, name: str) -> None:
        entry = self.get(name)
        if entry.pins:
            raise AdapterError(f"adapter {name!r} is in use by {entry.pins} running request(s)")
        if name in self.resident:
            self._evict(entry)
        self.ready.pop(name, None)
        del self.registered[name]

    def get(self, name: str) -> Registered:
        """The registered adapter ``name``. The error names only ``name``: the caller may be one tenant and the
        registry holds every tenant's adapters."""
        if name not in self.registered:
            raise UnknownAdapter(f"unknown adapter {name!r}", field="adapter")
        return self.registered[name]

    def needs_load(self, name: str) -> bool:
        return name in self.registered and name not in self.resident and name not in self.ready

    def load(self, name: str, entry: Registered | None = None) -> Weights:
        """Read and materialise ``name``'s weights without touching the resident set (safe on another thread).
        Any failure is an AdapterError naming the adapter."""
        entry = entry or self.get(name)
        try:
            return entry.plan.materialise(entry.load_tensors(), self.spec, self.model, self.dtype, self.device)
        except Exception as err:  # whatever the files do to the loader, it is this adapter's failure alone
            raise AdapterError(f"adapter {name!r} could not be loaded: {err}") from err

    def stage(self, name: str, weights: Weights) -> None:
        if name in self.registered and name not in self.resident:
            self.ready[name] = weights

    def can_acquire(self, name: str) -> bool:
        """True when ``name`` is resident, or loaded and installable without evicting a pinned adapter."""
        if name in self.resident:
            return True
        return name in self.ready and (bool(self.free_indices) or any(e.pins == 0 for e in self.resident.values()))

    def acquire(self, name: str) -> Registered:
        """Make a resident or staged ``name`` resident (evicting the least recently used unpinned adapter) and
        pin it."""
        entry = self.get(name)
        if name in self.resident:
            self.resident.move_to_end(name)
        else:
            if not self.free_indices:
                victim = next((e for e in self.resident.values() if e.pins == 0), None)
                if victim is None:
                    raise AdapterError("every resident adapter is in use; raise the adapter capacity")
                self._evict(victim)
            entry.weights = self.ready.pop(name)
            entry.resident_index = self.free_indices.pop()
            self.resident[name] = entry
            self.loads += 1
            self.on_load(entry)
        entry.pins += 1
        return entry

    def release(self, entry: Registered) -> None:
        entry.pins -= 1

    def _evict(self, entry: Registered) -> None:
        del self.resident[entry.name]
        assert entry.resident_index is not None, "a resident adapter holds a resident index"
        self.free_indices.append(entry.resident_index)
        entry.resident_index, entry.weights = None, None
        self.evictions += 1

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": e.name,
                "kind": e.kind,
                "parameters": e.plan.n_params,
                "bytes": e.plan.n_params * e.plan.bytes_per_param(self.dtype),
                "resident": e.name in self.resident,
                "in_use": e.pins,
                "source": str(e.directory) if e.directory else "memory",
                "prompt_format": e.prompt_format,
            }
            for e in self.registered.values()
        ]
