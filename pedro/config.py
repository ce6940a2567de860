"""PedroConfig: every knob of the method, validated at construction, stored as PEFT's adapter_config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from peft import PeftConfig

PEFT_TYPE = "PEDRO"

TARGETS = ("q", "k", "v", "o", "gate", "up")
POOLERS = ("last", "mean", "max", "attention")
ACTIVATIONS = ("relu", "gelu", "silu", "rational")
POOL_SOURCES = ("normed", "raw")


def _refuse(name: str, allowed: Any, got: Any) -> None:
    raise ValueError(f"PedroConfig.{name} must be {allowed}, got {got!r}")


@dataclass
class PedroConfig(PeftConfig):
    """Configuration of a PEDRO adapter.

    A bad value is refused here, at construction, so a typo never turns into a silently different adapter
    after hours of training. ``target_modules`` is filled in by the tuner from the backbone's layer map and
    is informative only (the module names that were wrapped).
    """

    r: int = field(default=8, metadata={"help": "Bottleneck width of each vector generator (d_model -> r -> D)."})
    pooler: str = field(default="last", metadata={"help": f"How prompt states are pooled: one of {POOLERS}."})
    activation: str = field(default="gelu", metadata={"help": f"Generator non-linearity: one of {ACTIVATIONS}."})
    targets: list[str] = field(
        default_factory=lambda: ["q", "v", "up"],
        metadata={"help": f"Which projections are scaled, a subset of {TARGETS}."},
    )
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Decoder layers to adapt (None: all)."})
    share_generator: bool = field(
        default=False, metadata={"help": "One vector generator shared by all adapted layers instead of one each."}
    )
    pool_source: str = field(
        default="normed",
        metadata={
            "help": "Which states the generator pools: 'normed' (the output of the layer's input norm, what "
            "attention reads) or 'raw' (the un-normalised residual stream entering the layer)."
        },
    )
    generator_bias: bool = field(default=True, metadata={"help": "Biases in the generator's Down/Up projections."})
    normalize_pooled: bool = field(
        default=False, metadata={"help": "Divide the pooled vector by its root mean square before Down."}
    )
    scale_bound: Optional[float] = field(
        default=None,
        metadata={"help": "None, or c > 0: z becomes c * tanh(z / c), so every scale 1 + z stays within c of 1."},
    )
    target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Filled in by the tuner: the module names PEDRO wrapped."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        if str(self.task_type) not in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
            _refuse("task_type", "'CAUSAL_LM' (PEDRO adapts decoder-only causal LMs)", self.task_type)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            _refuse("r", "a positive integer", self.r)
        if self.pooler not in POOLERS:
            _refuse("pooler", f"one of {list(POOLERS)}", self.pooler)
        if self.activation not in ACTIVATIONS:
            _refuse("activation", f"one of {list(ACTIVATIONS)}", self.activation)
        if self.pool_source not in POOL_SOURCES:
            _refuse("pool_source", f"one of {list(POOL_SOURCES)}", self.pool_source)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        targets = list(self.targets or [])
        if not targets or any(t not in TARGETS for t in targets) or len(set(targets)) != len(targets):
            _refuse("targets", f"a non-empty list of distinct names from {list(TARGETS)}", self.targets)
        # canonical order, so the split of the generator's output never depends on how the user listed them
        self.targets = [t for t in TARGETS if t in targets]
        if self.layers is not None:
            layers = list(self.layers)
            if (
                not layers
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
                or len(set(layers)) != len(layers)
            ):
                _refuse(
                    "layers", "None (all layers) or a non-empty list of distinct non-negative integers", self.layers
                )
            self.layers = sorted(layers)
        for flag in ("share_generator", "generator_bias", "normalize_pooled"):
            if not isinstance(getattr(self, flag), bool):
                _refuse(flag, "a bool", getattr(self, flag))
        bound = self.scale_bound
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0
        ):
            _refuse("scale_bound", "None or a finite number > 0", bound)
        if bound is not None:
            self.scale_bound = float(bound)

    def generator_args(self) -> dict[str, Any]:
        """What pedro.generator.VectorGenerator takes from this config besides d_model and its output width."""
        return dict(
            r=self.r,
            pooler=self.pooler,
            activation=self.activation,
            bias=self.generator_bias,
            normalize=self.normalize_pooled,
            scale_bound=self.scale_bound,
        )

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Refuse unknown fields in a saved config instead of PEFT's default of warning and dropping them:
        an adapter trained with a knob this version does not know would otherwise load as a different adapter."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"adapter_config.json has field(s) {unknown} that PedroConfig does not know; "
                f"known fields: {sorted(known)}"
            )
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load the config, and check the weights file next to it before anyone builds a model from it."""
        from pedro.io import AdapterFileError, check_adapter_dir

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = (
            pretrained_model_name_or_path if subfolder is None else f"{pretrained_model_name_or_path}/{subfolder}"
        )
        try:
            check_adapter_dir(directory)
        except AdapterFileError as err:
            raise AdapterFileError(f"{directory}: {err}") from err
        return config
