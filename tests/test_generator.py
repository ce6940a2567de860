import pytest
import torch
import torch.nn.functional as F

from pedro.generator import HeadStack, RationalActivation, RowLinear, VectorGenerator, pool, rowwise

# The stated tolerance of the GELU initialisation on [-4, 4] (the fit's measured max error is 6.8e-3).
GELU_TOLERANCE = 1e-2


def test_rational_matches_gelu_at_init():
    x = torch.linspace(-4, 4, 4001)
    err = (RationalActivation()(x) - F.gelu(x)).abs().max().item()
    assert err <= GELU_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rational_stays_finite_on_huge_inputs(dtype):
    x = torch.tensor([0.0, 3.0, -3.0, 650.0, -650.0, 25_000.0, -25_000.0, 1e30, -1e30], dtype=torch.float32)
    act = RationalActivation()
    y = act(x.to(dtype))
    assert y.dtype == dtype
    # computed in fp32 and rounded once: the fp32 value at the same (rounded) inputs, wherever the dtype can hold it
    reference = act(x.to(dtype).float())
    assert torch.isfinite(reference).all()
    held = reference.abs() <= torch.finfo(dtype).max
    assert held.sum() == (5 if dtype == torch.float16 else 9)  # fp16 cannot hold R at +-25,000 nor at +-1e30
    torch.testing.assert_close(y[held].float(), reference[held].to(dtype).float(), rtol=0, atol=0)
    assert torch.equal(y[~held], reference[~held].to(dtype))  # +-inf: the true value is out of the dtype's range


def test_rational_coefficients_receive_gradients():
    act = RationalActivation()
    act(torch.linspace(-3, 3, 50)).pow(2).sum().backward()
    assert act.numerator.grad is not None and act.numerator.grad.abs().sum() > 0
    assert act.denominator.grad is not None and act.denominator.grad.abs().sum() > 0


def _padded_batch():
    torch.manual_seed(0)
    states = torch.randn(3, 6, 4)
    # row 0: left padded (2 pads), row 1: right padded (1 pad), row 2: no padding
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    states[~mask] = float("inf")  # pads hold garbage: any leak shows up
    return states, mask


@pytest.mark.parametrize("how", ["last", "mean", "max", "attention"])
def test_poolers_match_per_row_reference_and_ignore_pads(how):
    states, mask = _padded_batch()
    scorer = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        scorer.weight.copy_(torch.tensor([[0.3, -0.2, 0.5, 0.1]]))
    pooled = pool(states, mask, how, scorer)
    for row in range(3):
        kept = states[row][mask[row]]  # the row's real tokens only, in order
        if how == "last":
            expected = kept[-1]
        elif how == "mean":
            expected = kept.mean(0)
        elif how == "max":
            expected = kept.max(0).values
        else:
            weights = torch.softmax(kept @ scorer.weight[0], dim=0)
            expected = (weights[:, None] * kept).sum(0)
        torch.testing.assert_close(pooled[row], expected)


def test_generator_starts_at_zero_and_is_prompt_dependent_once_trained():
    gen = VectorGenerator(d_model=4, r=3, out_features=5, pooler="mean", activation="rational", bias=True)
    states, mask = _padded_batch()
    states = states.clamp(-5, 5)
    assert torch.equal(gen(states, mask), torch.zeros(3, 5))
    torch.nn.init.normal_(gen.up.weight)
    z = gen(states, mask)
    assert not torch.allclose(z[0], z[1])


def test_normalized_pooling_and_bounded_scales():
    """normalize_pooled: Down reads the pooled vector divided by its RMS, so scaling the prompt's states leaves
    z unchanged; scale_bound c: z = c * tanh(u / c) of the unbounded output u, within c of 0, and the identity
    at initialisation like the plain form."""
    states, mask = _padded_batch()
    plain = VectorGenerator(d_model=4, r=3, out_features=5, pooler="mean", activation="gelu", bias=True)
    normed = VectorGenerator(4, 3, 5, "mean", "gelu", True, normalize=True)
    bounded = VectorGenerator(4, 3, 5, "mean", "gelu", True, scale_bound=0.2)
    assert torch.equal(normed(states, mask), torch.zeros(3, 5)) and torch.equal(
        bounded(states, mask), torch.zeros(3, 5)
    )
    torch.nn.init.normal_(plain.up.weight, std=1.0)
    normed.load_state_dict(plain.state_dict())
    bounded.load_state_dict(plain.state_dict())
    pooled = pool(states, mask, "mean")
    unit = pooled / pooled.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(normed(states, mask), plain.up(plain.act(plain.down(unit))))
    torch.testing.assert_close(normed(states * 1000.0, mask), normed(states, mask), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain(states * 1000.0, mask), plain(states, mask))
    u = plain(states, mask)
    z = bounded(states, mask)
    assert u.abs().max() > 0.2  # the bound is active somewhere, so the check below is not vacuous
    torch.testing.assert_close(z, 0.2 * torch.tanh(u / 0.2))
    assert z.abs().max() <= 0.2  # tanh rounds to exactly 1 in float32 far out: within c, never beyond


@pytest.mark.parametrize(
    "options", [dict(), dict(normalize=True, scale_bound=0.5), dict(activation="rational")], ids=str
)
def test_head_on_last_token_states_is_the_last_token_generator(options):
    """The engine pools every tenant's rows with one gather of their last prompt states and runs each
    generator's head on them: the same bits as the generator's own forward on the padded prompts."""
    torch.manual_seed(0)
    gen = VectorGenerator(16, 4, 24, pooler="last", bias=True, **{"activation": "gelu", **options})
    torch.nn.init.normal_(gen.up.weight, std=0.5)
    states = (torch.randn(3, 5, 16) * 3).to(torch.bfloat16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 1 + [False] * 4])
    last = states[torch.arange(3), torch.tensor([4, 2, 0])]
    assert torch.equal(gen.head(last), gen(states, mask))


HEAD_FORMS = [
    dict(activation="gelu"),
    dict(activation="silu", bias=False),
    dict(activation="relu", normalize=True, scale_bound=0.3),
    dict(activation="gelu", normalize=True, scale_bound=0.05),
    dict(activation="rational"),
]


def _trained_heads(d: int, r: int, out: int, count: int, **form) -> list[VectorGenerator]:
    """``count`` generators of one form with random (not initial) weights, so every product and the
    activation's curvature matter."""
    generators = []
    for _ in range(count):
        gen = VectorGenerator(d, r, out, "last", **{"bias": True, **form})
        for name, p in gen.named_parameters():
            if name.startswith(("down", "up")):
                torch.nn.init.normal_(p, std=0.5 if name.startswith("up") else 0.2)
        generators.append(gen)
    return generators


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("size", [(16, 4, 24), (40, 3, 37), (64, 8, 96), (576, 8, 2304)], ids=str)
@pytest.mark.parametrize("form", HEAD_FORMS, ids=str)
def test_a_rows_z_has_the_same_bits_alone_and_in_any_batch(form, size, threads):
    """The serving engine runs every tenant's rows of a prefill at once, through each row's own generator: a
    row's z must not depend on how many rows share the call nor on whose generators the others are. F.linear's
    GEMM rounds a row differently by the row count, and elementwise kernels round a row's tail differently from
    the rest; the generator's own products and activations are computed so that neither happens."""
    d, r, out = size
    torch.manual_seed(d + r + out)
    generators = _trained_heads(d, r, out, 3, **form)
    n = 40  # 40 x 2,304 outputs: more than one thread's worth of an element-wise op
    pooled = (torch.randn(n, d) * 3).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            rows = [generators[i % 3] for i in range(n)]
            alone = torch.cat([gen.head(pooled[i : i + 1]) for i, gen in enumerate(rows)])
            for gen in generators:  # one generator over every row
                together = gen.head(pooled)
                assert torch.equal(together, torch.cat([gen.head(pooled[i : i + 1]) for i in range(n)]))
            if generators[0].head_form() is not None:  # each row through its own generator, as one product
                assert torch.equal(rows[0].head(pooled, HeadStack.stack([HeadStack.of(g) for g in rows])), alone)
    finally:
        torch.set_num_threads(before)
    assert alone.abs().max() > 0.01  # the heads are not at their zero initialisation


def test_row_linear_is_a_linear_layer_in_values_and_gradients():
    torch.manual_seed(0)
    row = RowLinear(24, 5)
    x = torch.randn(3, 4, 24, requires_grad=True)
    y = row(x)
    reference = F.linear(x, row.weight, row.bias)
    torch.testing.assert_close(y, reference)
    grads = torch.autograd.grad(y.square().sum(), (x, row.weight, row.bias))
    expected = torch.autograd.grad(reference.square().sum(), (x, row.weight, row.bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert set(row.state_dict()) == {"weight", "bias"}


def test_rowwise_keeps_each_rows_bits_when_threads_would_split_the_rows():
    """Above torch's grain (32,768 elements) an element-wise op's threads split the elements at offsets of
    their own, each part ending in a scalar tail that rounds silu differently from the vector path: 1,100 rows
    of 64 on three threads split mid-row (a few of five such batches' values differ when run whole).
    ``rowwise`` runs a thread's worth of rows at a time."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for seed in range(5):
            torch.manual_seed(seed)
            x = torch.randn(1100, 64) * 3
            assert torch.equal(rowwise(F.silu, x), torch.cat([rowwise(F.silu, x[i : i + 1]) for i in range(len(x))]))
    finally:
        torch.set_num_threads(before)
