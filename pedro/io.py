"""Adapter files: checks before they are trusted, the prompt format recorded with the weights, and writing an
adapter directory atomically."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection, Optional

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pedro.data import umask_mode

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


# How training encoded prompts, kept in the weights file's safetensors metadata so that it travels with the two
# files PEFT saves (an upload, a copy) and serving can encode a prompt exactly as training did.
PROMPT_FORMAT_KEY = "pedro.prompt_format"
PROMPT_FORMATS = ("chat_template", "raw")


class AdapterFileError(ValueError):
    """An adapter directory whose files are missing, corrupt, or in a format we refuse to load."""


def check_adapter_dir(path: str | Path) -> None:
    """Validate a local adapter directory's weights file, when it has one (a config-only directory is fine).

    Reading every tensor catches a truncated file here, with the file named, instead of deep in PEFT.
    Pickle checkpoints are refused: loading one can run arbitrary code. The messages name the files, not
    ``path``: the caller adds it where it may be shown (a server's staging directory is not).
    """
    directory = Path(path)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        if pickled:
            raise AdapterFileError(
                f"the adapter holds {pickled} but no {WEIGHTS_NAME}: pickle checkpoints are not loaded "
                "(they can run arbitrary code); convert them to safetensors"
            )
        return
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{WEIGHTS_NAME} is not a valid safetensors file (corrupt or truncated): {err}") from err


def local_adapter(path: str | Path) -> Path:
    """``path`` as a local adapter folder (one with an ``adapter_config.json``), refused at once otherwise: PEFT
    would take any other string for a Hub repository id and retry the network before failing."""
    directory = Path(path).expanduser()
    if not (directory / "adapter_config.json").is_file():
        what = (
            "has no adapter_config.json"
            if directory.is_dir()
            else "is a file, not a folder (give the folder that holds adapter_config.json)"
            if directory.exists()
            else "does not exist"
        )
        raise FileNotFoundError(
            f"adapter {str(path)!r} {what}: give a folder that pedro train or save_pretrained wrote"
        )
    try:
        json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{directory / 'adapter_config.json'} is not valid JSON: {err}") from None
    return directory


def record_prompt_format(directory: str | Path, prompt_format: str) -> None:
    """Write ``prompt_format`` (one of PROMPT_FORMATS) into the metadata of ``directory``'s weights file."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    weights = Path(directory) / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_file(load_file(str(weights)), str(weights), metadata={**metadata, PROMPT_FORMAT_KEY: prompt_format})


def read_prompt_format(directory: str | Path) -> Optional[str]:
    """The prompt format recorded with ``directory``'s weights, or None (an adapter not trained by pedro)."""
    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as handle:
        value = (handle.metadata() or {}).get(PROMPT_FORMAT_KEY)
    if value is not None and value not in PROMPT_FORMATS:
        raise AdapterFileError(f"{PROMPT_FORMAT_KEY} is {value!r}; expected one of {PROMPT_FORMATS}")
    return value


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories ``a`` and ``b`` in one atomic step where the kernel offers it (Linux renameat2); False
    where it does not, and the caller renames in two steps."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100  # AT_FDCWD
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(a))


def _link_or_copy(source: Any, target: Any) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def evaluations_in(directory: str | Path) -> list[str]:
    """The files ``pedro eval`` wrote into an adapter directory: its ``eval_*.json`` results and the predictions
    each names beside it. They score the weights that were there, so a new adapter must not inherit them."""
    found: list[str] = []
    for result in sorted(Path(directory).glob("eval_*.json")):
        try:
            record = json.loads(result.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(record, dict) or not {"task", "split", "metric", "predictions"} <= record.keys():
            continue  # not one of ours: a user's own file stays
        found.append(result.name)
        predictions = Path(str(record["predictions"]))
        if predictions.name.startswith("eval_") and (Path(directory) / predictions.name).is_file():
            found.append(predictions.name)
    return found


def save_adapter_atomic(
    model: Any,
    output_dir: str | Path,
    backbone: Optional[str] = None,
    prompts: Optional[str] = None,
    drop: Collection[str] = (),
) -> None:
    """``model.save_pretrained(output_dir)``, replacing the directory as a whole: a reader, or a crash at any
    moment, sees the old adapter or the new one, never a new config beside old weights.

    The adapter is written to a temporary directory beside ``output_dir``, which also receives hard links to
    everything else ``output_dir`` holds (training logs, checkpoints); then the two directories are swapped
    (one atomic exchange on Linux, two renames elsewhere) and the old one deleted. ``backbone`` is recorded as
    the config's base model, so ``pedro eval --adapter DIR`` can load it; ``prompts`` (one of PROMPT_FORMATS)
    with the weights, so serving encodes prompts as training did. Top-level entries named in ``drop`` are not
    carried over (they go with the old adapter, in the same exchange).
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.new-", dir=output_dir.parent))
    if backbone is not None:
        model.peft_config[model.active_adapter].base_model_name_or_path = backbone
    try:
        model.save_pretrained(staging, save_embedding_layers=False)  # PEFT would look the backbone up online
        if prompts is not None:
            record_prompt_format(staging, prompts)
        for made in [staging, *staging.rglob("*")]:  # mkdtemp's folder is private (0700): as mkdir makes it
            umask_mode(made)
        if not output_dir.exists():
            os.rename(staging, output_dir)
            return
        written = {item.name for item in staging.iterdir()}
        for item in output_dir.iterdir():
            if item.name not in written and item.name not in drop:
                _link_tree_item(item, staging / item.name)
        if not _exchange(staging, output_dir):
            aside = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rename(output_dir, aside / output_dir.name)
            os.rename(staging, output_dir)
            staging = aside
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_tree_item(source: Path, target: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)
