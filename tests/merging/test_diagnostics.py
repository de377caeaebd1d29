"""Weight-vs-feature averaging, parameter scaling and templates, checked against their definitions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from merging.diagnostics import (
    average_states,
    class_mean_images,
    collect_outputs,
    ensemble_logits,
    feature_ensemble_logits,
    greedy_selection,
    greedy_soup,
    magnitude_stability,
    minmax,
    scale_state,
    template_mosaic,
    weight_template_report,
    weight_vs_feature_averaging,
)
from merging.state import StateDictError


class Net(nn.Module):
    """body (Linear -> ReLU -> Linear -> ReLU) + head; ``bias=False`` makes it positively homogeneous."""

    def __init__(self, bias: bool = True, bn: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(6, 8, bias=bias)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Linear(8, 5, bias=bias), nn.ReLU())
        self.head = nn.Linear(5, 3, bias=bias)

    def forward(self, x):
        return self.head(self.body(x))


def nets(m: int, bias: bool = True, seed: int = 0, bn: bool = False):
    torch.manual_seed(seed)
    return [Net(bias, bn) for _ in range(m)]


def loader(n: int = 40, seed: int = 1, batch_size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size
    )


def states_of(models):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


# ------------------------------------------------------------------- evaluation


def test_collect_outputs_records_head_input_and_leaves_the_model_alone():
    model = Net(bn=True)
    model.train()
    before = copy.deepcopy(model.state_dict())
    other = states_of(nets(1, bn=True, seed=5))[0]
    out = collect_outputs(model, other, loader())
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reference = nets(1, bn=True, seed=5)[0].eval()
    x = torch.cat([b[0] for b in loader()])
    with torch.no_grad():
        torch.testing.assert_close(out.features, reference.body(x))
        torch.testing.assert_close(out.logits, reference(x))
    assert out.labels.shape == (40,)
    with pytest.raises(ValueError, match="classifier"):
        collect_outputs(model, other, loader(), head="fc")
    with pytest.raises(ValueError, match="no batch"):
        collect_outputs(model, other, [])


def test_ensembles_follow_their_definitions():
    models = nets(3)
    states = states_of(models)
    skeleton = Net()
    data = loader()
    outputs = [collect_outputs(skeleton, s, data) for s in states]
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        torch.testing.assert_close(ensemble_logits(outputs), torch.stack([m.eval()(x) for m in models]).mean(0))
        mean_features = torch.stack([m.body(x) for m in models]).mean(0)
        torch.testing.assert_close(
            feature_ensemble_logits(skeleton, states, outputs, head_choice="first"), models[0].head(mean_features)
        )
        avg_head = nn.Linear(5, 3)
        avg_head.weight.copy_(torch.stack([m.head.weight for m in models]).mean(0))
        avg_head.bias.copy_(torch.stack([m.head.bias for m in models]).mean(0))
        torch.testing.assert_close(
            feature_ensemble_logits(skeleton, states, outputs, head_choice="avg"), avg_head(mean_features)
        )
    with pytest.raises(ValueError, match="head_choice"):
        feature_ensemble_logits(skeleton, states, outputs, head_choice="last")


def test_identical_models_make_every_combination_equal():
    state = states_of(nets(1))[0]
    report = weight_vs_feature_averaging(Net(), [state] * 3, loader(), loader(seed=2))
    acc = report.individual[0]
    assert report.individual == [acc] * 3
    for value in (
        report.uniform_soup,
        report.logit_ensemble,
        report.feature_ensemble_first_head,
        report.feature_ensemble_avg_head,
        report.greedy_soup,
        report.greedy_ensemble,
    ):
        assert value == pytest.approx(acc)
    assert report.soup_ensemble_agreement == 1.0
    assert report.soup_feature_distance == pytest.approx(0.0, abs=1e-6)
    assert report.greedy_soup_members == [0] and report.greedy_ensemble_members == [0]  # nothing strictly improves
    names = [name for name, _ in report.rows()]
    assert "uniform soup" in names and any(n.startswith("greedy soup") for n in names)


def test_weight_vs_feature_without_validation_skips_greedy_and_checks_states():
    states = states_of(nets(2))
    report = weight_vs_feature_averaging(Net(), states, loader())
    assert report.greedy_soup is None and report.greedy_ensemble is None
    assert len(report.rows()) == 6
    broken = dict(states[1])
    broken.pop("head.bias")
    with pytest.raises(StateDictError, match="head.bias"):
        weight_vs_feature_averaging(Net(), [states[0], broken], loader())


def test_greedy_selection_hand_example():
    # candidates visited by validation score: 2 (0.7), 0 (0.6), 1 (0.5)
    gains = {(2, 0): 0.65, (2, 1): 0.8}
    members, best = greedy_selection([0, 1, 2], [0.6, 0.5, 0.7], lambda ms, new: gains[(*ms, new)])
    assert members == [2, 1] and best == 0.8


def test_greedy_soup_rules():
    states = states_of(nets(2, seed=3))
    soup, members = greedy_soup(Net(), states, loader(), rule="mean")
    assert members[0] in (0, 1)
    if members == [members[0]]:
        assert all(torch.equal(soup[k], states[members[0]][k]) for k in soup)
    else:
        expected = average_states(states)
        assert all(torch.allclose(soup[k], expected[k]) for k in soup)
    with pytest.raises(ValueError, match="greedy rule"):
        greedy_soup(Net(), states, loader(), rule="median")


# ------------------------------------------------------------------------ scaling


def test_scaling_a_bias_free_relu_network_keeps_its_predictions():
    state = states_of(nets(1, bias=False))[0]
    c = 100.0
    scaled = scale_state(state, c)
    skeleton = Net(bias=False)
    before, after = collect_outputs(skeleton, state, loader()), collect_outputs(skeleton, scaled, loader())
    # three linear layers: logits scale by c³
    torch.testing.assert_close(after.logits, before.logits * c**3, rtol=1e-4, atol=1e-3)
    assert torch.equal(after.predictions, before.predictions)


def test_scale_state_scales_buffers_and_copies_integers():
    state = states_of(nets(1, bn=True))[0]
    scaled = scale_state(state, 3.0)
    torch.testing.assert_close(scaled["body.1.running_var"], 3.0 * state["body.1.running_var"])
    assert torch.equal(scaled["body.1.num_batches_tracked"], state["body.1.num_batches_tracked"])


def test_magnitude_stability_on_homogeneous_networks():
    states = states_of(nets(3, bias=False, seed=4))
    report = magnitude_stability(Net(bias=False), states, loader(), loader(seed=2), magnitude=100.0)
    rows = {(r.scenario, r.combiner): r for r in report.rows}
    assert rows[("single", "individual")].flip_rate == 0.0
    for combiner in ("soup", "logit", "feature", "greedy_soup"):
        # every member × c: the soup is c × soup, ensembles are scaled ensembles: nothing flips
        assert rows[("all", combiner)].flip_rate == 0.0
        assert rows[("all", combiner)].accuracy == rows[("none", combiner)].accuracy
    norms = [sum(float(v.double().pow(2).sum()) for v in s.values()) ** 0.5 for s in states]
    expected = [100 * norms[0], norms[1], norms[2]]
    assert report.member_norm_share["first_only"] == pytest.approx([n / sum(expected) for n in expected])
    assert sum(report.member_norm_share["all_but_first"]) == pytest.approx(1.0)


def test_a_hugely_scaled_member_dominates_the_soup():
    states = states_of(nets(3, bias=False, seed=6))
    skeleton = Net(bias=False)
    dominated = average_states([scale_state(states[0], 1e6), states[1], states[2]])
    assert torch.equal(
        collect_outputs(skeleton, dominated, loader()).predictions,
        collect_outputs(skeleton, states[0], loader()).predictions,
    )


def test_magnitude_stability_options():
    states = states_of(nets(2))
    report = magnitude_stability(Net(), states, loader(), scenarios=("all",), combiners=("soup", "greedy_soup"))
    assert {(r.scenario, r.combiner) for r in report.rows} == {("none", "soup"), ("all", "soup")}  # no val: no greedy
    with pytest.raises(ValueError, match="unknown"):
        magnitude_stability(Net(), states, loader(), scenarios=("half",))


# ---------------------------------------------------------------------- templates


def test_weight_template_report_hand_example():
    weight = torch.tensor([[0.0, 1.0, 2.0, 4.0], [4.0, 2.0, 1.0, 0.0]])
    means = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    report = weight_template_report(weight, (1, 2, 2), means, pairs=[(0, 1)])
    torch.testing.assert_close(report.templates[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert report.templates.shape == (2, 1, 2, 2)
    # centred means: ±(−.5, −.5, .5, .5); ⟨(0,1,2,4), (−.5,−.5,.5,.5)⟩ = 2.5, norms √21 and 1
    expected = 2.5 / 21**0.5
    torch.testing.assert_close(report.class_cosine, torch.tensor([expected, expected]))
    # 0.5·w_0 + 0.5·w_1 = (2, 1.5, 1.5, 2), stretched to (1, 0, 0, 1)
    torch.testing.assert_close(report.mixups[(0, 1)], torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    linear = nn.Linear(4, 2)
    assert weight_template_report(linear, (4,)).templates.shape == (2, 4)
    with pytest.raises(ValueError, match="img_shape"):
        weight_template_report(weight, (1, 3, 3))
    with pytest.raises(ValueError, match="outside"):
        weight_template_report(weight, (4,), pairs=[(0, 2)])
    with pytest.raises(ValueError, match="class_means"):
        weight_template_report(weight, (4,), class_means=torch.zeros(3, 4))


def test_minmax_class_means_and_mosaic():
    out = minmax(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    torch.testing.assert_close(
        class_mean_images(x, torch.tensor([0, 0, 1]), 2), torch.tensor([[2.0, 3.0], [10.0, 0.0]])
    )
    with pytest.raises(ValueError, match=r"\[2\]"):
        class_mean_images(x, torch.tensor([0, 0, 1]), 3)
    mosaic = template_mosaic([[torch.zeros(1, 2, 2)] * 3, [torch.zeros(1, 2, 2)]])
    assert mosaic.shape == (1, 6, 9)
    assert float(mosaic[0, 3:5, 3:5].min()) == 1.0  # a missing tile stays white
