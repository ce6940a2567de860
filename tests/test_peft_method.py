import pytest
from peft import mapping

import pedro
from pedro.config import PEFT_TYPE
from pedro.peft_method import register_peft_method


def test_pedro_is_registered_in_peft():
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] is pedro.PedroConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is pedro.PedroModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] == "pedro_"
    register_peft_method()  # idempotent
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is pedro.PedroModel


def test_changed_peft_internals_fail_loudly(monkeypatch):
    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_TUNER_MAPPING")
    with pytest.raises(ImportError, match="PEFT_TYPE_TO_TUNER_MAPPING.*peft>=0.21,<0.22"):
        register_peft_method()


def test_a_foreign_registration_is_not_overwritten(monkeypatch):
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE, dict)
    with pytest.raises(ImportError, match="already taken"):
        register_peft_method()
