"""MergeMethod.with_hparams: a validated copy with some hyperparameters changed."""

from __future__ import annotations

import pytest

from merging.methods import available_methods, get_method
from merging.methods.base import _REGISTRY


def test_with_hparams_builds_a_new_validated_method():
    ties = get_method("ties", density=0.4, scope="tensor")
    copy = ties.with_hparams(scaling=0.5)
    assert copy is not ties and type(copy) is type(ties)
    assert (copy.density, copy.scaling, copy.scope) == (0.4, 0.5, "tensor")
    assert ties.scaling == 1.0  # the original is untouched
    with pytest.raises(ValueError, match="density"):
        ties.with_hparams(density=1.5)


def test_with_hparams_refuses_an_unknown_hyperparameter_naming_the_class():
    with pytest.raises(ValueError, match="WeightAveraging .*no scaling hyperparameter"):
        get_method("average").with_hparams(scaling=0.5)


def test_with_hparams_copies_composed_parts():
    mties = get_method("mties", scaling=1.0)
    copy = mties.with_hparams(scaling=0.5)
    assert copy._others.scaling == 0.5 and mties._others.scaling == 1.0


@pytest.mark.parametrize("name", available_methods())
def test_every_method_reads_its_hyperparameters_back(name):
    method = get_method(name, portland="unused") if name == "neulig" else get_method(name)
    copy = method.with_hparams()
    assert repr(copy) == repr(method)
    assert set(type(method).hparam_names()) <= set(vars(method))
    assert type(copy) is _REGISTRY[name]
