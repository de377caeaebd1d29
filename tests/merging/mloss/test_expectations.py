"""Closed-form expectations of spec §1.4 against its §4 numbers, quadrature and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merging.mloss import centred_gap
from merging.mloss.expectations import (
    expected_gap,
    gate_disagreement,
    gauss_smoothed_act,
    integrated_gap,
    integrated_gate_disagreement,
    integrated_squared_relu_gap,
    normal_cdf,
    relu_pair_gap,
)

GRID = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)


def _integrate(values: torch.Tensor, grid: torch.Tensor = GRID) -> float:
    return float(torch.trapezoid(values, grid))


@pytest.mark.parametrize(
    ("act", "u", "v", "expected"),
    [
        ("relu", 0.0, 0.5, 0.28209),
        ("relu", 0.7, 0.04, 0.70001),
        ("relu", -1.3, 0.5, 0.00916),
        ("gelu", 0.0, 0.5, 0.16287),
        ("gelu", 0.7, 0.5, 0.63965),
        ("gelu", -1.3, 0.04, -0.12461),
    ],
)
def test_gauss_smoothed_act_spec_table(act, u, v, expected):
    assert float(gauss_smoothed_act(u, v, act)) == pytest.approx(expected, abs=6e-6)


@pytest.mark.parametrize("act", ["relu", "gelu", "leaky_relu"])
def test_closed_forms_agree_with_monte_carlo(act):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    fn = {"relu": F.relu, "gelu": F.gelu, "leaky_relu": lambda x: F.leaky_relu(x, 0.1)}[act]
    for u, v in ((0.0, 0.5), (0.7, 0.04), (-1.3, 0.5)):
        samples = fn(u + math.sqrt(v) * noise)
        tolerance = 4 * float(samples.std()) / math.sqrt(noise.numel())
        assert float(gauss_smoothed_act(u, v, act, negative_slope=0.1)) == pytest.approx(
            float(samples.mean()), abs=tolerance
        )


def test_quadrature_fallback_matches_closed_forms_and_modules():
    u = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for v in (0.01, 0.3, 2.0):
        torch.testing.assert_close(gauss_smoothed_act(u, v, F.gelu), gauss_smoothed_act(u, v, "gelu"))
        torch.testing.assert_close(gauss_smoothed_act(u, v, nn.GELU()), gauss_smoothed_act(u, v, "gelu"))
        torch.testing.assert_close(
            gauss_smoothed_act(u, v, nn.LeakyReLU(0.2)), gauss_smoothed_act(u, v, "leaky_relu", negative_slope=0.2)
        )
    # v = 0 is σ itself
    torch.testing.assert_close(gauss_smoothed_act(u, 0.0, "relu"), F.relu(u))
    torch.testing.assert_close(gauss_smoothed_act(u, 0.0, "quick_gelu"), u * torch.sigmoid(1.702 * u))


def test_lemma_a1_and_gate_disagreement():
    lemma = _integrate(normal_cdf(GRID) * normal_cdf(-GRID))
    assert lemma == pytest.approx(1 / math.sqrt(math.pi), abs=1e-9)
    assert 1 / math.sqrt(math.pi) == pytest.approx(0.5641895835, abs=1e-10)
    assert _integrate(gate_disagreement(GRID, 0.3)) == pytest.approx(0.3385137501, abs=1e-9)
    assert integrated_gate_disagreement(0.3) == pytest.approx(0.3385137501, abs=1e-10)


def test_gate_disagreement_is_the_probability_two_relu_gates_differ():
    g = torch.Generator().manual_seed(1)
    u, s = 0.2, 0.3
    z = u + s * torch.randn(2, 1_000_000, generator=g, dtype=torch.float64)
    disagree = ((z[0] > 0) != (z[1] > 0)).double().mean()
    assert float(gate_disagreement(u, s)) == pytest.approx(float(disagree), abs=2e-3)


@pytest.mark.parametrize(("k", "expected"), [(2, -0.0225), (4, -0.03375), (8, -0.039375)])
def test_integrated_gap_spec_numbers(k, expected):
    for act in ("relu", "gelu", "gelu_tanh", "quick_gelu", nn.ReLU(), nn.GELU(approximate="tanh")):
        assert integrated_gap(0.3, k, act) == pytest.approx(expected, abs=1e-12)
    assert integrated_gap(0.3, k, "leaky_relu", negative_slope=0.1) == pytest.approx(0.9 * expected, abs=1e-12)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "quick_gelu", "leaky_relu"])
def test_integrated_gap_equals_numerical_integral_of_expected_gap(act):
    grid = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64)
    numeric = _integrate(expected_gap(grid, 0.3, 4, act, negative_slope=0.1), grid)
    assert numeric == pytest.approx(integrated_gap(0.3, 4, act, negative_slope=0.1), rel=1e-4)


def test_expected_relu_gap_is_non_positive_and_vanishes_for_one_expert():
    u = torch.linspace(-2, 2, 41, dtype=torch.float64)
    assert bool((expected_gap(u, 0.3, 8, "relu") <= 0).all())
    assert torch.count_nonzero(expected_gap(u, 0.3, 1, "gelu")) == 0


def test_relu_pair_identity_and_its_integral():
    z = torch.linspace(-2, 2, 401, dtype=torch.float64)
    for d in (-0.8, 0.0, 0.37, 1.5):
        direct = F.relu(z) - 0.5 * (F.relu(z + d) + F.relu(z - d))
        torch.testing.assert_close(relu_pair_gap(z, d), direct)
    assert _integrate(relu_pair_gap(GRID, 0.37) ** 2) == pytest.approx(0.0084421667, abs=1e-9)
    assert abs(0.37) ** 3 / 6 == pytest.approx(0.0084421667, abs=1e-10)


def test_integrated_squared_relu_gap_spec_number_and_monte_carlo():
    s = 0.3
    assert integrated_squared_relu_gap(s) == pytest.approx(0.0025389, abs=5e-8)
    # E over d ~ N(0, s²/2) of ∫ M² dz = E|d|³ / 6
    g = torch.Generator().manual_seed(2)
    d = (s / math.sqrt(2)) * torch.randn(1_000_000, generator=g, dtype=torch.float64)
    mc = float((d.abs() ** 3 / 6).mean())
    assert mc == pytest.approx(integrated_squared_relu_gap(s), rel=0.01)


def test_node_mloss_of_two_relu_experts_is_order_s_cubed():
    """The measurement code against §1.4: u ~ N(0, 1), ε_j ~ N(0, s²), s = 0.1, K = 2:
    E[M²] ≈ φ(0) s³ / (6√π) = 3.75e-5."""
    g = torch.Generator().manual_seed(3)
    n, s = 2_000_000, 0.1
    u = torch.randn(n, generator=g, dtype=torch.float64)
    z = u + s * torch.randn(2, n, generator=g, dtype=torch.float64)
    anchored = torch.stack([z[0], z[1] - z[0]]).view(2, 1, n, 1)
    gap, _ = centred_gap(anchored, torch.tensor([0.5, 0.5], dtype=torch.float64), F.relu)
    measured = float(gap.square().mean())
    predicted = integrated_squared_relu_gap(s) / math.sqrt(2 * math.pi)
    assert predicted == pytest.approx(3.75e-5, rel=0.01)
    assert measured == pytest.approx(predicted, rel=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="v must be >= 0"):
        gauss_smoothed_act(0.0, -1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        gauss_smoothed_act(0.0, 1.0, "swishy")
    with pytest.raises(ValueError, match="limiting slopes"):
        integrated_gap(0.3, 2, nn.Tanh())
