"""MuDSC alignment: permutation specs per model family, similarities, solvers, application.

Pure tensor maths (no Lightning). The merge method built on it is
:class:`merging.methods.mudsc.MuDSC` (registered as ``"mudsc"``).
"""

from merging.alignment.apply import (
    check_model_keys,
    merge_state_dicts,
    permute_state_dict,
    random_permutations,
    reset_batchnorm,
    transform_tensor,
)
from merging.alignment.builders import build_spec, cnn_spec, mlp_spec, resnet_spec, vit_spec
from merging.alignment.matching import MatchConfig, MatchResult, match_models
from merging.alignment.repair import repair_sites, repair_state, repair_targets, unit_moments, variance_ratios
from merging.alignment.similarity import (
    CorrelationStats,
    activation_corr,
    combine_similarity,
    pearson_from_sums,
    row_correlation,
    weight_corr,
)
from merging.alignment.solvers import (
    UnitMatching,
    identity_matching,
    match_groups,
    permutation_matching,
    solve_align,
    solve_group_align,
    solve_group_zip,
    solve_node,
    solve_zip,
)
from merging.alignment.spec import ActPoint, PermEntry, PermNode, PermSpec, PermSpecError

__all__ = [
    "ActPoint",
    "CorrelationStats",
    "MatchConfig",
    "MatchResult",
    "PermEntry",
    "PermNode",
    "PermSpec",
    "PermSpecError",
    "UnitMatching",
    "activation_corr",
    "build_spec",
    "check_model_keys",
    "cnn_spec",
    "combine_similarity",
    "identity_matching",
    "match_groups",
    "match_models",
    "merge_state_dicts",
    "mlp_spec",
    "pearson_from_sums",
    "permutation_matching",
    "permute_state_dict",
    "random_permutations",
    "repair_sites",
    "repair_state",
    "repair_targets",
    "reset_batchnorm",
    "resnet_spec",
    "row_correlation",
    "solve_align",
    "solve_group_align",
    "solve_group_zip",
    "solve_node",
    "solve_zip",
    "transform_tensor",
    "unit_moments",
    "variance_ratios",
    "vit_spec",
    "weight_corr",
]
