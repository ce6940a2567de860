"""pedro-peft: PEDRO (prompt-dependent representation modification) as a PEFT method."""

from __future__ import annotations

import warnings

import peft
from torch import nn

from pedro.backbones import BACKBONES, DEFAULT_BACKBONE, format_prompt, load_backbone
from pedro.config import PedroConfig
from pedro.io import AdapterFileError
from pedro.model import PedroModel, count_trainable_parameters
from pedro.registry import register
from pedro.evaluate import evaluate
from pedro.train import TrainConfig, train

register()
# peft 0.21 calls a transformers 5 API that transformers marks deprecated; it is noise for our users
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"


def get_pedro_model(model: nn.Module, config: PedroConfig | None = None, **config_kwargs) -> peft.PeftModel:
    """``peft.get_peft_model(model, PedroConfig(**config_kwargs))`` in one call."""
    return peft.get_peft_model(model, config if config is not None else PedroConfig(**config_kwargs))


__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "AdapterFileError",
    "PedroConfig",
    "PedroModel",
    "TrainConfig",
    "count_trainable_parameters",
    "evaluate",
    "format_prompt",
    "get_pedro_model",
    "load_backbone",
    "train",
]
