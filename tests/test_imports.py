"""The package root is light: serving code never loads the training stack, and the public names still resolve."""

import subprocess
import sys

import pytest

import pedro


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_importing_the_engine_loads_neither_trainer_nor_datasets():
    loaded = _run(
        "import sys, pedro.engine, pedro.server.app; "
        "print(sorted(m for m in ('transformers.trainer', 'datasets', 'pedro.train', 'pedro.evaluate') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_importing_pedro_registers_the_peft_method():
    assert _run("import pedro, peft; print(peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING['PEDRO'].__name__)") == "PedroModel"


def test_train_and_evaluate_stay_functions_after_their_submodules_are_imported():
    code = (
        "import pedro, pedro.train, pedro.evaluate; from pedro.train import TrainConfig; import pedro.demo; "
        "from pedro import train, evaluate; "
        "print(callable(pedro.train) and pedro.train is train and train.__module__ == 'pedro.train', "
        "pedro.evaluate is evaluate and evaluate.__module__ == 'pedro.evaluate')"
    )
    assert _run(code) == "True True"


def test_every_public_name_resolves():
    for name in pedro.__all__:
        assert getattr(pedro, name) is not None
    assert set(pedro.__all__) <= set(dir(pedro))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        pedro.no_such_name  # noqa: B018
