"""pedro.compat: each library internal behaves as pedro assumes, and a release that changes one fails loudly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn

import pedro
from pedro import compat


def test_rotate_half_is_the_half_split_rotation():
    x = torch.arange(8.0).reshape(1, 8)
    assert compat.rotate_half(x).tolist() == [[-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0]]


def test_apply_rope_is_transformers_rotation_bit_for_bit():
    from transformers.models.llama.modeling_llama import rotate_half

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, generator=generator)
    cos, sin = torch.randn(2, 4, 1, 64, generator=generator)  # halves unequal: no reliance on RoPE's repeated halves
    for dtype in (torch.float32, torch.bfloat16):
        xd, cd, sd = x.to(dtype), cos.to(dtype), sin.to(dtype)
        assert torch.equal(compat.apply_rope(xd, cd, compat.rope_sin(sd)), xd * cd + rotate_half(xd) * sd)


@pytest.mark.parametrize("family, per_layer_type", [("llama", False), ("qwen3", False), ("gemma3", True)])
def test_rotary_signature_and_values_of_each_family(family, per_layer_type):
    model = tiny_model(family)
    rotary = model.model.rotary_emb
    compat.check_rotary(rotary, per_layer_type)
    positions = torch.arange(5)[None]
    x = model.model.embed_tokens.weight[:1]
    layer_type = model.config.layer_types[0] if per_layer_type else None
    cos, sin = compat.rotary_cos_sin(rotary, x, positions, layer_type)
    expected = rotary(x, positions, *([layer_type] if per_layer_type else []))
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])


def test_a_changed_rotary_signature_is_refused_by_name():
    class Rotary(nn.Module):
        def forward(self, x, positions):  # noqa: ANN001, ANN202
            return x, x

    with pytest.raises(compat.IncompatibleLibrary, match=r"Rotary.forward's signature.*transformers>=5.0,<5.24"):
        compat.check_rotary(Rotary(), per_layer_type=False)
    with pytest.raises(compat.IncompatibleLibrary, match="layer_type"):
        compat.check_rotary(tiny_model("llama").model.rotary_emb, per_layer_type=True)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_rms_norm_is_each_familys_norm_bit_for_bit(family):
    layer = tiny_model(family).model.layers[0]
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [layer.self_attn.q_norm, layer.self_attn.k_norm] if family != "llama" else []
    generator = torch.Generator().manual_seed(1)
    for norm in norms:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator))  # not the 1s / 0s of a fresh model
        for dtype in (torch.float32, torch.bfloat16):
            norm.to(dtype)
            fn = compat.rms_norm(norm)
            assert fn is not norm  # the module's own numbers through the plain function
            for scale in (1e-3, 1.0, 300.0):
                x = (torch.randn(7, 2, norm.weight.shape[-1], generator=generator) * scale).to(dtype)
                assert torch.equal(fn(x), norm(x))


def test_rms_norm_keeps_a_module_of_another_form():
    class Shifted(nn.Module):  # LLaMA's attributes, another computation
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x / x.abs().amax(-1, keepdim=True)

    for module in (Shifted(), nn.LayerNorm(8), nn.Identity()):
        assert compat.rms_norm(module) is module


@pytest.mark.parametrize("shape", [(6, 2, 8, 5), (96, 3, 64, 150)])  # torch's own small-batch kernel; MKL's
def test_a_power_of_two_alpha_on_baddbmm_is_the_scale_on_the_queries_bit_for_bit(shape):
    """The engine's fp32 CPU decode attention scales the scores by a power-of-two head scale through baddbmm's
    alpha (pedro.engine.runner); scaling the queries first, as transformers does, must give the same bits."""
    batch, group, head_dim, width = shape
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(batch, group, head_dim, generator=generator)
    keys = torch.randn(batch, width, head_dim, generator=generator)
    mask = torch.zeros(batch, 1, width).masked_fill_(torch.rand(batch, 1, width, generator=generator) < 0.3, -torch.inf)
    for scale in (1 / 4, 1 / 8, 1 / 16):
        on_products = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=scale)
        assert torch.equal(on_products, torch.bmm(q * scale, keys.transpose(1, 2)) + mask)


def test_mlp_activation_is_the_backbones_own_and_its_absence_is_refused():
    mlp = tiny_model("llama").model.layers[0].mlp
    assert compat.mlp_activation(mlp) is mlp.act_fn
    with pytest.raises(compat.IncompatibleLibrary, match=r"Linear.act_fn.*pip install 'transformers>=5.0,<5.24'"):
        compat.mlp_activation(nn.Linear(2, 2))


def test_own_train_sampler_orders_trainers_batches_and_none_keeps_trainers(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Reversed(compat.OwnTrainSampler, Trainer):
        reverse = True

        def train_sampler(self, dataset):  # noqa: ANN001, ANN202
            return list(reversed(range(len(dataset)))) if self.reverse else None

    rows = [{"input_ids": [i]} for i in range(6)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none")
    trainer = Reversed(
        model=tiny_model("llama"), args=args, train_dataset=rows, data_collator=lambda b: [r["input_ids"][0] for r in b]
    )
    assert list(trainer.get_train_dataloader()) == [[5, 4], [3, 2], [1, 0]]
    trainer.reverse = False
    assert sorted(i for batch in trainer.get_train_dataloader() for i in batch) == list(range(6))


def test_a_trainer_without_the_sampler_hook_is_refused_by_name():
    class Reshaped:
        def _get_train_sampler(self, dataset=None):  # noqa: ANN001, ANN202
            return None

    with pytest.raises(
        compat.IncompatibleLibrary, match=r"_get_train_sampler\(train_dataset\).*transformers>=5.0,<5.24"
    ):

        class Subclass(compat.OwnTrainSampler, Reshaped):
            pass

    with pytest.raises(compat.IncompatibleLibrary, match="_get_train_sampler"):

        class Bare(compat.OwnTrainSampler):
            pass


def test_adapter_state_dict_is_what_a_saved_adapter_holds(tmp_path):
    model = pedro.get_pedro_model(tiny_model("llama"), pedro.PedroConfig(r=2, layers=[0, 2]))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = compat.adapter_state_dict(model, "default")
    assert {model.base_model._remove_adapter_name_from_key(k, "default") for k in expected} == set(saved)


def test_forget_gguf_quantization_drops_only_a_gguf_marker():
    class Config:
        def __init__(self, method: str) -> None:
            self.quant_method = method

    class Quantizer:
        def __init__(self, method: str) -> None:
            self.quantization_config = Config(method)

    class ModelConfig:
        def __init__(self, method: str) -> None:
            self.quantization_config = {"quant_method": method}

    gguf, other = nn.Linear(1, 1), nn.Linear(1, 1)
    gguf.hf_quantizer, gguf.is_quantized = Quantizer("QuantizationMethod.GGUF"), True
    other.hf_quantizer, other.is_quantized = Quantizer("bitsandbytes"), True
    gguf.config, other.config = ModelConfig("gguf"), ModelConfig("bitsandbytes")
    compat.forget_gguf_quantization(gguf)
    compat.forget_gguf_quantization(other)
    assert gguf.hf_quantizer is None and gguf.is_quantized is False
    assert not hasattr(gguf.config, "quantization_config")
    assert other.hf_quantizer is not None and other.is_quantized is True
    assert other.config.quantization_config == {"quant_method": "bitsandbytes"}


def _ops_run(layer, x) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [0, 1, 7, 32, 100])
def test_packed_linear_is_f_linear_bit_for_bit(rows, dtype):
    torch.manual_seed(0)
    weight = torch.randn(48, 24, dtype=dtype)
    bias = torch.randn(48, dtype=dtype)
    assert compat.can_pack_linear(weight)  # this CPU build of torch has the ops: a release without them fails here
    assert not compat.can_pack_linear(weight.half())
    x = torch.randn(rows, 24, dtype=dtype)
    strided = torch.randn(rows, 48, dtype=dtype)[:, ::2]  # a view, as the runner's scaled inputs can be
    with torch.inference_mode():
        for b in (None, bias):
            layer = compat.packed_linear(weight, b, rows=32)
            assert torch.equal(layer(x), F.linear(x, weight, b))
            assert torch.equal(layer(strided), F.linear(strided, weight, b))


@pytest.mark.parametrize(
    "dtype, op", [(torch.bfloat16, "mkldnn::_linear_pointwise"), (torch.float32, "mkl::_mkl_linear")]
)
def test_packed_linear_runs_the_packed_kernel(dtype, op):
    """The packed kernel is what runs (a fallback to F.linear would be silent otherwise): in fp32 for inputs of
    the rows it was packed for, in bf16 for any -- on a CPU that can run it. On one that cannot (oneDNN's bf16
    reorder needs AVX-512 or AVX-NE-CONVERT), packed_linear is F.linear instead of an error."""
    torch.manual_seed(0)
    weight = torch.randn(576, 192, dtype=dtype)
    layer = compat.packed_linear(weight, None, rows=32)
    reorder = (
        torch.ops.mkldnn._reorder_linear_weight if dtype == torch.bfloat16 else torch.ops.mkl._mkl_reorder_linear_weight
    )
    try:
        reorder(weight, 32)
    except RuntimeError:  # this CPU lacks the kernel's instructions
        with torch.inference_mode():
            ops = _ops_run(layer, torch.randn(32, 192, dtype=dtype))
        assert op not in ops and any(name in ops for name in ("aten::linear", "aten::addmm", "aten::mm"))
        return
    with torch.inference_mode():
        assert op in _ops_run(layer, torch.randn(32, 192, dtype=dtype))
        # SmolLM2's shapes: what the engine relies on for its speed
        for shape in ((576, 576), (1536, 576), (576, 1536)):
            big = torch.randn(*shape, dtype=dtype)
            assert op in _ops_run(compat.packed_linear(big, None, rows=32), torch.randn(32, shape[1], dtype=dtype))


def test_an_fp32_lm_head_runs_in_column_blocks_bit_for_bit():
    """A vocabulary-sized fp32 product runs as F.linear over blocks of outputs for 2 to ``rows`` rows (faster than
    one MKL call over all columns on AMD CPUs), each row count checked on its first input: the same bits as
    F.linear at every row count, the first call and later ones."""
    torch.manual_seed(0)
    weight, bias = torch.randn(compat.HEAD_OUTPUTS + 100, 64), torch.randn(compat.HEAD_OUTPUTS + 100)
    with torch.inference_mode():
        for b in (None, bias):
            layer = compat.packed_linear(weight, b, rows=32)
            for rows in (1, 2, 17, 32, 33, 17, 32):
                x = torch.randn(rows, 64)
                assert torch.equal(layer(x), F.linear(x, weight, b))
            # a row count's first input is checked, later ones run the blocks alone (this CPU's MKL sums each block
            # alike); more rows than ``rows``: F.linear
            first, later = _ops_run(layer, torch.randn(5, 64)), _ops_run(layer, torch.randn(5, 64))
            assert {"aten::cat", "aten::equal"} <= first
            assert "aten::cat" in later and "aten::equal" not in later
            assert "aten::cat" not in _ops_run(layer, torch.randn(33, 64))


def test_inexact_packed_linear_is_batch_invariant_and_within_rounding():
    """``exact=False`` (Engine(exact_gemms=False)): fp32 through oneDNN where it passes the checks, else the exact
    path. Either way a row's result does not depend on the other rows of the call (what keeps a request's tokens
    independent of its batch) and is within fp32 rounding of F.linear."""
    torch.manual_seed(0)
    weight, bias = torch.randn(1536, 576), torch.randn(1536)
    layer = compat.packed_linear(weight, bias, rows=32, exact=False)
    with torch.inference_mode():
        x = torch.randn(200, 576)
        full = layer(x)
        for n in (1, 5, 32, 64):
            assert torch.equal(layer(x[:n]), full[:n])
        reference = F.linear(x, weight, bias)
        assert torch.allclose(full, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
        ops = _ops_run(layer, x[:32])
    if "mkldnn::_linear_pointwise" not in ops:  # oneDNN failed a check here: the exact kernel instead
        assert torch.equal(full, reference)
    assert compat.can_pack_linear(weight, exact=False) and compat.can_pack_linear(weight.bfloat16(), exact=False)
    # bf16 stays bit for bit F.linear either way
    half = compat.packed_linear(weight.bfloat16(), bias.bfloat16(), rows=32, exact=False)
    with torch.inference_mode():
        assert torch.equal(half(x.bfloat16()), F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()))
