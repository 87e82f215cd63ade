"""Mixed precision: bfloat16 compute, float32 master parameters.

The pipeline with ``compute_dtype=jnp.bfloat16`` is compared with the
single-device reference making the same casts (``reference_run(...,
compute_dtype=...)``: parameters and every layer's float inputs in bfloat16,
the model output widened to float32 for the loss, float32 parameters and
optimizer). Both round to bfloat16, but not at the same places: XLA keeps a
fused chain of bfloat16 ops in float32 and rounds once at the end (its
default ``xla_allow_excess_precision``), and it fuses the pipeline's stages
(inside a scan and a switch) differently from the reference's straight-line
program. (With ``--xla_allow_excess_precision=false`` the transformer's first
loss agrees to 1e-7 and its gradient to 0.3%; with the default, 1e-3 and
3%.) Tolerances, from bfloat16's unit roundoff ``u = 2**-8 = 3.9e-3`` (8
significant bits; the values are ``reference.BFLOAT16_*``):

* losses: rtol ``2e-2`` (~5u). The loss is a mean; each rounding moves it by
  at most u relatively, and steps 2-3 add the effect of parameters that
  differ by the gradient tolerance below times the learning rate.
* first-step gradients: relative L2 error (all layers together) ``2**-4``
  (16u). A gradient element goes through O(100) roundings on its way back
  through 8 layers (the transformer: ~25 per block, forward and backward);
  as a random walk that is ~sqrt(100) * u / sqrt(3) ~ 6u. A wrong gradient
  (a micro-batch missing: >= 1/8 of it; wrong scale or device: ~100%) is
  larger.
* parameters after 3 SGD-momentum steps: absolute
  ``lr * (1 + 1.9 + 2.71) * 16u * max|g|``: the three updates weigh the
  gradients by these momentum sums, each gradient off by at most 16u.

That the casts really happen is checked directly: the boundary buffers and
everything the tick loop carries between devices are bfloat16, the master
parameters, gradients and optimizer state float32, and (except for the
transformer, whose excess-precision differences are as large as the
bfloat16-float32 gap of its loss) the first step's loss is closer to the
bfloat16 reference than to the uncast float32 model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_for_tests import CASES, batches
from reference import (
    BFLOAT16_GRAD_L2,
    BFLOAT16_LOSS,
    BFLOAT16_PARAMS,
    Tolerance,
    assert_matches_reference,
    reference_run,
)

import jaxpipe

LR, MOMENTUM = 0.05, 0.9
OPTIMIZER = optax.sgd(LR, momentum=MOMENTUM)
ROWS_PER_MICROBATCH = 2


@functools.lru_cache(maxsize=None)
def _reference(case_name, rows):
    case = CASES[case_name]
    return reference_run(case.model_fn, batches(case, rows), case.loss_fn, OPTIMIZER, compute_dtype=jnp.bfloat16)


def _param_tolerance(rtol, grads):
    """``rtol`` plus the gradient tolerance's share of 3 SGD-momentum updates as atol (module docstring)."""
    momentum_sum = 1 + (1 + MOMENTUM) + (1 + MOMENTUM + MOMENTUM**2)
    atol = LR * momentum_sum * BFLOAT16_GRAD_L2 * np.abs(_flat(grads)).max()
    return Tolerance(rtol, atol, "each of 3 updates moves a parameter by lr x a gradient off by BFLOAT16_GRAD_L2")


def _flat(trees):
    return np.concatenate([np.asarray(leaf, np.float32).ravel() for leaf in jax.tree.leaves(trees)])


def _scans(jaxpr):
    """Every ``scan`` equation in a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _scans(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _scans(sub)


def _tick_carry(pipe, params, batch):
    """The avals the pipeline's tick loops (forward and, with autodiff, its transpose) carry."""
    placed = pipe.shard_batch(batch)
    closed = jax.make_jaxpr(lambda p: pipe.loss_and_grad(p, placed))(params)
    return [
        v.aval
        for scan in _scans(closed.jaxpr)
        for v in scan.invars[scan.params["num_consts"] : scan.params["num_consts"] + scan.params["num_carry"]]
    ]


def _float32_loss(case, batch):
    """The first step's loss with no casts at all (plain Flax, eager)."""
    h, targets = batch
    for layer in case.model_fn(nnx.Rngs(0)):
        h = layer(h)
    return float(case.loss_fn(h, targets))


CONFIGS = [
    ("lm", (2, 4), 2, dict(schedule="1f1b")),
    ("conv", (1, 4), 4, dict(schedule="balanced")),
    ("dict", (2, 2), 2, dict(executor="autodiff")),
]


@pytest.mark.parametrize("case_name,mesh,m,options", CONFIGS, ids=str)
def test_bfloat16_compute_matches_reference_with_same_casts(case_name, mesh, m, options):
    case = CASES[case_name]
    rows = mesh[0] * m * ROWS_PER_MICROBATCH
    data = batches(case, rows)
    ref_losses, ref_grads, ref_params = _reference(case_name, rows)
    pipe = jaxpipe.Pipeline(
        case.model_fn, mesh, case.loss_fn, OPTIMIZER, m, data[0], compute_dtype=jnp.bfloat16, **options
    )
    assert pipe.compute_dtype == jnp.bfloat16 and pipe.param_dtype == jnp.float32
    assert pipe.placement.carrier.float_dtype == jnp.bfloat16
    assert pipe.placement.sends_ints == (case_name == "dict")  # token ids cross devices beside bf16
    state = pipe.init()

    # What the tick loop carries: activations and their gradients (stash,
    # inbox, arrivals: [..., B, F]) are bfloat16; so are the saved residuals
    # (all other arrays but the float32 loss sum [] and gradient stacks),
    # except what a layer computes in float32 itself (flax's LayerNorm keeps
    # its statistics in float32).
    carry = [a for a in _tick_carry(pipe, state.params, data[0]) if jnp.issubdtype(a.dtype, jnp.floating)]
    boundary = (ROWS_PER_MICROBATCH, pipe.placement.carrier.float_width)
    accumulators = {()} | set(pipe.placement.stacks.shapes)
    assert {a.dtype for a in carry if a.shape[-2:] == boundary} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in carry if a.shape in accumulators} == {jnp.dtype(jnp.float32)}
    residuals = {a.dtype for a in carry if a.shape[-2:] != boundary and a.shape not in accumulators}
    assert residuals == (set() if pipe.executor == "autodiff" else {jnp.dtype(jnp.bfloat16)}) | (
        {jnp.dtype(jnp.float32)} if case_name == "lm" else set()
    )

    losses, grads = [], None
    for batch in data:
        state, loss = pipe.train_step(state, batch)
        losses.append(float(loss))
        if grads is None:  # SGD momentum's trace after one step is that step's gradient
            grads = pipe.to_layers(state)[1][0].trace
    assert {a.dtype for a in state.params} == {jnp.dtype(jnp.float32)}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state))

    no_casts = _float32_loss(case, data[0])
    closer = abs(losses[0] - ref_losses[0]) < abs(losses[0] - no_casts)
    assert case_name == "lm" or closer, f"first loss {losses[0]}: reference {ref_losses[0]}, no casts {no_casts}"
    got, want = _flat(grads), _flat(ref_grads)
    error = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert error < BFLOAT16_GRAD_L2, f"first-step gradient relative L2 error {error:.4f} >= {BFLOAT16_GRAD_L2:.4f}"
    assert_matches_reference(losses, ref_losses, _flat(pipe.from_stacks(state.params)), _flat(ref_params),
                             loss_tolerance=BFLOAT16_LOSS, param_tolerance=_param_tolerance(0.0, ref_grads))


def test_bfloat16_master_parameters_through_train():
    """``param_dtype=jnp.bfloat16``: parameters and optimizer state are stored in bfloat16.

    The reference keeps its parameters in bfloat16 too. Each update rounds
    the new parameters to bfloat16 (half an ulp, u relatively); two runs
    whose gradients differ slightly may round to neighbouring values, up to
    one ulp (2u) apart per step: rtol ``3 * 2u`` over three steps, plus the
    gradient tolerance's share (atol as above).
    """
    case = CASES["mlp"]
    data = batches(case, 4)
    ref_losses, ref_grads, ref_params = reference_run(
        case.model_fn, data, case.loss_fn, OPTIMIZER, param_dtype=jnp.bfloat16
    )
    result = jaxpipe.train(
        case.model_fn, (1, 2), data=data, loss_fn=case.loss_fn, optimizer=OPTIMIZER, steps=3,
        num_microbatches=2, param_dtype=jnp.bfloat16, progress=False,
    )
    pipe, state = result.pipeline, result.state
    assert pipe.param_dtype == jnp.bfloat16 and pipe.compute_dtype is None
    assert {a.dtype for a in state.params} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(state.opt_state)} == {jnp.dtype(jnp.bfloat16)}
    assert_matches_reference(result.losses, ref_losses, _flat(pipe.from_stacks(state.params)), _flat(ref_params),
                             loss_tolerance=BFLOAT16_LOSS,
                             param_tolerance=_param_tolerance(BFLOAT16_PARAMS.rtol, ref_grads))


def test_float32_compute_dtype_changes_nothing():
    """On float32 layers ``compute_dtype=jnp.float32`` traces the same program as no casts."""
    case = CASES["mlp"]
    data = batches(case, 4)
    programs = []
    for dtype in (None, jnp.float32):
        pipe = jaxpipe.Pipeline(case.model_fn, (1, 2), case.loss_fn, OPTIMIZER, 2, data[0], compute_dtype=dtype)
        placed = pipe.shard_batch(data[0])
        programs.append(str(jax.make_jaxpr(lambda p: pipe.loss_and_grad(p, placed))(pipe.init().params)))
    assert programs[0] == programs[1]


@pytest.mark.parametrize(
    "option,value,error,match",
    [
        ("compute_dtype", "float33", TypeError, "compute_dtype must be a floating dtype.*'float33'"),
        ("compute_dtype", jnp.int32, ValueError, "compute_dtype must be a floating dtype.*int32"),
        ("param_dtype", 3, TypeError, "param_dtype must be a floating dtype.*got 3"),
        ("param_dtype", object, ValueError, "param_dtype must be a floating dtype.*got object"),
        ("param_dtype", jnp.complex64, ValueError, "param_dtype must be a floating dtype.*complex64"),
        ("param_dtype", jnp.float64, ValueError, "param_dtype=float64 needs .*jax_enable_x64"),
    ],
)
def test_bad_dtype_is_named(option, value, error, match):
    case = CASES["mlp"]
    with pytest.raises(error, match=match):
        jaxpipe.Pipeline(case.model_fn, (1, 2), case.loss_fn, OPTIMIZER, 2, batches(case, 4)[0], **{option: value})
