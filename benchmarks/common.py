"""What more than one benchmark script needs: the repository's path, where a report goes by default, one
definition of a percentile, the order of a lockstep's steps, and how a report is written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]


def default_out(name: str, preset: str | None = None, recorded: str | None = None) -> Path:
    """Where benchmark ``name`` writes when no ``--out`` is given: results/<name> under the current directory, so
    a run from the repository's root regenerates the results on record and a run anywhere else leaves the
    checkout alone. A ``preset`` other than ``recorded`` (the one the results on record were made with: a smoke
    or CI form, a subset of the sweep) writes results/<name>-<preset>, so a quick check never overwrites them."""
    return Path("results") / (name if preset == recorded else f"{name}-{preset}")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in [0, 100]): the smallest value with at least q % of the values
    at or below it, always one of the measured values; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def lockstep_turns(names: list[str], unfinished: Callable[[str], bool], first: int = 0) -> Iterator[str]:
    """Whose step is next when several engines generate step for step: rounds over ``names``, each round starting
    one further along than the last (the first with ``names[first]``), skipping those no longer ``unfinished``,
    until none is. Rotating the order spreads whatever stepping first or last in a round costs over all."""
    turn = first
    while any(unfinished(name) for name in names):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            if unfinished(name):
                yield name
        turn += 1


def use_server_process() -> None:
    """Make tests/server_process.py (a real ``pedro serve`` child process and its HTTP helpers) importable: the
    load benchmark drives the server exactly as the server tests do."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))


def write_report(
    out: Path, result: dict[str, Any], markdown: str, plot: Callable[[dict[str, Any], Path], None] | None = None
) -> None:
    """``out``.json (the result), ``out``.md (``markdown``, also printed) and, given a plot, ``out``.png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown)
    if plot is not None:
        plot(result, out.with_suffix(".png"))
    print(markdown)
