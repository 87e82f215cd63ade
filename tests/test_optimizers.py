"""The user's optax transformation is applied exactly as to the per-layer tree.

Every optimizer below is compared with plain single-device training
(``tests/reference.py``, optax on the list of per-layer ``nnx.State``) on a
balanced plan with a split layer on mesh (1, 4) (a split layer's update
happens once, not per copy), and adafactor also on (2, 4), within
``reference.FLOAT32_LOSS`` and ``FLOAT32_PARAMS`` (the pipeline sums
micro-batch gradients in another order). These optimizers look at leaf shapes (adafactor's factoring, Muon's
matrices), whole leaves (LAMB's trust ratio), paths (masks) or couple all
leaves (global-norm clipping); on the first, flat-row layout adafactor and
LAMB lost by step 2 and a mask saw one ``[P, N]`` array.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from models_for_tests import CASES, batches
from reference import assert_trains_like_reference, reference_run

import jaxpipe

ROWS = 2


def _not_bias(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: "bias" not in jax.tree_util.keystr(path), params)


def _mask_tree(case):
    from flax import nnx
    layers = case.model_fn(nnx.Rngs(0))
    return [_not_bias(nnx.split(layer, nnx.Param, ...)[1]) for layer in layers]


OPTIMIZERS = {
    "adamw_mask_fn": lambda case: optax.adamw(3e-2, weight_decay=0.5, mask=_not_bias),
    "adamw_mask_tree": lambda case: optax.adamw(3e-2, weight_decay=0.5, mask=_mask_tree(case)),
    "adafactor": lambda case: optax.adafactor(3e-2, min_dim_size_to_factor=4),
    "lamb": lambda case: optax.lamb(3e-2),
    "clip_adam": lambda case: optax.chain(optax.clip_by_global_norm(0.05), optax.adam(3e-2)),
    "multisteps": lambda case: optax.MultiSteps(optax.adam(3e-2), every_k_schedule=2),
}
if hasattr(optax, "contrib") and hasattr(optax.contrib, "muon"):
    OPTIMIZERS["muon"] = lambda case: optax.contrib.muon(3e-2)

# Mesh (1, 4) is run as the balanced plan (1F1B order with a layer split by rows, a superset of
# plain 1F1B on (1, 4)); (2, 4) adds data replicas.
PLANS = {
    "2x4": dict(mesh=(2, 4), m=4, options=dict(schedule="gpipe")),
    "balanced": dict(mesh=(1, 4), m=4, options=dict(schedule="balanced")),
}


@functools.lru_cache(maxsize=None)
def _reference(case_name, opt_name, rows):
    case = CASES[case_name]
    return reference_run(case.model_fn, batches(case, rows), case.loss_fn, OPTIMIZERS[opt_name](case))


# Every optimizer on the balanced plan; on (2, 4) those whose exactness depends on how layers
# are grouped on devices (a shape-factored state, per-leaf norms, a global norm).
CONFIGS = [(name, "balanced") for name in OPTIMIZERS] + [
    (name, "2x4") for name in ("adafactor",) if name in OPTIMIZERS]
# Global-norm clipping (the whole-tree mode) on (2, 4) is in tests/test_tied.py.


@pytest.mark.parametrize("opt_name, plan", CONFIGS)
def test_optimizer_matches_reference(opt_name, plan):
    case = CASES["mlp"]
    mesh, m, options = PLANS[plan]["mesh"], PLANS[plan]["m"], PLANS[plan]["options"]
    rows = mesh[0] * m * ROWS
    data = batches(case, rows)
    ref_losses, _, ref_params = _reference("mlp", opt_name, rows)
    pipe = jaxpipe.Pipeline(case.model_fn, mesh, case.loss_fn, OPTIMIZERS[opt_name](case), m, data[0], **options)
    if plan == "balanced":
        assert pipe.placement.num_layers < len(pipe.placement.copy_layer), "the balanced plan must split a layer"
    assert_trains_like_reference(pipe, data, ref_losses, ref_params)


def test_mode_follows_coupling():
    """Leaf-local transformations run per device; global-norm clipping couples devices."""
    case = CASES["mlp"]
    data = batches(case, 8)
    modes = {
        name: jaxpipe.Pipeline(case.model_fn, (1, 4), case.loss_fn, OPTIMIZERS[name](case), 4, data[0]).optimizer_mode
        for name in ("adamw_mask_fn", "lamb", "multisteps", "clip_adam")
    }
    assert modes == {"adamw_mask_fn": "per device", "lamb": "per device", "multisteps": "per device",
                     "clip_adam": "whole tree"}


def test_to_layers_is_optax_state_of_the_layer_tree():
    """``to_layers`` gives exactly the state optax builds for the reference's per-layer tree."""
    case = CASES["mlp"]
    data = batches(case, 8)
    opt = optax.adafactor(3e-2, min_dim_size_to_factor=4)
    pipe = jaxpipe.Pipeline(case.model_fn, (1, 4), case.loss_fn, opt, 4, data[0], schedule="balanced")
    params, opt_state, _ = pipe.to_layers(pipe.init())
    want = opt.init(params)
    assert jax.tree.structure(opt_state) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
