"""Small adapter effects survive bf16: a scale 1 + z with |z| around 1e-3 changes a bf16 projection output by what
fp32 says it should, to within the rounding of the bf16 output itself (half an ulp), in the PEFT model and in the
engine (PEDRO and (IA)3 rows beside a bare row). Rounding 1 + z to bf16 instead (steps of 2^-7 above 1) turns
z = 0.003 into 0 and z = 0.006 into 0.0078, an error of up to a whole ulp on every element."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_model

import pedro
from pedro.engine import Engine, Request, SamplingParams
from pedro.engine import runner as engine_runner
from pedro.layer import PedroLinear


def small_z(width: int) -> torch.Tensor:
    """A fixed z per width: magnitudes log-uniform in [5e-4, 6e-3], random signs."""
    g = torch.Generator().manual_seed(width)
    magnitude = 10 ** torch.empty(width).uniform_(-3.3, -2.2, generator=g)
    return magnitude * torch.where(torch.rand(width, generator=g) < 0.5, -1.0, 1.0)


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype``'s grid at |x| (float64)."""
    _, exponent = torch.frexp(x.double().abs())  # |x| = m * 2^exponent, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1) * torch.finfo(dtype).eps / 2


def assert_correctly_rounded(before: torch.Tensor, after: torch.Tensor, z: torch.Tensor, what: str) -> None:
    """``after`` is before * (1 + z) rounded once to bf16 (z itself held in bf16: relative error 2^-9 of z)."""
    exact = before.double() * (1 + z.double())
    tolerance = half_ulp(after, after.dtype) + before.double().abs() * z.double().abs() * 2.0**-8
    error = (after.double() - exact).abs()
    worst = (error / tolerance).max().item()
    assert worst <= 1, f"{what}: the bf16 effect misses before * z by {worst:.2f}x half an ulp"
    bare = (z == 0).expand_as(after)
    assert torch.equal(after[bare], before[bare]), f"{what}: a row without an adapter changed"


def _pedro_with_small_z(model: torch.nn.Module) -> peft.PeftModel:
    """A PEDRO adapter whose z is small_z(width) for each target whatever the prompt: Up's weight 0, bias z."""
    config = pedro.PedroConfig(r=4, targets=["q", "v", "up"])
    peft_model = pedro.get_pedro_model(model, config)
    sites = pedro.model.plan_sites(config, peft_model.base_model.model)
    widths = [
        site.end - site.start
        for name, site in sorted(sites.items(), key=lambda kv: (kv[1].layer, kv[1].start))
        if site.kind == "proj" and site.layer == 0
    ]
    bias = torch.cat([small_z(w) for w in widths])
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "pedro_generator" in name:
                if ".up.bias" in name:
                    param.copy_(bias)
                elif ".up.weight" in name:
                    param.zero_()
                else:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


def _ia3_with_small_z(model: torch.nn.Module) -> peft.PeftModel:
    """(IA)3 on q, v (outputs) and down (input), with l = 1 + small_z(width)."""
    config = peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_((1 + small_z(param.numel())).reshape(param.shape))
    return peft_model


def _record_pedro_linears(peft_model: peft.PeftModel, ids: torch.Tensor) -> dict[str, tuple]:
    """name -> (projection output without the scale, with it, z broadcast to it) of every PedroLinear."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in peft_model.named_modules():
        if isinstance(module, PedroLinear):
            hooks.append(
                module.base_layer.register_forward_hook(lambda m, a, out, n=name: seen.setdefault(n, []).append(out))
            )
            hooks.append(module.register_forward_hook(lambda m, a, out, n=name: seen[n].append(out)))
    with torch.inference_mode():
        peft_model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return {name: (before, after, small_z(after.shape[-1])) for name, (before, after) in seen.items()}


def test_small_pedro_scales_in_the_bf16_peft_model_match_fp32(tmp_path):
    _pedro_with_small_z(tiny_model("llama")).save_pretrained(str(tmp_path / "p"))
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 90, 44, 7, 23]])
    records = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = peft.PeftModel.from_pretrained(tiny_model("llama").to(dtype), str(tmp_path / "p"))
        records[dtype] = _record_pedro_linears(model, ids)
    assert len(records[torch.bfloat16]) == 9  # q, v, up in 3 layers
    for name, (before, after, z) in records[torch.bfloat16].items():
        assert after.dtype is torch.bfloat16
        assert_correctly_rounded(before, after, z, name)
        # ... and the bf16 effect is the fp32 model's effect, up to that rounding and the difference between the
        # two models' unscaled outputs (times z)
        before32, after32, _ = records[torch.float32][name]
        effect16 = after.double() - before.double()
        effect32 = after32.double() - before32.double()
        tolerance = (
            half_ulp(after, torch.bfloat16)
            + before.double().abs() * z.abs() * 2.0**-8
            + (before.double() - before32.double()).abs() * z.abs()
            + after32.double().abs() * 2.0**-22
        )
        worst = ((effect16 - effect32).abs() / tolerance).max().item()
        assert worst <= 1, f"{name}: bf16 effect vs fp32 effect off by {worst:.2f}x the tolerance"


def test_small_pedro_and_ia3_scales_in_the_bf16_engine_are_exact(tmp_path, monkeypatch):
    _pedro_with_small_z(tiny_model("llama")).save_pretrained(str(tmp_path / "p"))
    _ia3_with_small_z(tiny_model("llama")).save_pretrained(str(tmp_path / "i"))
    points = {"p": {("out", "q"), ("out", "v"), ("out", "up")}, "i": {("out", "q"), ("out", "v"), ("in", "down")}}
    records = []
    scale = engine_runner._Context.scale

    def recording(ctx, layer, point, x, out=None):
        before = x.clone()
        scale(ctx, layer, point, x, out)
        adapters = [getattr(ctx.rows.row_entry[int(s)], "name", None) for s in ctx.token_slots]
        records.append((layer, point, before, (x if out is None else out).clone(), adapters))

    monkeypatch.setattr(engine_runner._Context, "scale", recording)
    engine = Engine(tiny_model("llama").to(torch.bfloat16), max_batch=4, max_seq_len=32)
    # every scaling through _Context.scale, where this test sees it: the kernels that fuse some of them into the
    # ops that read the outputs give its numbers bit for bit (test_cpu_kernels.py)
    engine.runner.kernel_points = frozenset()
    engine.add_adapter("p", str(tmp_path / "p"))
    engine.add_adapter("i", str(tmp_path / "i"))
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    outs = engine.generate(
        [
            Request([5, 17, 33, 8, 61], adapter="p", sampling=sampling),
            Request([12, 90, 44, 7], adapter="i", sampling=sampling),
            Request([23, 9, 71], sampling=sampling),
        ]
    )
    assert all(out.error is None for out in outs)
    kinds = {(point, prefill) for _, point, before, _, _ in records for prefill in [before.shape[0] > 3]}
    assert kinds == {(p, pre) for p in points["p"] | points["i"] for pre in (True, False)}  # prefill and decode
    for layer, point, before, after, adapters in records:
        width = before.shape[-1]
        z = torch.stack(
            [small_z(width) if a is not None and point in points[a] else torch.zeros(width) for a in adapters]
        )
        assert after.dtype is torch.bfloat16
        assert_correctly_rounded(before, after, z, f"layer {layer} {point}")


@pytest.mark.parametrize("zv, rounded", [(0.003, 0.0), (0.006, 0.0078125)])
def test_why_one_plus_z_is_not_rounded_to_bf16(zv, rounded):
    """The quantisation the engine and the PEFT model avoid (z = 0.003 served as 0, z = 0.006 as 0.0078)."""
    assert (1 + torch.tensor(zv)).to(torch.bfloat16).item() - 1 == rounded
    out = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    scaled = pedro.layer.apply_scale(out, torch.full((4096,), zv))
    mean_effect = ((scaled.double() - out.double()) / out.double()).mean().item()
    assert abs(mean_effect - zv) < 0.15 * zv  # rounded once from the exact value: about z on average here
