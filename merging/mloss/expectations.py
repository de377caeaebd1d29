"""Closed-form expected M-Loss gaps under Gaussian fine-tuning perturbations.

Wang, Duan, Chen, Wu, Lim, "M-Loss: Quantifying Model Merging Compatibility with Limited
Unlabeled Data", AAAI 2026, https://arxiv.org/abs/2602.08564. §-numbers refer to the
project's M-Loss spec (§1.4: expected values for common activations).

Model [I]: z_j = u + ε_j, ε_j iid N(0, s²): u is the shared pretrained pre-activation and
ε_j expert j's fine-tuning perturbation; the merged pre-activation is u + ε̄ with
ε̄ ~ N(0, s²/K). Lemma A.1 (∫Φ(u)Φ(−u)du = 1/√π) is the paper's; the closed forms below are
this project's derivations, checked by quadrature and Monte Carlo in the tests. They
explain the measured values (M-Loss grows like s³ for ReLU: experts that stay close to
their shared backbone merge well) and are not used by the measurement itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from merging.mloss.gap import Activation

_CLOSED_FORMS = ("relu", "gelu", "leaky_relu")
# σ′(+∞), σ′(−∞)
_ASYMPTOTIC_SLOPES = {name: (1.0, 0.0) for name in ("relu", "gelu", "gelu_tanh", "quick_gelu", "silu")}
_NAMED_ACTS: dict[str, Activation] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


def normal_cdf(x: Tensor) -> Tensor:
    """Φ(x), the standard normal CDF."""
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def normal_pdf(x: Tensor) -> Tensor:
    """φ(x), the standard normal density."""
    return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _activation_name(act: str | nn.Module | Activation, negative_slope: float) -> tuple[str | None, float]:
    """Map a module to a closed-form name: nn.ReLU, nn.GELU (exact/tanh), nn.LeakyReLU, nn.SiLU."""
    if isinstance(act, str):
        return act, negative_slope
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", act.negative_slope
    if isinstance(act, nn.ReLU):
        return "relu", negative_slope
    if isinstance(act, nn.GELU):
        return ("gelu" if act.approximate == "none" else "gelu_tanh"), negative_slope
    if isinstance(act, nn.SiLU):
        return "silu", negative_slope
    return None, negative_slope


def gauss_smoothed_act(
    u: Tensor | float,
    v: Tensor | float,
    act: str | nn.Module | Activation = "relu",
    *,
    negative_slope: float = 0.01,
    quadrature_points: int = 96,
) -> Tensor:
    """m_σ(u, v) = E[σ(u + N(0, v))], the expected activation under Gaussian noise (§1.4).

    Closed forms [I]:
      - ReLU: u Φ(u/√v) + √v φ(u/√v);
      - GELU (exact, xΦ(x)): u Φ(u/√(1+v)) + (v/√(1+v)) φ(u/√(1+v));
      - Leaky ReLU (slope a): a·u + (1 − a)·m_ReLU.
    Any other σ (``"gelu_tanh"``, ``"quick_gelu"``, ``"silu"``, a module or a callable):
    Gauss–Hermite quadrature with ``quadrature_points`` nodes.

    Args:
        u: the shared pre-activation.
        v: the noise variance (≥ 0); broadcast with ``u``.
        act: σ: a name, ``nn.ReLU``/``nn.GELU``/``nn.LeakyReLU``/``nn.SiLU``, or a callable.
        negative_slope: a of ``"leaky_relu"``.
        quadrature_points: nodes of the quadrature fallback.

    Returns:
        m_σ(u, v), float64, broadcast shape of ``u`` and ``v``.
    """
    u = torch.as_tensor(u, dtype=torch.float64)
    v = torch.as_tensor(v, dtype=torch.float64)
    if bool((v < 0).any()):
        raise ValueError("gauss_smoothed_act: the variance v must be >= 0")
    name, slope = _activation_name(act, negative_slope)
    if name in ("relu", "leaky_relu"):
        sd = v.sqrt()
        safe = torch.where(sd > 0, sd, torch.ones_like(sd))
        t = u / safe
        relu = torch.where(sd > 0, u * normal_cdf(t) + sd * normal_pdf(t), u.clamp(min=0))
        return relu if name == "relu" else slope * u + (1.0 - slope) * relu
    if name == "gelu":
        scale = torch.sqrt(1.0 + v)
        t = u / scale
        return u * normal_cdf(t) + (v / scale) * normal_pdf(t)
    fn: Activation
    if name is not None:
        if name not in _NAMED_ACTS:
            raise ValueError(
                f"gauss_smoothed_act: unknown activation {name!r}; use one of "
                f"{sorted(set(_CLOSED_FORMS) | set(_NAMED_ACTS))} or a callable"
            )
        fn = _NAMED_ACTS[name]
    else:
        fn = act  # type: ignore[assignment]
    nodes, weights = np.polynomial.hermite.hermgauss(quadrature_points)
    nodes_t = torch.as_tensor(nodes, dtype=torch.float64)
    weights_t = torch.as_tensor(weights, dtype=torch.float64)
    u_b, v_b = torch.broadcast_tensors(u, v)
    points = u_b.unsqueeze(-1) + torch.sqrt(2.0 * v_b).unsqueeze(-1) * nodes_t
    return (fn(points) * weights_t).sum(-1) / math.sqrt(math.pi)


def expected_gap(
    u: Tensor | float,
    s: float,
    num_experts: int,
    act: str | nn.Module | Activation = "relu",
    *,
    negative_slope: float = 0.01,
) -> Tensor:
    """Signed expected gap Δ_σ(u) = m_σ(u, s²/K) − m_σ(u, s²) (≤ 0 for ReLU) (§1.4 [I]).

    Args:
        u: the shared pre-activation.
        s: the per-expert perturbation's standard deviation.
        num_experts: K.
        act: σ (see :func:`gauss_smoothed_act`).
        negative_slope: a of Leaky ReLU.
    """
    if num_experts < 1 or s < 0:
        raise ValueError(f"expected_gap: need K >= 1 and s >= 0, got K={num_experts}, s={s}")
    merged = gauss_smoothed_act(u, s * s / num_experts, act, negative_slope=negative_slope)
    return merged - gauss_smoothed_act(u, s * s, act, negative_slope=negative_slope)


def integrated_gap(
    s: float, num_experts: int, act: str | nn.Module = "relu", *, negative_slope: float = 0.01
) -> float:
    """∫_R Δ_σ(u) du = −(s²/2)(1 − 1/K)(σ′(+∞) − σ′(−∞)) (§1.4 [I]).

    −s²(K−1)/(2K) for ReLU, GELU (exact or tanh), QuickGELU and SiLU; that times (1 − a)
    for Leaky ReLU.

    Args:
        s: the per-expert perturbation's standard deviation.
        num_experts: K.
        act: a name (``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"``, ``"silu"``,
            ``"leaky_relu"``) or the matching module.
        negative_slope: a of Leaky ReLU.
    """
    name, slope = _activation_name(act, negative_slope)
    if name == "leaky_relu":
        hi, lo = 1.0, slope
    elif name in _ASYMPTOTIC_SLOPES:
        hi, lo = _ASYMPTOTIC_SLOPES[name]
    else:
        raise ValueError(
            f"integrated_gap needs σ's limiting slopes; known: {sorted(_ASYMPTOTIC_SLOPES) + ['leaky_relu']}"
        )
    return -(s * s / 2.0) * (1.0 - 1.0 / num_experts) * (hi - lo)


def gate_disagreement(u: Tensor | float, s: float) -> Tensor:
    """P(two experts' ReLU gates disagree | u) = 2Φ(u/s)Φ(−u/s), z_j = u + N(0, s²) (§1.4 [I])."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return 2.0 * normal_cdf(u / s) * normal_cdf(-u / s)


def integrated_gate_disagreement(s: float) -> float:
    """∫ 2Φ(u/s)Φ(−u/s) du = 2s/√π, by Lemma A.1 (∫Φ(u)Φ(−u)du = 1/√π): the conflict
    region grows linearly in s."""
    return 2.0 * s / math.sqrt(math.pi)


def relu_pair_gap(z: Tensor | float, d: Tensor | float) -> Tensor:
    """ReLU(z) − ½[ReLU(z+d) + ReLU(z−d)] = −½(|d| − |z|)₊: two experts z ± d (§1.4 [I])."""
    z = torch.as_tensor(z, dtype=torch.float64)
    d = torch.as_tensor(d, dtype=torch.float64)
    return -0.5 * (d.abs() - z.abs()).clamp(min=0)


def integrated_squared_relu_gap(s: float) -> float:
    """∫ E[M²] du = s³/(6√π) for K = 2 ReLU experts (d ~ N(0, s²/2), ∫ M² dz = |d|³/6) (§1.4 [I]).

    The node M-Loss is therefore O(s³): experts that stay close to their shared backbone
    merge well.
    """
    return s**3 / (6.0 * math.sqrt(math.pi))


__all__ = [
    "expected_gap",
    "gate_disagreement",
    "gauss_smoothed_act",
    "integrated_gap",
    "integrated_gate_disagreement",
    "integrated_squared_relu_gap",
    "normal_cdf",
    "normal_pdf",
    "relu_pair_gap",
]
