import pytest
import torch
import torch.nn.functional as F

from pedro.generator import RationalActivation, VectorGenerator, pool, stacked_forward

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
    "options", [dict(bias=True), dict(bias=False), dict(bias=True, normalize=True, scale_bound=0.5)], ids=str
)
def test_stacked_generators_equal_each_generator_on_its_rows(options):
    """Many tenants' generators of one shape, run together on one pooled row each (two rows for one of them),
    give each row what its own generator gives, up to fp32 rounding."""
    torch.manual_seed(0)
    gens = [VectorGenerator(16, 4, 24, pooler="last", activation="gelu", **options) for _ in range(3)]
    for g in gens:
        torch.nn.init.normal_(g.up.weight, std=0.5)
    assert len({g.shape_key() for g in gens}) == 1 and gens[0].shape_key() is not None
    states, mask = torch.randn(4, 5, 16) * 3, torch.tensor([[True] * 5, [True] * 3 + [False] * 2] * 2)
    which = torch.tensor([2, 0, 2, 1])
    pooled = pool(states, mask, "last")
    z = stacked_forward(gens, pooled, which)
    alone = torch.cat([gens[int(w)](states[i : i + 1], mask[i : i + 1]) for i, w in enumerate(which)])
    assert not torch.allclose(alone[1], alone[2])  # distinct generators: the rows must come from their own
    torch.testing.assert_close(z, alone, rtol=1e-6, atol=1e-6)


def test_generators_that_cannot_be_stacked_say_so():
    base = dict(d_model=16, r=4, out_features=24, bias=True)
    assert VectorGenerator(pooler="mean", activation="gelu", **base).shape_key() is None
    assert VectorGenerator(pooler="last", activation="rational", **base).shape_key() is None  # own coefficients
    key = VectorGenerator(pooler="last", activation="gelu", **base).shape_key()
    assert VectorGenerator(pooler="last", activation="relu", **base).shape_key() != key
    assert VectorGenerator(pooler="last", activation="gelu", **{**base, "r": 8}).shape_key() != key
    assert VectorGenerator(pooler="last", activation="gelu", scale_bound=1.0, **base).shape_key() != key


def test_a_stacked_rows_z_does_not_depend_on_the_rows_beside_it():
    """The same bits for a row alone and among other tenants' rows: a tenant's vectors do not depend on who
    shares its prefill."""
    torch.manual_seed(1)
    gens = [VectorGenerator(64, 8, 96, pooler="last", activation="gelu", bias=True) for _ in range(6)]
    for g in gens:
        torch.nn.init.normal_(g.up.weight, std=0.5)
    pooled, which = torch.randn(50, 64) * 4, torch.randint(0, 6, (50,))
    together = stacked_forward(gens, pooled, which)
    for i in range(0, 50, 7):
        w = int(which[i])
        assert torch.equal(stacked_forward([gens[w]], pooled[i : i + 1], torch.tensor([0]))[0], together[i])
        beside = stacked_forward(gens[: w + 1], pooled[[i, 0, i]], torch.tensor([w, 0, w]))
        assert torch.equal(beside[0], together[i]) and torch.equal(beside[2], together[i])
