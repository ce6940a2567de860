"""Registers PEDRO as a PEFT method.

peft 0.21's ``register_peft_method`` refuses any name missing from its fixed ``PeftType`` enum, so we fill the
type -> config / tuner / prefix mappings ourselves. Those dicts are PEFT internals: if a PEFT release renames or
drops them, importing pedro fails here, loudly, instead of producing a model that silently ignores the adapter.
"""

from __future__ import annotations

import peft
from peft import mapping

from pedro.config import PEFT_TYPE, PedroConfig
from pedro.model import PedroModel

TESTED_PEFT = ">=0.21,<0.22"
_MAPPINGS = {
    "PEFT_TYPE_TO_CONFIG_MAPPING": PedroConfig,
    "PEFT_TYPE_TO_TUNER_MAPPING": PedroModel,
    "PEFT_TYPE_TO_PREFIX_MAPPING": PedroModel.prefix,
}


def register_peft_method() -> None:
    """Idempotent; raises ImportError when PEFT's internals are not what this version was tested with."""
    for name, value in _MAPPINGS.items():
        table = getattr(mapping, name, None)
        if not isinstance(table, dict):
            raise ImportError(
                f"peft {peft.__version__} has no dict peft.mapping.{name}; pedro-peft registers itself there and "
                f"is tested with peft{TESTED_PEFT}. Install a tested version: pip install 'peft{TESTED_PEFT}'"
            )
        current = table.get(PEFT_TYPE)
        if current is not None and current != value:
            raise ImportError(f"peft.mapping.{name}[{PEFT_TYPE!r}] is already taken by {current!r}")
        table[PEFT_TYPE] = value
