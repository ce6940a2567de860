"""PEDRO on tiny random backbones of every supported family, against independent references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, randomize, tiny_model

import pedro
from pedro import PedroConfig
from pedro.backbones import layer_map

FAMILY_NAMES = sorted(FAMILIES)


def ids_for(*lengths, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]


def left_pad(rows, pad_id=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def pedro_vectors(model):
    return {key: z.detach().clone() for key, z in model.base_model.pedro_state.vectors.items()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fresh_adapter_is_exactly_the_identity(family):
    base = tiny_model(family)
    ids, mask = left_pad(ids_for(5, 9, 7))
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        model = pedro.get_pedro_model(base, PedroConfig(r=4, targets=["q", "k", "v", "o", "gate", "up"]))
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - expected).abs().max().item() <= 1e-6


def _reference_by_weight_scaling(base, config, adapter_model, ids, prompt_len):
    """An independent reference: for one sequence, PEDRO equals the base model with each projection's
    output rows scaled by 1 + z. Build that model layer by layer, computing z by hand from the generator
    weights on the (already modified) states entering each layer."""
    ref = copy.deepcopy(base)
    lmap = layer_map(ref)
    for i, layer in enumerate(ref.get_submodule(lmap.layers)):
        captured = {}
        norm = layer.get_submodule(lmap.norm)
        handle = norm.register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
        with torch.no_grad():
            ref(input_ids=ids)
        handle.remove()
        h = captured["h"][0, :prompt_len]
        tap = adapter_model.base_model.model.get_submodule(f"{lmap.layers}.{i}.{lmap.norm}")
        gen = tap.pedro_generator["default"]
        if config.pooler == "last":
            pooled = h[-1]
        else:
            pooled = h.mean(0)
        if config.normalize_pooled:
            pooled = pooled / torch.sqrt((pooled**2).mean() + 1e-6)
        hidden = F.linear(pooled, gen.down.weight, gen.down.bias)
        hidden = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[config.activation](hidden)
        z = F.linear(hidden, gen.up.weight, gen.up.bias)
        if config.scale_bound is not None:
            z = config.scale_bound * torch.tanh(z / config.scale_bound)
        offset = 0
        for target in config.targets:
            proj = layer.get_submodule(lmap.projections[target])
            width = proj.out_features
            scale = 1 + z[offset : offset + width]
            with torch.no_grad():
                proj.weight.mul_(scale[:, None])
                if proj.bias is not None:
                    proj.bias.mul_(scale)
            offset += width
    return ref


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize(
    "pooler, activation, forms",
    [("last", "gelu", {}), ("mean", "silu", {}), ("mean", "gelu", dict(normalize_pooled=True, scale_bound=0.1))],
)
def test_outputs_equal_hand_written_reference(family, pooler, activation, forms):
    base = tiny_model(family)
    config = PedroConfig(r=4, pooler=pooler, activation=activation, targets=["q", "v", "up", "o"], **forms)
    model = pedro.get_pedro_model(copy.deepcopy(base), config)
    randomize(model)
    (seq,) = ids_for(11)
    prompt_len = 7
    ids = seq[None]
    with torch.no_grad():
        got = model(input_ids=ids, prompt_lengths=torch.tensor([prompt_len])).logits
        expected = _reference_by_weight_scaling(base, config, model, ids, prompt_len)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter really changes the output


def test_one_layer_matches_the_equations():
    """Hook layer 1: its scaled Q, V and U outputs equal (1 + l) * (W h) computed by hand."""
    base = tiny_model("llama")
    model = pedro.get_pedro_model(base, PedroConfig(r=3, targets=["q", "v", "up"]))
    randomize(model, seed=3)
    layer = model.base_model.model.model.layers[1]
    seen = {}
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("h2", out)),
    ]
    for name, module in [("q", layer.self_attn.q_proj), ("v", layer.self_attn.v_proj), ("up", layer.mlp.up_proj)]:
        hooks.append(module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out)))
    (seq,) = ids_for(6)
    with torch.no_grad():
        model(input_ids=seq[None])
    for handle in hooks:
        handle.remove()
    gen = layer.input_layernorm.pedro_generator["default"]
    h = seen["h"][0]
    z = F.linear(F.gelu(F.linear(h[-1], gen.down.weight, gen.down.bias)), gen.up.weight, gen.up.bias)
    lq, lv, lu = z[:32], z[32:48], z[48:]
    attn, mlp = layer.self_attn, layer.mlp
    torch.testing.assert_close(seen["q"][0], (1 + lq) * (h @ attn.q_proj.base_layer.weight.T))
    torch.testing.assert_close(seen["v"][0], (1 + lv) * (h @ attn.v_proj.base_layer.weight.T))
    torch.testing.assert_close(seen["up"][0], (1 + lu) * (seen["h2"][0] @ mlp.up_proj.base_layer.weight.T))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_generate_equals_full_recomputation(family):
    model = pedro.get_pedro_model(tiny_model(family), PedroConfig(r=4))
    randomize(model)
    (prompt,) = ids_for(8)
    ids = prompt[None]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    seq = ids
    for step in range(8):
        with torch.no_grad():
            logits = model(input_ids=seq, prompt_lengths=torch.tensor([len(prompt)])).logits[:, -1]
        torch.testing.assert_close(logits, out.logits[step], atol=1e-4, rtol=0)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out.sequences)
    no_cache = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=False
    )
    assert torch.equal(no_cache, out.sequences)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_left_padded_batch_equals_each_row_alone(family):
    model = pedro.get_pedro_model(tiny_model(family), PedroConfig(r=4, pooler="mean"))
    randomize(model)
    rows = ids_for(4, 10, 7)
    ids, mask = left_pad(rows)
    batch = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for i, row in enumerate(rows):
        alone = model.generate(
            input_ids=row[None],
            attention_mask=torch.ones(1, len(row), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(row) :])
        for step in range(6):
            torch.testing.assert_close(batch.logits[step][i], alone.logits[step][0], atol=1e-4, rtol=0)


def test_beam_search_and_sampling_use_each_rows_vectors():
    model = pedro.get_pedro_model(tiny_model("llama"), PedroConfig(r=4))
    randomize(model)
    rows = ids_for(5, 8)
    ids, mask = left_pad(rows)
    beams = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0
    )
    for i, row in enumerate(rows):
        alone = model.generate(
            input_ids=row[None],
            attention_mask=torch.ones(1, len(row), dtype=torch.long),
            max_new_tokens=5,
            num_beams=3,
            do_sample=False,
            pad_token_id=0,
        )
        assert torch.equal(beams[i, ids.shape[1] :], alone[0, len(row) :])
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    top1 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1, pad_token_id=0)
    assert torch.equal(greedy, top1)


def test_vectors_ignore_response_tokens_and_pads():
    model = pedro.get_pedro_model(tiny_model("llama"), PedroConfig(r=4, pooler="attention"))
    randomize(model)
    prompt, response = ids_for(6, 4)
    with torch.no_grad():
        model(input_ids=prompt[None])
        alone = pedro_vectors(model)
        model(input_ids=torch.cat([prompt, response])[None], prompt_lengths=torch.tensor([6]))
        with_response = pedro_vectors(model)
        # right padding with junk pad ids, and left padding, give the same vectors
        junk = torch.tensor([50, 51, 52])
        model(
            input_ids=torch.cat([prompt, response, junk])[None],
            attention_mask=torch.tensor([[1] * 10 + [0] * 3]),
            prompt_lengths=torch.tensor([6]),
        )
        right_padded = pedro_vectors(model)
        model(input_ids=torch.cat([junk, prompt])[None], attention_mask=torch.tensor([[0] * 3 + [1] * 6]))
        left_padded = pedro_vectors(model)
    assert alone.keys() == with_response.keys() and len(alone) == 3
    for key in alone:
        torch.testing.assert_close(with_response[key], alone[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(right_padded[key], alone[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(left_padded[key], alone[key], atol=1e-6, rtol=0)


def test_labels_give_the_prompt_boundary():
    model = pedro.get_pedro_model(tiny_model("llama"), PedroConfig(r=4, pooler="mean"))
    randomize(model)
    prompt, response = ids_for(5, 3)
    ids = torch.cat([prompt, response])[None]
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        model(input_ids=ids, prompt_lengths=torch.tensor([5]))
        explicit = pedro_vectors(model)
        model(input_ids=ids, labels=labels)
        inferred = pedro_vectors(model)
    for key in explicit:
        torch.testing.assert_close(inferred[key], explicit[key], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        model(input_ids=ids, labels=ids)


def test_bad_prompt_boundaries_and_batches_fail_clearly():
    model = pedro.get_pedro_model(tiny_model("llama"), PedroConfig(r=4))
    (prompt,) = ids_for(5)
    with pytest.raises(ValueError, match="between 1 and"):
        model(input_ids=prompt[None], prompt_lengths=torch.tensor([0]))
    with pytest.raises(ValueError, match="between 1 and"):
        model(input_ids=prompt[None], prompt_lengths=torch.tensor([9]))
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        model(input_ids=prompt[None], prompt_lengths=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="no prompt tokens"):
        model(input_ids=prompt[None], attention_mask=torch.zeros(1, 5, dtype=torch.long))
    out = model(input_ids=prompt[None], use_cache=True)
    with pytest.raises(RuntimeError, match="batch of 1 rows, but this forward has 2"):
        model(input_ids=torch.tensor([[4], [5]]), past_key_values=out.past_key_values)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50))
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: \['gemma'"):
        pedro.get_pedro_model(gpt2, r=2)
    with pytest.raises(ValueError, match="model has 3 layers"):
        pedro.get_pedro_model(tiny_model("llama"), PedroConfig(layers=[0, 5]))


@pytest.mark.parametrize(
    "config",
    [
        PedroConfig(r=4),
        PedroConfig(r=2, pooler="attention", activation="rational", targets=["k", "o", "gate"]),
        PedroConfig(r=3, layers=[0, 2], generator_bias=False),
        PedroConfig(r=5, share_generator=True, targets=["q", "up"]),
    ],
)
def test_trainable_parameters_match_closed_form(config):
    base = tiny_model("llama")
    closed = pedro.count_trainable_parameters(config, base)
    model = pedro.get_pedro_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == closed
    d, r = 32, config.r
    widths = {"q": 32, "k": 16, "v": 16, "o": 32, "gate": 48, "up": 48}
    width = sum(widths[t] for t in config.targets)
    per_layer = d * r + r * width + (r + width if config.generator_bias else 0)
    per_layer += d if config.pooler == "attention" else 0
    per_layer += 12 if config.activation == "rational" else 0
    n_generators = 1 if config.share_generator else len(config.layers or range(3))
    assert closed == n_generators * per_layer


def test_training_moves_only_the_adapter_and_lowers_the_loss():
    base = tiny_model("llama")
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = pedro.get_pedro_model(base, PedroConfig(r=4, activation="rational"))
    torch.manual_seed(0)
    prompts = torch.randint(3, 97, (8, 5))
    answers = (prompts[:, :1] * 7) % 90 + 3  # a prompt-dependent target token
    ids = torch.cat([prompts, answers], dim=1)
    labels = ids.clone()
    labels[:, :5] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    rational = model.base_model.model.model.layers[0].input_layernorm.pedro_generator["default"].act
    assert rational.numerator.grad is not None and rational.numerator.grad.abs().sum() > 0
    for name, param in model.base_model.model.named_parameters():
        if "pedro_" not in name:
            assert not param.requires_grad and param.grad is None, name
    current = {
        k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items() if "pedro_" not in k
    }
    assert current.keys() == frozen.keys()
    assert all(torch.equal(current[k], frozen[k]) for k in frozen)


def test_disable_adapter_and_unload_restore_the_base():
    base = tiny_model("llama")
    (prompt,) = ids_for(6)
    with torch.no_grad():
        expected = base(input_ids=prompt[None]).logits
    model = pedro.get_pedro_model(base, PedroConfig(r=4))
    randomize(model)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=prompt[None]).logits, expected, atol=0, rtol=0)
    unloaded = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=prompt[None]).logits, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        pedro.get_pedro_model(tiny_model("llama"), PedroConfig(r=2)).merge_and_unload()


def test_bf16_backbone_keeps_fp32_generators_and_identity():
    base = tiny_model("llama").to(torch.bfloat16)
    ids, mask = left_pad(ids_for(4, 6))
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        model = pedro.get_pedro_model(base, PedroConfig(r=4, activation="rational"))
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
        randomize(model)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    generators = [p for n, p in model.named_parameters() if "pedro_" in n]
    assert generators and all(p.dtype == torch.float32 for p in generators)
