"""PedroModel: the PEFT tuner that attaches PEDRO to a transformers causal LM.

Prefill vs decode is decided in one place, a forward pre-hook on the decoder stack: a forward whose KV cache
is empty (or that has none) processes the prompt, so the taps recompute the vectors from its prompt tokens; a
forward that continues a non-empty cache is a decoding step and reuses them. The prompt tokens of a prefill
are the non-padding tokens, narrowed by ``prompt_lengths`` when the caller gives it (training: prompt +
response in one sequence), by the labels' first supervised position when only labels are given, and by the
input width of ``generate()`` so that generation without a cache never lets generated tokens into the pooler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from pedro.backbones import layer_map
from pedro.compat import adapter_state_dict
from pedro.config import PedroConfig
from pedro.generator import VectorGenerator, generator_parameter_count
from pedro.layer import PedroLayer, PedroLinear, PedroState, PedroTap

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Site:
    """One wrapped module: a layer's norm tap (``end`` = the generator's output width) or a projection
    (its slice ``[start, end)`` of that output)."""

    layer: int
    kind: str
    start: int
    end: int


def _out_features(module: nn.Module) -> int:
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return cast(nn.Linear, base).out_features


def plan_sites(config: PedroConfig, model: nn.Module) -> dict[str, Site]:
    """Module name -> Site for every module this config wraps in ``model``."""
    lmap = layer_map(model)
    n_layers = len(cast(nn.ModuleList, model.get_submodule(lmap.layers)))
    indices = config.layers if config.layers is not None else list(range(n_layers))
    out_of_range = [i for i in indices if i >= n_layers]
    if out_of_range:
        raise ValueError(
            f"PedroConfig.layers has {out_of_range}, but the model has {n_layers} layers (0..{n_layers - 1})"
        )
    sites: dict[str, Site] = {}
    for i in indices:
        prefix = f"{lmap.layers}.{i}"
        offset = 0
        for target in config.targets:
            name = f"{prefix}.{lmap.projections[target]}"
            width = _out_features(model.get_submodule(name))
            sites[name] = Site(i, "proj", offset, offset + width)
            offset += width
        sites[f"{prefix}.{lmap.norm}"] = Site(i, "tap", 0, offset)
    if config.share_generator and len({s.end for s in sites.values() if s.kind == "tap"}) > 1:
        raise ValueError("PedroConfig.share_generator needs every adapted layer to have the same target widths")
    return sites


def _hidden_size(model: nn.Module, sites: dict[str, Site]) -> int:
    tap = next(name for name, site in sites.items() if site.kind == "tap")
    norm = model.get_submodule(tap)
    return _norm_weight(norm).shape[-1]


def _norm_weight(norm: nn.Module) -> torch.Tensor:
    """The weight of a (possibly wrapped) norm: its width is the model's hidden size."""
    base = norm.get_base_layer() if isinstance(norm, BaseTunerLayer) else norm
    return cast(torch.Tensor, base.weight)


def count_trainable_parameters(config: PedroConfig, model: nn.Module) -> int:
    """Closed-form trainable parameter count of ``config`` on ``model`` (no adapter is built)."""
    sites = plan_sites(config, model)
    d_model = _hidden_size(model, sites)
    widths = [s.end for s in sites.values() if s.kind == "tap"]
    if config.share_generator:
        widths = widths[:1]
    return sum(
        generator_parameter_count(d_model, config.r, w, config.pooler, config.activation, config.generator_bias)
        for w in widths
    )


def prompt_lengths_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Prompt length per row = non-pad tokens before the first supervised label (the SFT convention)."""
    nonpad = attention_mask.bool() if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
    supervised = (labels != IGNORE_INDEX) & nonpad
    positions = torch.arange(labels.shape[1], device=labels.device)
    first = torch.where(supervised.any(1), supervised.int().argmax(1), labels.shape[1])
    lengths = (nonpad & (positions < first[:, None])).sum(1)
    if (lengths == 0).any():
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"labels supervise the first token of row(s) {rows}, so the prompt boundary cannot be inferred; "
            "pass prompt_lengths=(number of prompt tokens per row) to the forward"
        )
    return lengths


def build_prompt_mask(
    attention_mask: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    prompt_lengths: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """(B, T) bool: True on the prompt tokens the generator may pool over."""
    if attention_mask is None:
        nonpad = torch.ones(shape, dtype=torch.bool, device=device)
    elif attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"PEDRO needs a 2-D attention_mask of shape {tuple(shape)} at prefill, got {tuple(attention_mask.shape)}"
        )
    else:
        nonpad = attention_mask.bool()
    mask = nonpad
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, device=device).reshape(-1)
        if lengths.shape[0] != shape[0]:
            raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries for a batch of {shape[0]} rows")
        available = nonpad.sum(1)
        if (lengths < 1).any() or (lengths > available).any():
            raise ValueError(
                f"prompt_lengths {lengths.tolist()} must be between 1 and each row's non-pad length {available.tolist()}"
            )
        mask = mask & (nonpad.long().cumsum(1) <= lengths[:, None])
    if width is not None:
        mask = mask & (torch.arange(shape[1], device=device) < width)
    empty = ~mask.any(1)
    if empty.any():
        raise ValueError(f"row(s) {empty.nonzero().flatten().tolist()} have no prompt tokens (empty prompt)")
    return mask


def _reference(input_ids: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """The tensor whose first two dimensions are the call's (batch, tokens): the ids, else the embeddings."""
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if reference is None:
        raise ValueError("PEDRO needs input_ids or inputs_embeds to find the prompt")
    return reference


@dataclass
class _Call:
    """What the current top-level call knows about its prompt boundary."""

    prompt_lengths: torch.Tensor | None = None
    width: int | None = None


class PedroModel(BaseTuner):
    """PEFT tuner for PEDRO (see the module docstring for how prefill and decode are told apart)."""

    prefix: str = "pedro_"
    tuner_layer_cls = PedroLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    # PEFT calls each of these hooks with this tuner's own config (a PedroConfig); BaseTuner declares the base
    # PeftConfig, hence the override markers.
    def _pre_injection_hook(self, model: nn.Module, config: PedroConfig, adapter_name: str) -> None:  # type: ignore[override]
        layer_map(model)  # unsupported architecture: fail before touching the model
        self.pedro_state = PedroState()
        self._call = _Call()
        self._sites: dict[str, Site] = {}

    def _post_injection_hook(self, model: nn.Module, config: PedroConfig, adapter_name: str) -> None:  # type: ignore[override]
        stack = model.get_submodule(layer_map(model).stack)
        self._stack_hook = stack.register_forward_pre_hook(self._on_stack_forward, with_kwargs=True)

    def _prepare_adapter_config(self, peft_config: PedroConfig, model_config: dict) -> PedroConfig:  # type: ignore[override]
        return peft_config  # the sites come from the layer map in _prepare_model, not from target_modules

    def _prepare_model(self, peft_config: PedroConfig, model: nn.Module) -> None:  # type: ignore[override]
        self._sites = plan_sites(peft_config, model)
        peft_config.target_modules = sorted(self._sites)

    def _check_target_module_exists(self, peft_config: PedroConfig, key: str) -> bool:  # type: ignore[override]
        return key in self._sites

    def _create_and_replace(  # type: ignore[override]
        self,
        peft_config: PedroConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        site = self._sites[current_key]
        if site.kind == "tap":
            generator = self._make_generator(peft_config, adapter_name, target, site.end)
            if not isinstance(target, PedroTap):
                tap = PedroTap(target, site.layer, self.pedro_state)
                tap.update_layer(adapter_name, generator, peft_config.pool_source)
                self._replace_module(parent, target_name, tap, target)
            else:
                target.update_layer(adapter_name, generator, peft_config.pool_source)
        else:
            if not isinstance(target, PedroLinear):
                linear = PedroLinear(target, site.layer, self.pedro_state)
                linear.update_layer(adapter_name, site.start, site.end)
                self._replace_module(parent, target_name, linear, target)
            else:
                target.update_layer(adapter_name, site.start, site.end)

    def _make_generator(
        self, config: PedroConfig, adapter_name: str, norm: nn.Module, width: int
    ) -> VectorGenerator | None:
        """A fresh fp32 generator on the norm's device; None (and one shared generator) when sharing."""
        weight = _norm_weight(norm)
        d_model = weight.shape[-1]

        def build() -> VectorGenerator:
            generator = VectorGenerator(d_model, out_features=width, **config.generator_args())
            return generator.to(device=weight.device, dtype=torch.float32)

        if not config.share_generator:
            return build()
        if "pedro_shared_generator" not in self._modules:
            self.pedro_shared_generator = nn.ModuleDict()
        if adapter_name not in self.pedro_shared_generator:
            shared = build()
            shared.requires_grad_(not config.inference_mode)
            self.pedro_shared_generator[adapter_name] = shared
            self.pedro_state.shared_generators[adapter_name] = shared
        return None

    # ------------------------------------------------------------------------------------- prefill / decode

    def _on_stack_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = _reference(input_ids, kwargs)
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            self.pedro_state.prompt_mask = None  # decoding step: keep the prefill's vectors
            return
        self.pedro_state.vectors.clear()
        self.pedro_state.prompt_mask = build_prompt_mask(
            kwargs.get("attention_mask"),
            (reference.shape[0], reference.shape[1]),
            reference.device,
            prompt_lengths=self._call.prompt_lengths,
            width=self._call.width,
        )

    def forward(self, *args, prompt_lengths: torch.Tensor | None = None, **kwargs):
        """The wrapped model's forward, plus ``prompt_lengths`` (B,): how many of each row's non-pad tokens
        are prompt. Without it, labels' -100 prefix marks the prompt; without labels, the whole input is."""
        if prompt_lengths is None and kwargs.get("labels") is not None:
            prompt_lengths = prompt_lengths_from_labels(kwargs["labels"], kwargs.get("attention_mask"))
        self._call = _Call(prompt_lengths=prompt_lengths)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._call = _Call()

    def generate(self, *args, prompt_lengths: torch.Tensor | None = None, **kwargs):
        """transformers' generate(); the input given here is the prompt (narrowed by ``prompt_lengths``)."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = _reference(input_ids, kwargs)
        self._call = _Call(prompt_lengths=prompt_lengths, width=reference.shape[1])
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._call = _Call()

    # ------------------------------------------------------------------------------------- PEFT plumbing

    def _check_merge_allowed(self) -> None:
        raise ValueError("PEDRO's scales depend on each prompt, so the adapter cannot be merged into the weights")

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:  # type: ignore[override]
        model = cast(nn.Module, super()._unload_and_optionally_merge(merge=merge, **kwargs))
        self._stack_hook.remove()
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if "pedro_shared_generator" in self._modules and adapter_name in self.pedro_shared_generator:
            del self.pedro_shared_generator[adapter_name]
            self.pedro_state.shared_generators.pop(adapter_name, None)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...pedro_generator.<adapter>.down.weight`` -> ``...pedro_generator.down.weight``: PEFT's default
        only strips the name when it is the second-to-last part, and ours sits deeper (the generator has
        sub-modules), so without this a saved file would carry the adapter's name and load under no other."""
        return re.sub(rf"(pedro_[a-z_]+)\.{re.escape(adapter_name)}(?=\.|$)", r"\1", key, count=1)

    @classmethod
    def _remap_adapter_state_dict_for_load(  # type: ignore[override]
        cls, model: nn.Module, config: PedroConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT loads non-strictly and only warns on missing keys; a PEDRO adapter must match exactly, and a
        mismatch must say which tensor and both shapes instead of failing inside load_state_dict."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = adapter_state_dict(model, adapter_name)
        missing = sorted(set(expected) - set(remapped))
        unexpected = sorted(set(remapped) - set(expected))
        if missing or unexpected:
            layers = [
                sorted({int(n) for k in keys for n in re.findall(r"\.layers\.(\d+)\.", k)})
                for keys in (remapped, expected)
            ]
            if layers[0] != layers[1] and layers[0] and layers[1]:
                raise ValueError(
                    f"the adapter file has tensors for {len(layers[0])} layers ({layers[0][0]}-{layers[0][-1]}) but this "
                    f"backbone has {len(layers[1])} ({layers[1][0]}-{layers[1][-1]}) under this config: the adapter "
                    "was trained for a different backbone (or its config's layers were changed)"
                )
            raise ValueError(
                f"the adapter file does not match this PEDRO config on this backbone: "
                f"{len(missing)} missing tensor(s) (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]})"
            )
        wrong = [
            (k, tuple(v.shape), tuple(expected[k].shape)) for k, v in remapped.items() if v.shape != expected[k].shape
        ]
        if wrong:
            key, got, want = wrong[0]
            raise ValueError(f"{shape_mismatch(key, got, want, config.r)} ({len(wrong)} mismatched tensor(s))")
        return remapped


def shape_mismatch(key: str, got: tuple[int, ...], want: tuple[int, ...], r: int) -> str:
    """The error for an adapter tensor of the wrong shape. Only the sizes that differ tell the cause apart: if
    they are all the config's rank, the config was written for other weights (an edited or mixed-up
    ``adapter_config.json``); otherwise the backbone differs, or the config's other sizes do."""
    differing = {w for g, w in zip(got, want) if g != w} if len(got) == len(want) else set()
    if differing == {r}:
        saved = next(g for g, w in zip(got, want) if g != w)
        return (
            f"adapter tensor {key} has shape {tuple(got)} in the file but {tuple(want)} by its adapter_config.json: "
            f"the weights have r={saved} and the config says r={r}, so the config is not the one they were saved with"
        )
    return (
        f"adapter tensor {key} has shape {tuple(got)} in the file but {tuple(want)} on this backbone; the adapter was "
        "trained for a different backbone, or its adapter_config.json does not describe these weights"
    )
