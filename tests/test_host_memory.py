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
    import ctypes, resource, sys
    import torch
    from pedro.engine.host_memory import M_MMAP_THRESHOLD, keep_freed_memory
    if sys.argv[1] == "keep":
        applied = keep_freed_memory()
    else:  # the control: glibc's starting threshold, held fixed, maps every such block afresh
        applied = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1
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
    # the control shows the probe counts what it should: blocks mapped per use fault every page each round
    # (glibc's own default varies between these two, with where its heap's top happens to be)
    control_applied, mapped = faults("map")
    assert control_applied and mapped >= 4 * PAGES_PER_LAYER
    # kept: five rounds cost less than one round's pages
    assert kept < PAGES_PER_LAYER


def test_an_engine_on_the_cpu_sets_the_policy(monkeypatch):
    import pedro.engine.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(1) or True)
    engine_module.Engine(tiny_model("llama"), max_batch=2, max_seq_len=32)
    assert calls
