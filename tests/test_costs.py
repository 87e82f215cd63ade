"""The XLA cost estimate is sane: wider layers cost more, every test model gets one, fallbacks agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_for_tests import CASES
from reference import FLOAT_SUMS, assert_close

import jaxpipe.costs as costs_module
from jaxpipe import models
from jaxpipe.costs import estimate_costs, estimate_layer_costs, layer_flops
from jaxpipe.layers import split_layers
from jaxpipe.tracing import trace_boundaries


def _costs(layers, x):
    specs, params, _ = split_layers(layers)
    structs = trace_boundaries(specs, params, x)
    return estimate_costs(specs, params, structs[:-1])


def test_wider_linear_costs_more():
    rngs = nnx.Rngs(0)
    costs = _costs(
        [nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 64, rngs=rngs), nnx.Linear(64, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)],
        jax.ShapeDtypeStruct((4, 8), jnp.float32),
    )
    assert costs.shape == (4,) and costs.dtype == np.float64
    assert costs[1] > 4 * costs[0] and costs[2] > 4 * costs[3]
    assert costs[0] < costs[3]  # the same layer, but first: no input gradient


@pytest.mark.parametrize("case_name", ["mlp", "lm", "conv", "dict"])
def test_estimate_costs_positive_and_finite_for_test_models(case_name):
    case = CASES[case_name]
    inputs, _ = case.make_batch(np.random.default_rng(0), 2)
    specs, params, _ = split_layers(nnx.eval_shape(lambda: case.model_fn(nnx.Rngs(0))))
    structs = trace_boundaries(specs, params, inputs)
    costs = estimate_costs(specs, params, structs[:-1])
    assert costs.shape == (len(specs),)
    assert np.all(np.isfinite(costs)) and np.all(costs > 0)
    assert all(layer_flops(s, p, x) is not None for s, p, x in zip(specs, params, structs[:-1]))


class Identity(nnx.Module):
    def __call__(self, x):
        return x


def test_estimate_costs_falls_back_to_parameter_counts(monkeypatch):
    # When XLA gives no estimate for some layer (simulated: the parameter-free
    # layer's estimate is withheld), every layer falls back to parameter count.
    real = costs_module.layer_flops
    monkeypatch.setattr(costs_module, "layer_flops", lambda s, p, x, **kw: None if s.size == 0 else real(s, p, x, **kw))
    costs = _costs([nnx.Linear(4, 4, rngs=nnx.Rngs(0)), Identity()], jax.ShapeDtypeStruct((2, 4), jnp.float32))
    np.testing.assert_array_equal(costs, [4 * 4 + 4 + 1, 1])


def test_estimate_counts_the_forward_of_a_linear_layer():
    """A Linear's backward does not need its output; the forward must still count."""
    linear = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    spec_params = split_layers([linear])
    x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    flops = layer_flops(spec_params[0][0], spec_params[1][0], x)
    assert flops >= 3 * 2 * 32 * 64 * 64  # forward, input-gradient and weight-gradient matmuls


def test_first_layer_backward_leaves_out_the_input_gradient():
    """No executor computes the model input's gradient, so the first of identical dense layers is
    estimated at its forward plus the weight gradient: about half the backward of a middle one
    (dW = x^T g and dx = g W^T cost the same matmul flops)."""
    layers = models.mlp([64] * 5)(nnx.Rngs(0))  # 4 layers; the last has no activation
    specs, params, _ = split_layers(layers)
    structs = trace_boundaries(specs, params, jax.ShapeDtypeStruct((32, 64), jnp.float32))
    forward, backward = estimate_layer_costs(specs, params, structs[:-1])
    assert_close(forward[0], forward[1], FLOAT_SUMS, "forward flops of identical layers")
    assert_close(backward[1], backward[2], FLOAT_SUMS, "backward flops of identical layers")
    assert 0.4 < backward[0] / backward[1] < 0.75, backward


def test_a_stage_saves_its_matmul_outputs_only():
    """3 GELU Dense layers of width 64 (the last without GELU) on 2 devices, 8 rows: a stage's residual
    slot holds each GELU layer's pre-activation, ``[8, 64]`` floats, and nothing for the linear last
    layer, whose backward needs only its input and weights. Saving what ``jax.vjp`` keeps by default
    would add the GELU's elementwise intermediates (several activations per layer)."""
    import optax

    import jaxpipe
    from jaxpipe import models
    from jaxpipe.lanes import make_lanes
    from jaxpipe.tracing import residual_bytes

    rows, width = 8, 64
    batch = tuple(np.ones((2 * rows, width), np.float32) for _ in range(2))
    pipe = jaxpipe.Pipeline(models.mlp([width] * 4), (1, 2), lambda o, t: ((o - t) ** 2).mean(), optax.sgd(0.1),
                            2, batch, schedule="1f1b", partition=(2, 1))
    saved = residual_bytes(pipe.placement.specs[:3], pipe._host_params, pipe._structs)
    assert saved == [4.0 * rows * width] * 2 + [0.0]
    weights = tuple(a[0] for a in pipe.init().params)
    zero_f, zero_i = pipe.placement.carrier.zeros()
    x = batch[0][:rows]
    lanes = make_lanes(pipe.placement, lambda o, t: ((o - t) ** 2).mean(), 0.5, False, None,
                       (weights, zero_f, zero_i, x, x, None))
    assert sum(lanes.res_sizes) == 2 * rows * width
