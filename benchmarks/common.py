"""What more than one benchmark script needs: the repository paths, and one definition of a percentile."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in [0, 100]): the smallest value with at least q % of the values
    at or below it, always one of the measured values; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def use_server_process() -> None:
    """Make tests/server_process.py (a real ``pedro serve`` child process and its HTTP helpers) importable: the
    load benchmark drives the server exactly as the server tests do."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
