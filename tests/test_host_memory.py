"""The CPU engine's allocator policy (pedro.engine.host_memory): freed blocks are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_model

PROBE = textwrap.dedent(
    """
    import resource, sys
    import torch
    from pedro.engine.host_memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else True
    def layer():  # four 20 MB intermediates alive at once, then freed: what each layer of a prefill does
        blocks = [torch.empty(5 * 2**20).fill_(1.0) for _ in range(4)]
        del blocks
    layer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        layer()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)
PAGES_PER_LAYER = 4 * 20 * 2**20 // 4096


def faults(mode: str) -> tuple[bool, int]:
    """Page faults of five rounds of the probe's layer, in a fresh process (the allocator's state is per process)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, count = out.split()
    return applied == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, kept = faults("keep")
    assert applied
    _, default = faults("default")
    # glibc's own policy maps and unmaps these blocks each round: every page is faulted in again
    assert default >= 4 * PAGES_PER_LAYER
    # kept: five rounds cost less than one round's pages
    assert kept < PAGES_PER_LAYER


def test_an_engine_on_the_cpu_sets_the_policy(monkeypatch):
    import pedro.engine.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(1) or True)
    engine_module.Engine(tiny_model("llama"), max_batch=2, max_seq_len=32)
    assert calls
