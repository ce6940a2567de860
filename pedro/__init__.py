"""pedro-peft: PEDRO (prompt-dependent representation modification) as a PEFT method.

Importing the package registers PEDRO with PEFT and nothing more: the public names below are resolved on first
use (PEP 562), so ``import pedro.engine`` (a server, every Ray replica) never loads the training stack
(transformers' Trainer, ``datasets``) that ``pedro.train`` and ``pedro.evaluate`` need.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

from pedro.peft_method import register_peft_method

if TYPE_CHECKING:
    import peft
    from torch import nn

    from pedro.backbones import BACKBONES, DEFAULT_BACKBONE, format_prompt, load_backbone
    from pedro.config import PedroConfig
    from pedro.evaluate import evaluate
    from pedro.io import AdapterFileError
    from pedro.model import PedroModel, count_trainable_parameters
    from pedro.train import TrainConfig, train

register_peft_method()
# peft 0.21 calls a transformers 5 API that transformers marks deprecated; it is noise for our users
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "BACKBONES": "pedro.backbones",
    "DEFAULT_BACKBONE": "pedro.backbones",
    "format_prompt": "pedro.backbones",
    "load_backbone": "pedro.backbones",
    "PedroConfig": "pedro.config",
    "AdapterFileError": "pedro.io",
    "PedroModel": "pedro.model",
    "count_trainable_parameters": "pedro.model",
    "evaluate": "pedro.evaluate",
    "TrainConfig": "pedro.train",
    "train": "pedro.train",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pedro' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``pedro.train`` and ``pedro.evaluate`` are functions and also the submodules that define them. Importing a
    submodule binds it as an attribute of its package, which would hide the function (``pedro.train(...)`` would
    then call a module); the package keeps the function and the submodule stays reachable in ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and _LAZY.get(name) == value.__name__
        ):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def get_pedro_model(model: nn.Module, config: PedroConfig | None = None, **config_kwargs: Any) -> peft.PeftModel:
    """``peft.get_peft_model(model, PedroConfig(**config_kwargs))`` in one call."""
    import peft

    from pedro.config import PedroConfig

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
