"""The fast gap: agreement with a naive loop for every activation kind and layer layout,
exact zeros wherever the experts agree, and inputs left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merging.mloss import OUTPUT, centred_gap, layer_gap, m_loss, node_mloss

ACTIVATIONS = [
    nn.ReLU(),
    nn.ReLU(inplace=True),
    nn.LeakyReLU(0.1),
    nn.ReLU6(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.SiLU(inplace=True),
    nn.ELU(inplace=True),
    nn.Sigmoid(),
    torch.tanh,
]


def _activation_id(act) -> str:
    """A test id that is the same in every process (a function's repr holds its address)."""
    return act.__name__ if not isinstance(act, nn.Module) else repr(act)


def _naive(z: torch.Tensor, alpha: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """From the anchored stack [z_1, δ_2, ...]: σ(Σ α z) − Σ α σ(z) with a loop over experts."""
    zs = [z[0]] + [z[0] + z[j] for j in range(1, z.shape[0])]
    merged = act(sum(a * zj for a, zj in zip(alpha.tolist(), zs)).clone())
    ensembled = sum(a * act(zj.clone()) for a, zj in zip(alpha.tolist(), zs))
    return merged - ensembled, merged


@pytest.mark.parametrize("act", ACTIVATIONS, ids=_activation_id)
@pytest.mark.parametrize("num", [1, 2, 5])
def test_centred_gap_matches_the_naive_loop_and_leaves_z_alone(act, num):
    g = torch.Generator().manual_seed(num)
    z = torch.randn(num, 3, 37, generator=g)
    z[1:] *= 0.3
    alpha = torch.softmax(torch.randn(num, generator=g), 0).double()
    before = z.clone()
    gap, merged = centred_gap(z, alpha, act)
    want_gap, want_merged = _naive(before, alpha, act)
    assert torch.equal(z, before)
    assert gap.shape == merged.shape == (3, 37)
    torch.testing.assert_close(gap, want_gap, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(merged, want_merged, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=_activation_id)
def test_gap_is_exactly_zero_where_every_expert_agrees(act):
    # 1031 values per expert: not a multiple of any vector width, so tails are exercised.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1031, generator=g)
    z[1:] *= 0.5
    agree = torch.rand(1031, generator=g) < 0.3
    z[1:, agree] = 0.0
    gap, merged = centred_gap(z, torch.tensor([0.1, 0.2, 0.3, 0.4]), act)
    assert torch.count_nonzero(gap[agree]) == 0
    assert torch.count_nonzero(gap[~agree]) > 0
    # The merged activation is σ(z_1) there, up to how the activation's vectorised and scalar
    # code paths round (one ulp differs between torch builds): only the gap's zeros are exact.
    torch.testing.assert_close(merged[agree], act(z[0, agree].clone()))


def _conv_naive_node(x, weights, biases, conv, act):
    """Node M-Loss (d_out,) of a conv from per-expert convs and the naive gap."""
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    z = torch.stack(
        [fn(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups) for w, b in zip(weights, biases)]
    )
    anchored = torch.cat([z[:1], z[1:] - z[:1]])
    gap, _ = _naive(anchored, torch.full((len(weights),), 1 / len(weights), dtype=torch.float64), act)
    return gap.transpose(0, 1).reshape(conv.out_channels, -1).pow(2).mean(dim=1)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Conv1d(4, 8, 3, groups=4)],
)
def test_conv_node_mloss_in_the_channels_first_layout(conv):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *([7, 7] if isinstance(conv, nn.Conv2d) else [9]), generator=g)
    weights = torch.randn(3, *conv.weight.shape, generator=g)
    biases = torch.randn(3, conv.out_channels, generator=g)
    alpha = torch.full((3,), 1 / 3, dtype=torch.float64)
    got = node_mloss(x, weights, biases, alpha, F.gelu, conv)
    torch.testing.assert_close(got, _conv_naive_node(x, weights, biases, conv, F.gelu), rtol=1e-4, atol=1e-7)
    gap, merged = layer_gap(x, weights, biases, alpha, F.gelu, conv)
    positions = conv(x).shape[2:].numel()
    assert gap.shape == merged.shape == (3, positions, conv.out_channels)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, groups=2)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(7, 2)

    def forward(self, x):  # (B, T, 5)
        return self.fc2(self.act(self.fc1(x))).mean(dim=1)


def _experts(model: nn.Module, k: int, seed: int = 3) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {n: v.clone() for n, v in model.state_dict().items()}
    return base, [{n: v + 0.2 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]


def test_m_loss_of_a_grouped_conv_matches_hand_computation():
    torch.manual_seed(0)
    model = _ConvNet()
    base, experts = _experts(model, 3)
    g = torch.Generator().manual_seed(4)
    data = [torch.randn(2, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)]
    report = m_loss(model, experts, data, base=base)
    x = torch.cat(data)
    weights = [e["conv.weight"] for e in experts]
    biases = [e["conv.bias"] for e in experts]
    want_node = _conv_naive_node(x, weights, biases, model.conv, F.silu)
    torch.testing.assert_close(report.node["conv"], want_node, rtol=1e-4, atol=1e-8)
    z = torch.stack([F.conv2d(x, w, b, padding=1, groups=2) for w, b in zip(weights, biases)])
    gap, merged = _naive(torch.cat([z[:1], z[1:] - z[:1]]), torch.full((3,), 1 / 3, dtype=torch.float64), F.silu)
    per_sample = gap.flatten(1).norm(dim=1)
    assert report.layer["conv"] == pytest.approx(float(per_sample.mean()), rel=1e-4)
    normalized = (per_sample / (merged.flatten(1).norm(dim=1) + 1e-8)).mean()
    assert report.layer_normalized["conv"] == pytest.approx(float(normalized), rel=1e-4)
    assert report.samples["conv"] == 5 and OUTPUT in report.layer


def test_m_loss_of_a_token_linear_matches_hand_computation():
    torch.manual_seed(0)
    model = _TokenNet()
    base, experts = _experts(model, 4)
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(3, 6, 5, generator=g)]
    report = m_loss(model, experts, data, base=base, output=False)
    z = torch.stack([data[0] @ e["fc1.weight"].T + e["fc1.bias"] for e in experts])  # (K, B, T, d)
    gap, _ = _naive(torch.cat([z[:1], z[1:] - z[:1]]), torch.full((4,), 0.25, dtype=torch.float64), model.act)
    torch.testing.assert_close(report.node["fc1"], gap.pow(2).mean(dim=(0, 1)), rtol=1e-4, atol=1e-8)
    assert report.layer["fc1"] == pytest.approx(float(gap.flatten(1).norm(dim=1).mean()), rel=1e-4)
