"""The engine is device-generic: an explicit device runs the same code and tokens as the default, all of its
state lives on the model's device, and a step's forward never waits for the device nor does host work per
layer (checked on the meta device, where any host read of a device value raises)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import test_engine
import torch
from conftest import tiny_model
from test_engine import greedy, make_adapter, prompt, reference
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pedro.engine import Engine, Request
from pedro.engine import runner as runner_module
from pedro.engine.runner import PrefillBatch
from pedro.generator import HeadStack

KINDS = ["p-last", "p-attn", "lora-qv", "ia3"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-adapters")
    return {name: make_adapter(root, name, seed=i) for i, name in enumerate(KINDS)}


def _state_tensors(engine: Engine) -> dict[str, torch.Tensor]:
    tensors = {"cache.k": engine.cache.k, "cache.v": engine.cache.v, "lora_index": engine.rows.lora_index}
    tensors.update({f"scales{point}": t for point, t in engine.rows.scales.items()})
    tensors.update({f"lora_a.{m}": t for m, t in engine.rows.lora_a.items()})
    tensors.update({f"lora_b.{m}": t for m, t in engine.rows.lora_b.items()})
    for entry in engine.adapters.resident.values():
        weights = entry.weights
        for layer, generator in getattr(weights, "generators", {}).items():
            tensors.update({f"{entry.name}.{layer}.{n}": p for n, p in generator.named_parameters()})
        tensors.update({f"{entry.name}.{key}": v for key, v in getattr(weights, "vectors", {}).items()})
    return tensors


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_explicit_device_runs_the_same_tokens_with_every_tensor_there(kinds, device):
    engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=64, max_prefill_tokens=40, device=device)
    assert engine.device == torch.device("cpu")
    assert not any(engine.runner.fused)  # the CPU runs one GEMM per module
    for name, path in kinds.items():
        engine.add_adapter(name, path)
    plan = [("p-last", 9), ("lora-qv", 13), (None, 6), ("p-attn", 11), ("ia3", 7)]
    requests = [Request(prompt(50 + i, n), adapter=a, sampling=greedy()) for i, (a, n) in enumerate(plan)]
    for r, out in zip(requests, engine.generate(requests)):
        assert out.token_ids == reference("llama", kinds.get(r.adapter), r.prompt), r.adapter
    state = _state_tensors(engine)
    assert {"cache.k", "lora_a.q", "scales('out', 'up')"} <= set(state) and any(".0.down.weight" in k for k in state)
    assert all(t.device == torch.device("cpu") for t in state.values()), [
        k for k, t in state.items() if t.device.type != "cpu"
    ]
    assert all(seq.generator.device == engine.device for seq in engine._seqs.values())


def as_on_an_accelerator(engine: Engine) -> list[int]:
    """Switch a CPU engine's runner (made with ``fuse_projections=True``) to an accelerator's launch-bound forms
    -> a list that grows by one per fused q/k/v or gate/up GEMM run."""
    runner = engine.runner
    assert not runner.launch_bound and all(runner.fused)
    runner.launch_bound = True
    calls: list[int] = []
    for groups in runner.fused:
        for key, fused in groups.items():
            groups[key] = dataclasses.replace(fused, gemm=lambda x, gemm=fused.gemm: calls.append(1) or gemm(x))
    return calls


def test_an_accelerators_prefill_gives_the_same_tokens(kinds, tmp_path, monkeypatch):
    """An accelerator's prefill gathers each token's per-row scales (one op per point, not one per prompt), runs
    LoRA per token (BGMV), not per adapter, and q/k/v and gate/up as one GEMM each (the PEDRO heads of several
    tenants run as one batched product on any device); every request still gets its own PEFT model's tokens."""
    engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=64, max_prefill_tokens=64, fuse_projections=True)
    fused = as_on_an_accelerator(engine)
    kinds = {
        **kinds,
        "p-last-2": make_adapter(tmp_path, "p-last", seed=9),
        "ia3-up-in": make_adapter(tmp_path, "ia3-up-in"),
    }
    for name, path in kinds.items():
        engine.add_adapter(name, path)
    plan = [("p-last", 9), ("p-last-2", 13), ("lora-qv", 6), (None, 11), ("p-last-2", 7), ("ia3", 5), ("lora-qv", 8)]
    plan += [("ia3-up-in", 6), ("p-last", 4)]  # gate and up apart while its row runs, fused again after
    requests = [Request(prompt(80 + i, n), adapter=a, sampling=greedy()) for i, (a, n) in enumerate(plan)]
    stacked: list[int] = []  # the number of rows of each stack of heads a prefill made
    original = HeadStack.stack
    monkeypatch.setattr(
        HeadStack, "stack", classmethod(lambda cls, heads: stacked.append(len(heads)) or original(heads))
    )
    monkeypatch.setattr(engine.rows, "lora_delta_grouped", None)  # LoRA prompts take the per-token form
    for name in kinds:  # loaded up front, so the first step admits both PEDRO tenants whatever the loader's pace
        engine.adapters.stage(name, engine.adapters.load(name))
    for r, out in zip(requests, engine.generate(requests)):
        assert out.token_ids == reference("llama", kinds.get(r.adapter), r.prompt), r.adapter
    assert stacked  # the two last-token PEDRO tenants' heads ran stacked
    assert fused


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_an_accelerators_padded_prefill_gives_the_same_tokens(family, tmp_path, monkeypatch):
    """An accelerator prefills whole prompts of different lengths as one padded batch (one attention call and
    one cache write per layer): each query sees only its own prompt's keys, causally, and on Gemma 3's sliding
    layers only those within the window (16 here; prompts up to 40 tokens) -- unless padding would more than
    double the tokens."""
    engine = Engine(
        test_engine.backbone(family), max_batch=4, max_seq_len=64, max_prefill_tokens=128, fuse_projections=True
    )
    fused = as_on_an_accelerator(engine)
    path = make_adapter(tmp_path, "p-last", family, seed=3)
    engine.add_adapter("p", path)
    engine.adapters.stage("p", engine.adapters.load("p"))
    padded = []
    original = engine.runner._attend_padded
    monkeypatch.setattr(engine.runner, "_attend_padded", lambda *a: padded.append(1) or original(*a))
    plan = [(None, 30), ("p", 9), (None, 21), ("p", 40)]
    requests = [Request(prompt(90 + i, n), adapter=a, sampling=greedy()) for i, (a, n) in enumerate(plan)]
    for r, out in zip(requests, engine.generate(requests)):
        assert out.token_ids == reference(family, path if r.adapter else None, r.prompt), r.adapter
    assert padded
    padded.clear()  # one long prompt among short ones: padding would more than double the tokens, so per prompt
    plan = [("p", 40), (None, 3), ("p", 4), (None, 3)]
    requests = [Request(prompt(95 + i, n), adapter=a, sampling=greedy()) for i, (a, n) in enumerate(plan)]
    for r, out in zip(requests, engine.generate(requests)):
        assert out.token_ids == reference(family, path if r.adapter else None, r.prompt), r.adapter
    assert not padded and fused


def test_a_prefill_too_large_for_per_token_lora_groups_by_adapter(kinds, monkeypatch):
    monkeypatch.setattr(runner_module, "LORA_GATHER_BYTES", 0)
    engine = Engine(tiny_model("llama"), max_batch=4, max_seq_len=64)
    engine.runner.launch_bound = True
    engine.add_adapter("lora-qv", kinds["lora-qv"])
    grouped = []
    original = engine.rows.lora_delta_grouped
    monkeypatch.setattr(engine.rows, "lora_delta_grouped", lambda *a: grouped.append(1) or original(*a))
    request = Request(prompt(7, 12), adapter="lora-qv", sampling=greedy())
    assert engine.generate([request])[0].token_ids == reference("llama", kinds["lora-qv"], request.prompt)
    assert grouped


def test_a_model_elsewhere_than_the_device_asked_for_is_refused():
    with pytest.raises(ValueError, match="move the model first"):
        Engine(tiny_model("llama"), device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "device, said", [("cuda", "use device cpu"), ("cuda:1", "use device cpu"), ("gpu", "not a device name")]
)
def test_a_device_this_machine_lacks_is_named_plainly(device, said):
    with pytest.raises(ValueError, match=said):
        Engine(tiny_model("llama"), device=device)


UPLOADS = {torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class _HostWork(TorchDispatchMode):
    """Records every op that makes a host tensor or copies one to the device, and fails any other op that hands
    a host tensor (other than a 0-d scalar) to an op on the device: on a GPU that is an implicit, synchronous
    copy."""

    def __init__(self) -> None:
        super().__init__()
        self.host_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs + outputs if t.device.type == "meta"]
        if func in UPLOADS:
            if any(t.device.type == "cpu" for t in inputs):
                self.host_ops.append(str(func))
        elif on_device:
            strays = [t for t in inputs if t.device.type == "cpu" and t.dim() > 0]
            assert not strays, f"{func} mixes host tensors {[tuple(t.shape) for t in strays]} into a device op"
        elif any(t.device.type == "cpu" for t in outputs):
            self.host_ops.append(str(func))
        return out


def _meta_steps(layers: int, root, monkeypatch) -> tuple[list[str], list[str]]:
    """One prefill of four rows (two PEDRO adapters, LoRA, (IA)3) and one decode step on the meta device of a
    ``layers``-layer model -> the host ops of each."""
    with monkeypatch.context() as patch:
        patch.setattr(test_engine, "backbone", lambda family: tiny_model(family, num_hidden_layers=layers))
        kinds = {name: make_adapter(root, name, seed=layers) for name in KINDS}
    # VectorGenerator turns autocast off around its forward; autocast has no meta device type
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    engine = Engine(tiny_model("llama", num_hidden_layers=layers).to("meta"), max_batch=4, max_seq_len=64)
    assert engine.device.type == "meta"
    for name, path in kinds.items():
        engine.add_adapter(name, path)
    for slot, name in enumerate(kinds):
        engine.adapters.stage(name, engine.adapters.load(name))
        engine.rows.assign(slot, engine.adapters.acquire(name))
    assert all(t.device.type == "meta" for t in _state_tensors(engine).values())
    prompts = [prompt(i, 5 + 3 * i) for i in range(4)]
    with _HostWork() as prefill_work:
        engine.runner.prefill(PrefillBatch([0, 1, 2, 3], prompts))
    with _HostWork() as decode_work:
        engine.runner.decode(torch.zeros(4, dtype=torch.long, device="meta"))
    return prefill_work.host_ops, decode_work.host_ops


def test_steps_on_another_device_do_no_host_work_per_layer(tmp_path, monkeypatch):
    """On the meta device nothing can be read back, so a forward that waited for a device value (``.item()``,
    ``.tolist()``, a data-dependent shape) would raise; the host work a step does (its input lists made into
    tensors for upload) is the same for 3 layers as for 6."""
    few = _meta_steps(3, tmp_path, monkeypatch)
    many = _meta_steps(6, tmp_path, monkeypatch)
    assert few == many
    assert len(many[1]) <= 8, many[1]  # the lengths: a max for the width, one upload, one increment
