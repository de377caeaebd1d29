"""NeuLig maths: Portland, ε*, the joint loss, CoopVec merges and the inference modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from merging.models import build_backbone
from merging.neulig import (
    FeatureBatch,
    Portland,
    alignment_residual,
    concat_features,
    coopvec_ensemble,
    coopvec_map,
    coopvec_merge,
    coopvec_statistics,
    expert_features,
    mean_coopvec,
    merged_features,
    modified_offsets,
    neulig_forward,
    neulig_loss,
    offset_scalars,
    prediction_entropy,
    standardize_offsets,
    summarize_coopvec,
    train_portland,
)
from merging.state import StateDictError


def make_experts(k: int, seed: int = 0, in_features: int = 8, hidden: int = 6, scale: float = 0.3):
    """A tiny MLP skeleton and K experts = base + seeded perturbations."""
    gen = torch.Generator().manual_seed(seed)
    skeleton = build_backbone("mlp", in_features=in_features, hidden=hidden, depth=2).eval()
    base = {key: v.detach().clone() for key, v in skeleton.state_dict().items()}
    experts = [
        {key: v + scale * torch.randn(v.shape, generator=gen) for key, v in base.items()} for _ in range(k)
    ]
    return skeleton, experts


def constant_portland(coopvec: torch.Tensor, num_features: int) -> Portland:
    """A Portland whose output is ``coopvec`` for every input (W = 0, b = log coopvec)."""
    portland = Portland(num_features, coopvec.numel())
    with torch.no_grad():
        portland.fc.weight.zero_()
        portland.fc.bias.copy_(coopvec.log())
    return portland


# --------------------------------------------------------------------------- Portland


def test_portland_outputs_lie_on_the_simplex():
    gen = torch.Generator().manual_seed(1)
    portland = Portland(num_features=5, num_experts=3, generator=gen)
    z = 10 * torch.randn(64, 15, generator=gen)
    beta = portland(z)
    assert beta.shape == (64, 3)
    assert bool((beta >= 0).all())
    torch.testing.assert_close(beta.sum(dim=1), torch.ones(64))


def test_portland_init_is_seeded_and_follows_linear_default_law():
    a = Portland(4, 3, generator=torch.Generator().manual_seed(7))
    b = Portland(4, 3, generator=torch.Generator().manual_seed(7))
    c = Portland(4, 3, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a.fc.weight, b.fc.weight)
    torch.testing.assert_close(a.fc.bias, b.fc.bias)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    bound = 1 / math.sqrt(12)
    assert float(a.fc.weight.detach().abs().max()) <= bound and float(a.fc.bias.detach().abs().max()) <= bound
    assert a.fc.weight.shape == (3, 12)


def test_portland_rejects_wrong_feature_size():
    portland = Portland(4, 3)
    with pytest.raises(ValueError, match=r"\(B, K·d\) = \(B, 12\)"):
        portland(torch.zeros(2, 11))


def test_concat_features_is_expert_major():
    features = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (K, B, d)
    z = concat_features(features)
    assert z.shape == (3, 8)
    torch.testing.assert_close(z[1, :4], features[0, 1])
    torch.testing.assert_close(z[1, 4:], features[1, 1])


# --------------------------------------------------------------------------- offsets ε*


def test_offset_scalars_hand_example():
    # sums 3, 7, 14 -> o = (-5, -1, 6); unbiased std = sqrt(62 / 2)
    thetas = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    expected = torch.tensor([-5.0, -1.0, 6.0], dtype=torch.float64) / math.sqrt(31.0)
    torch.testing.assert_close(offset_scalars(thetas), expected)


def test_modified_offsets_streams_like_flattened_sorted_keys():
    _, experts = make_experts(4, seed=3)
    for e in experts:
        e["counter"] = torch.tensor(5, dtype=torch.long)  # non-float entries are skipped
    flat = torch.stack(
        [torch.cat([e[key].flatten() for key in sorted(e) if e[key].is_floating_point()]) for e in experts]
    )
    torch.testing.assert_close(modified_offsets(experts), offset_scalars(flat))
    eps = modified_offsets(experts)
    assert abs(float(eps.mean())) < 1e-12 and abs(float(eps.std()) - 1.0) < 1e-12


def test_identical_experts_give_zero_offsets_and_one_expert_is_refused():
    _, experts = make_experts(1)
    torch.testing.assert_close(modified_offsets(experts * 3), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="K >= 2"):
        modified_offsets(experts)
    with pytest.raises(ValueError, match="K >= 2"):
        standardize_offsets(torch.tensor([1.0]))


def test_modified_offsets_names_mismatched_key():
    _, experts = make_experts(2)
    experts[1] = {("renamed" if i == 0 else key): v for i, (key, v) in enumerate(experts[1].items())}
    with pytest.raises(StateDictError, match="expert 1"):
        modified_offsets(experts)


def test_k2_alignment_term_is_half_squared_coopvec_difference():
    _, experts = make_experts(2, seed=5)
    eps_star = modified_offsets(experts)
    torch.testing.assert_close(eps_star.abs(), torch.full((2,), 1 / math.sqrt(2), dtype=torch.float64))
    beta = F.softmax(torch.randn(32, 2, generator=torch.Generator().manual_seed(0)), dim=1).double()
    logits = torch.zeros(32, 3, dtype=torch.float64)
    l_a = neulig_loss(logits, alignment_residual(beta, eps_star), alignment="semi").alignment
    torch.testing.assert_close(l_a, ((beta[:, 0] - beta[:, 1]) ** 2 / 2).mean())


# --------------------------------------------------------------------------- loss


def test_sup_loss_is_cross_entropy_plus_scaled_alignment():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    reg = torch.tensor([0.5, -1.5])
    loss = neulig_loss(logits, reg, target, alignment="sup", scaling=100.0)
    ce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert loss.task.item() == pytest.approx(ce, rel=1e-6)
    assert loss.alignment.item() == pytest.approx((0.25 + 2.25) / 2)
    assert loss.total.item() == pytest.approx(ce + 1.25 / 100, rel=1e-6)
    no_align = neulig_loss(logits, reg, target, alignment="sup", scaling=math.inf)
    assert no_align.total.item() == pytest.approx(ce, rel=1e-6)


def test_semi_loss_is_entropy_and_ignores_labels():
    logits = torch.zeros(3, 2)
    expected = -math.log(0.5 + 1e-6)  # -2 * 0.5 * log(0.5 + 1e-6)
    assert prediction_entropy(logits).item() == pytest.approx(expected, rel=1e-6)
    a = neulig_loss(logits, torch.zeros(3), torch.tensor([0, 1, 1]), alignment="semi")
    b = neulig_loss(logits, torch.zeros(3), None, alignment="semi")
    assert a.total.item() == b.total.item() == pytest.approx(expected, rel=1e-6)


def test_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="needs labels"):
        neulig_loss(torch.zeros(2, 2), torch.zeros(2), None, alignment="sup")
    with pytest.raises(ValueError, match="scaling must be > 0"):
        neulig_loss(torch.zeros(2, 2), torch.zeros(2), None, alignment="semi", scaling=0.0)
    with pytest.raises(ValueError, match="'sup' or 'semi'"):
        neulig_loss(torch.zeros(2, 2), torch.zeros(2), None, alignment="unsup")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- branches


def test_expert_features_match_loaded_modules_and_ensemble_matches_loop():
    skeleton, experts = make_experts(3, seed=2)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    features = expert_features(skeleton, experts, x)
    for k, e in enumerate(experts):
        module = build_backbone("mlp", in_features=8, hidden=6, depth=2)
        module.load_state_dict(e)
        torch.testing.assert_close(features[k], module(x))
    beta = F.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(9)), dim=1)
    loop = torch.stack([sum(beta[b, k] * features[k, b] for k in range(3)) for b in range(5)])
    torch.testing.assert_close(coopvec_ensemble(features, beta), loop)


def test_neulig_forward_trains_only_portland():
    skeleton, experts = make_experts(3)
    head = nn.Linear(6, 4)
    portland = Portland(6, 3, generator=torch.Generator().manual_seed(0))
    eps = modified_offsets(experts)
    out = neulig_forward(skeleton, experts, head, portland, eps, torch.randn(7, 8))
    assert out.logits.shape == (7, 4) and out.beta.shape == (7, 3) and out.reg.shape == (7,)
    assert out.features.shape == (3, 7, 6) and not out.features.requires_grad
    torch.testing.assert_close(out.reg, out.beta @ eps.float())
    neulig_loss(out.logits, out.reg, torch.zeros(7, dtype=torch.long)).total.backward()
    assert portland.fc.weight.grad is not None and float(portland.fc.weight.grad.abs().sum()) > 0


def test_coopvec_merge_properties():
    _, experts = make_experts(3, seed=6)
    for e in experts:
        e["steps"] = torch.tensor(3, dtype=torch.long)
    one_hot = coopvec_merge(experts, torch.tensor([0.0, 1.0, 0.0]))
    for key in experts[1]:
        torch.testing.assert_close(one_hot[key], experts[1][key])
    uniform = coopvec_merge(experts, torch.full((3,), 1 / 3))
    for key, value in experts[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(uniform[key], torch.stack([e[key] for e in experts]).mean(0))
    assert uniform["steps"].dtype == torch.long and int(uniform["steps"]) == 3
    half = [{k: v.half() if v.is_floating_point() else v for k, v in e.items()} for e in experts]
    assert coopvec_merge(half, torch.full((3,), 1 / 3))["layers.0.weight"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        coopvec_merge(experts, torch.ones(2))


def test_modes_agree_when_coopvec_is_constant():
    skeleton, experts = make_experts(3, seed=11)
    coopvec = torch.tensor([0.2, 0.5, 0.3])
    portland = constant_portland(coopvec, 6)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    beta = portland(concat_features(expert_features(skeleton, experts, x)))
    torch.testing.assert_close(beta, coopvec.expand(6, 3))
    beta_bar = mean_coopvec(portland, skeleton, experts, [x[:4], (x[4:], torch.zeros(2))])
    torch.testing.assert_close(beta_bar, coopvec.double())
    first = merged_features(skeleton, experts, x, beta, "per_batch_first")
    exact = merged_features(skeleton, experts, x, beta, "per_sample")
    static = merged_features(skeleton, experts, x, beta_bar, "static")
    torch.testing.assert_close(first, exact)
    torch.testing.assert_close(first, static)


def test_modes_differ_when_coopvec_varies_and_one_hot_merge_equals_ensemble():
    skeleton, experts = make_experts(2, seed=12)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    beta = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    features = expert_features(skeleton, experts, x)
    exact = merged_features(skeleton, experts, x, beta, "per_sample")
    first = merged_features(skeleton, experts, x, beta, "per_batch_first")
    # one-hot CoopVecs: the merged model of each sample is its expert, as is the ensemble
    torch.testing.assert_close(exact, coopvec_ensemble(features, beta))
    torch.testing.assert_close(first, features[0])
    assert not torch.allclose(first[1], exact[1])


def test_merged_features_rejects_bad_beta_and_mode():
    skeleton, experts = make_experts(2)
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="β̄ of shape"):
        merged_features(skeleton, experts, x, torch.full((3, 2), 0.5), "static")
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        merged_features(skeleton, experts, x, torch.full((2,), 0.5), "per_sample")
    with pytest.raises(ValueError, match="unknown NeuLig merge mode"):
        merged_features(skeleton, experts, x, torch.full((3, 2), 0.5), "global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration set is empty"):
        mean_coopvec(Portland(6, 2), skeleton, experts, [])


# --------------------------------------------------------------------------- CoopVec map


def test_coopvec_statistics_hand_example():
    beta = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.5, 0.5]])
    task = torch.tensor([0, 0, 1, 1])
    summary = summarize_coopvec(*coopvec_statistics(beta, task, num_tasks=3))
    torch.testing.assert_close(summary.mean_coopvec[:2].float(), torch.tensor([[0.65, 0.35], [0.35, 0.65]]))
    # argmax of a tie (0.5, 0.5) is expert 0, not task 1's expert
    torch.testing.assert_close(summary.argmax_rate[:2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    h = lambda p: -sum(v * math.log(v) for v in p)  # noqa: E731
    expected = torch.tensor([(h([0.9, 0.1]) + h([0.4, 0.6])) / 2, (h([0.2, 0.8]) + h([0.5, 0.5])) / 2])
    torch.testing.assert_close(summary.entropy[:2].float(), expected)
    assert summary.count.tolist() == [2.0, 2.0, 0.0] and bool(summary.argmax_rate[2].isnan())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        coopvec_statistics(beta, task + 1, num_tasks=2)


def test_coopvec_map_collects_every_sample_with_its_task():
    skeleton, experts = make_experts(2)
    portland = Portland(6, 2, generator=torch.Generator().manual_seed(0))
    beta, task = coopvec_map(portland, skeleton, experts, [(0, torch.randn(3, 8)), (1, (torch.randn(2, 8), None))])
    assert beta.shape == (5, 2) and task.tolist() == [0, 0, 0, 1, 1]


# --------------------------------------------------------------------------- training


def digits_tasks(per_task: int = 120):
    """Two digits tasks (0-4 and 5-9 as 5-way problems), inputs scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    low, high = (y < 5).nonzero().flatten()[:per_task], (y >= 5).nonzero().flatten()[:per_task]
    return [(x[low], y[low]), (x[high], y[high] - 5)]


def fit_expert(skeleton: nn.Module, x, y, seed: int, steps: int = 60):
    """Fine-tune a copy of the skeleton's weights and a head on one task (full batch)."""
    torch.manual_seed(seed)
    model = build_backbone("mlp", in_features=64, hidden=16, depth=2)
    model.load_state_dict(skeleton.state_dict())
    head = nn.Linear(16, 5)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(model(x)), y).backward()
        opt.step()
    head.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, head


@pytest.fixture(scope="module")
def digits_experts():
    torch.manual_seed(0)
    skeleton = build_backbone("mlp", in_features=64, hidden=16, depth=2).eval()
    tasks = digits_tasks()
    fitted = [fit_expert(skeleton, x, y, seed=t) for t, (x, y) in enumerate(tasks)]
    return skeleton, tasks, [e for e, _ in fitted], [h for _, h in fitted]


@pytest.mark.parametrize(("alignment", "ratio"), [("sup", 0.5), ("semi", 0.95)])
def test_training_lowers_joint_loss_on_digits(digits_experts, alignment, ratio):
    # semi starts near its floor: the experts' own heads are already confident
    skeleton, tasks, experts, heads = digits_experts
    eps = modified_offsets(experts)
    batches = []
    for start in range(0, 120, 40):  # round-robin over tasks, as the code
        for t, (x, y) in enumerate(tasks):
            feats = expert_features(skeleton, experts, x[start : start + 40])
            batches.append(FeatureBatch(feats, t, y[start : start + 40] if alignment == "sup" else None))
    portland = constant_portland(torch.tensor([0.5, 0.5]), 16)  # starts without routing
    history = train_portland(portland, heads, eps, batches, epochs=40, lr=2e-2, alignment=alignment)
    assert history[-1] < ratio * history[0]
    assert all(h.weight.grad is None for h in heads)  # heads stay frozen though they require grad
