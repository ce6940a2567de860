"""Trainable-parameter budgets: closed-form counts per method, baselines sized to PEDRO's budget
(``--match-params``, the only fair comparison), and the side-by-side size table ``pedro train`` prints."""

from __future__ import annotations

import itertools
from dataclasses import asdict, fields
from typing import Any, Sequence

from torch import nn

from pedro.backbones import layer_map
from pedro.model import count_trainable_parameters
from pedro.train_config import IA3_FEEDFORWARD, METHODS, TrainConfig, _pedro_config


def _linear_shapes(model: nn.Module, suffix: str) -> list[tuple[int, int]]:
    shapes = [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.endswith(f".{suffix}") and ".layers." in f".{name}"
    ]
    if not shapes:
        raise ValueError(f"no linear module named *.{suffix} in the decoder layers of {type(model).__name__}")
    return shapes


def lora_parameter_count(model: nn.Module, targets: Sequence[str], r: int) -> int:
    """Closed form: r * (in + out) per adapted linear module."""
    return sum(
        r * (i + o) for suffix in layer_map(model).module_names(targets) for i, o in _linear_shapes(model, suffix)
    )


def ia3_parameter_count(model: nn.Module, targets: Sequence[str]) -> int:
    """Closed form: one scale per output feature (per input feature for the feed-forward down-projection)."""
    total = 0
    for target, suffix in zip(targets, layer_map(model).module_names(targets)):
        total += sum(i if target in IA3_FEEDFORWARD else o for i, o in _linear_shapes(model, suffix))
    return total


def match_sizes(cfg: TrainConfig, model: nn.Module) -> tuple[TrainConfig, int]:
    """The config with this method's size chosen so its trainable count is as close as possible to the
    budget (``match_params``: "pedro" = PEDRO's count under the same config, or a number), and the budget.

    LoRA and PEDRO scale linearly in their rank; (IA)3 has no size knob, so the closest subset of
    {q, k, v, o, gate, up, down} is taken (it cannot reach budgets above all seven modules' widths).
    """
    if cfg.match_params is None:
        raise ValueError("match_sizes needs cfg.match_params")
    if str(cfg.match_params) == "pedro":
        budget = count_trainable_parameters(_pedro_config(cfg), model)
    else:
        budget = int(cfg.match_params)
    if budget < 1:
        raise ValueError(f"match_params must be positive, got {cfg.match_params!r}")
    changes: dict[str, Any]
    if cfg.method == "pedro":
        one, two = (count_trainable_parameters(_pedro_config(cfg, r), model) for r in (1, 2))
        changes = {"r": max(1, round(1 + (budget - one) / (two - one)))}
    elif cfg.method == "lora":
        per_rank = lora_parameter_count(model, cfg.lora_targets, 1)
        changes = {"lora_r": max(1, round(budget / per_rank))}
    else:
        names = ("q", "k", "v", "o", "gate", "up", "down")
        subsets = (s for n in range(1, len(names) + 1) for s in itertools.combinations(names, n))
        changes = {"ia3_targets": min(subsets, key=lambda s: (abs(ia3_parameter_count(model, s) - budget), len(s)))}
    fields_ = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    return TrainConfig(**{**fields_, **changes, "match_params": None}), budget


def expected_parameter_count(cfg: TrainConfig, model: nn.Module) -> int:
    """Closed-form trainable parameters of ``cfg``'s method on ``model``."""
    if cfg.method == "pedro":
        return count_trainable_parameters(_pedro_config(cfg), model)
    if cfg.method == "lora":
        return lora_parameter_count(model, cfg.lora_targets, cfg.lora_r)
    return ia3_parameter_count(model, cfg.ia3_targets)


def size_report(model: nn.Module, cfg: TrainConfig, budget: int | None = None) -> list[dict[str, Any]]:
    """``cfg``'s method as configured, and the other two of PEDRO, LoRA (this config's targets) and (IA)3 sized
    to ``budget`` (default: ``cfg``'s own count), with each count relative to it: the side-by-side counts
    ``--match-params`` prints."""
    budget = budget or expected_parameter_count(cfg, model)
    rows = []
    for method in METHODS:
        other = TrainConfig(
            **{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "method": method, "bilevel": False}
        )
        if method != cfg.method:
            other, _ = match_sizes(TrainConfig(**{**asdict(other), "match_params": str(budget)}), model)
        count = expected_parameter_count(other, model)
        size = {
            "pedro": f"r={other.r}",
            "lora": f"r={other.lora_r} on {','.join(other.lora_targets)}",
            "ia3": f"on {','.join(other.ia3_targets)}",
        }[method]
        rows.append({"method": method, "size": size, "trainable": count, "vs_budget": count / budget - 1})
    return rows


def print_sizes(rows: list[dict[str, Any]], method: str, budget: int | None = None) -> None:
    """The trained adapter's size; with ``--match-params`` (``budget``), the three methods sized to it."""
    from rich.console import Console
    from rich.table import Table

    if budget is None:
        row = next(r for r in rows if r["method"] == method)
        Console().print(f"trainable parameters: {row['trainable']:,} ({method} {row['size']})")
        return
    table = Table(title=f"trainable parameters at this budget (--match-params: {budget:,})")
    for column in ("method", "size", "trainable", "vs budget"):
        table.add_column(column)
    for row in rows:
        mark = " (training)" if row["method"] == method else ""
        table.add_row(row["method"] + mark, row["size"], f"{row['trainable']:,}", f"{100 * row['vs_budget']:+.1f}%")
    Console().print(table)
