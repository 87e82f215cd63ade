"""The single-device reference every pipeline result is checked against.

Plain Flax + optax: the layers applied one after the other to the whole global
batch, the optimizer applied to the per-layer parameter trees. It shares no
code with the executor, so a bug there cannot hide here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def _floats_to(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _with_keys(rest, seed, step, block, layer):
    """Layer ``layer``'s RNG streams for row block ``block`` of step ``step``, as jaxpipe documents them."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), block), layer)
    flat, j = [], 0
    for path, var in nnx.to_flat_state(rest):
        if isinstance(var, nnx.RngKey):
            var, j = var.replace(value=jax.random.fold_in(key, j)), j + 1
        elif isinstance(var, nnx.RngCount):
            var = var.replace(value=jnp.zeros((), jnp.uint32))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def reference_run(model_fn, batches, loss_fn, optimizer, seed=0, microbatches=1, param_dtype=None,
                  compute_dtype=None, rng_keys=False):
    """Trains on ``batches`` (one step each); returns (losses, grads of step 0, params).

    ``grads`` and ``params`` are lists of per-layer ``nnx.State``. With
    ``microbatches=k`` the loss is the mean over k contiguous row blocks
    (needed only for layers that mix rows, whose output depends on the
    grouping); otherwise the whole batch goes through at once.

    Mixed precision, written out as flax/optax users do it: the parameters
    and optimizer state are kept in ``param_dtype`` (default: as built);
    with ``compute_dtype`` the loss casts the parameters and every layer's
    float inputs to it, and widens float outputs narrower than float32 to
    float32 before ``loss_fn``. Gradients come back through the casts in
    ``param_dtype``.

    With ``rng_keys`` the layers' RNG streams (dropout) are set for every
    step, row block (of ``microbatches``) and layer from the key
    ``key(seed) -> fold_in(step) -> fold_in(block) -> fold_in(layer)``,
    stream ``j`` ``fold_in(., j)`` with count 0, as jaxpipe documents; the
    blocks must then have the pipeline's rows per micro-batch.
    """
    layers = model_fn(nnx.Rngs(seed))
    parts = [nnx.split(layer, nnx.Param, ...) for layer in layers]
    params = [p for _, p, _ in parts]
    if param_dtype is not None:
        params = _floats_to(params, param_dtype)

    def full_loss(params, x, y, step, block):
        h = x
        if compute_dtype is not None:
            params = _floats_to(params, compute_dtype)
        for layer, ((graphdef, _, rest), p) in enumerate(zip(parts, params)):
            if rng_keys:
                rest = _with_keys(rest, seed, step, block, layer)
            h = nnx.merge(graphdef, p, rest)(h if compute_dtype is None else _floats_to(h, compute_dtype))
        if compute_dtype is not None:
            h = jax.tree.map(
                lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4 else a,
                h,
            )
        return loss_fn(h, y)

    def loss(params, x, y, step):
        split = lambda t: jax.tree.map(lambda a: a.reshape((microbatches, -1) + a.shape[1:]), t)  # noqa: E731
        blocks = jnp.arange(microbatches)
        return jnp.mean(jax.vmap(full_loss, in_axes=(None, 0, 0, None, 0))(params, split(x), split(y), step, blocks))

    @jax.jit
    def step(params, opt_state, x, y, t):
        value, grads = jax.value_and_grad(loss)(params, x, y, t)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, value, grads

    opt_state = optimizer.init(params)
    losses, first_grads = [], None
    for t, (x, y) in enumerate(batches):
        params, opt_state, value, grads = step(params, opt_state, x, y, t)
        losses.append(float(value))
        first_grads = grads if first_grads is None else first_grads
    return losses, first_grads, params


def reference_eval_loss(model_fn, params, batch, loss_fn, microbatches=1):
    """The mean loss of ``batch`` over ``microbatches`` row blocks, every layer after ``layer.eval()``."""
    layers = model_fn(nnx.Rngs(0))
    for layer in layers:
        layer.eval()
    x, y = batch
    losses = []
    for x_b, y_b in zip(np.split(np.asarray(x), microbatches), np.split(np.asarray(y), microbatches)):
        h = x_b
        for layer, p in zip(layers, params):
            graphdef, _, rest = nnx.split(layer, nnx.Param, ...)
            h = nnx.merge(graphdef, p, rest)(h)
        losses.append(float(loss_fn(h, y_b)))
    return float(np.mean(losses))


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``np.testing.assert_allclose``'s ``rtol`` and ``atol`` for one kind of comparison, and why.

    Attributes:
      rtol: relative tolerance.
      atol: absolute tolerance.
      reason: why results may differ by this much, and what larger error it still catches.
    """

    rtol: float
    atol: float
    reason: str

    def __post_init__(self):
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"rtol and atol must be >= 0, got rtol={self.rtol}, atol={self.atol}")


# Every tolerance the tests use, in one place.
FLOAT32_LOSS = Tolerance(2e-5, 0.0, (
    "float32 losses: the pipeline sums micro-batch losses in another order than one big batch, a few ulps; "
    "a missing micro-batch or a wrong scale moves a loss by orders of magnitude more"))
FLOAT32_PARAMS = Tolerance(1e-4, 2e-6, (
    "float32 gradients, and parameters after a few optimizer steps: the summation order's ulps, grown through "
    "the updates; atol for entries near zero; a wrong gradient (device, micro-batch, scale) is far larger"))
SAME_MATH = Tolerance(1e-6, 1e-7, (
    "one float32 computation traced two ways (B then W against the whole backward, a placed batch against a "
    "host one): XLA may fuse and round differently, nothing else differs"))
SAME_MATH_LOSS = Tolerance(1e-6, 0.0, "a loss (a mean, far from zero) from one float32 computation traced two ways")
FLOAT_SUMS = Tolerance(1e-12, 0.0, "float64 sums of the same numbers in another order")
IDENTICAL = Tolerance(0.0, 0.0, "the same values stored and read back (links, checkpoints): nothing may change")
BFLOAT16_U = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits
BFLOAT16_LOSS = Tolerance(2e-2, 0.0, (
    "bfloat16 compute (~5u): each rounding moves a mean loss by at most u, XLA rounds fused chains at other places "
    "in the pipeline than in the reference, and later steps add the parameters' differences"))
BFLOAT16_GRAD_L2 = 16 * BFLOAT16_U  # relative L2 error of bfloat16-compute gradients, derived in test_precision.py
BFLOAT16_PARAMS = Tolerance(6 * BFLOAT16_U, 0.0, (
    "bfloat16 master parameters: each update rounds to a bfloat16 neighbour, up to one ulp (2u) apart per step, "
    "over three steps; tests add the gradient tolerance's share as atol"))


def assert_close(actual, expected, tolerance: Tolerance, what: str) -> None:
    """Leaf-by-leaf ``np.testing.assert_allclose`` of two trees (or arrays) within ``tolerance``.

    The message names ``what`` and the leaf's path.
    """
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves_with_path(expected)
    assert len(flat_a) == len(flat_e), f"{what}: {len(flat_a)} leaves vs {len(flat_e)}"
    for (path, a), (_, e) in zip(flat_a, flat_e):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=tolerance.rtol, atol=tolerance.atol,
            err_msg=f"{what} at {jax.tree_util.keystr(path)}",
        )


def assert_matches_reference(losses, ref_losses, params=None, ref_params=None, grads=None, ref_grads=None,
                             what: str = "", loss_tolerance: Tolerance = FLOAT32_LOSS,
                             param_tolerance: Tolerance = FLOAT32_PARAMS) -> None:
    """A pipeline's losses (and, where given, parameters and gradients) against the reference run's.

    Losses within ``loss_tolerance``; per-layer gradients and parameters
    (lists of ``nnx.State``, or of arrays) within ``param_tolerance``.
    ``what`` (e.g. the mesh) starts every failure message.
    """
    if grads is not None:
        assert_close(grads, ref_grads, param_tolerance, f"{what} gradients".lstrip())
    assert_close(np.asarray(losses, np.float64), np.asarray(ref_losses, np.float64), loss_tolerance,
                 f"{what} losses".lstrip())
    if params is not None:
        assert_close(params, ref_params, param_tolerance, f"{what} parameters".lstrip())


def assert_trains_like_reference(pipe, data, ref_losses, ref_params, ref_grads=None):
    """Trains ``pipe`` one step per batch of ``data`` and compares with the reference run.

    With ``ref_grads`` the first batch's loss and gradient are compared first
    (one more compilation). Returns the final state.
    """
    state = pipe.init()
    if ref_grads is not None:
        loss, grads = pipe.loss_and_grad(state.params, data[0])
        assert_matches_reference([float(loss)], ref_losses[:1], grads=pipe.from_stacks(grads), ref_grads=ref_grads)
    losses = []
    for batch in data:
        state, loss = pipe.train_step(state, batch)
        losses.append(float(loss))
    assert_matches_reference(losses, ref_losses, pipe.from_stacks(state.params), ref_params)
    return state


def shared_reference_run(model_fn, batches, loss_fn, optimizer, seed=0):
    """Plain nnx + optax training of the layer list as one model; returns (losses, params).

    The layers are split together (``nnx.split(layers, ...)``), so a
    parameter several layers share (weight tying) is one variable: it
    appears once, in the first layer that reaches it, its gradient is the
    sum over its uses and the optimizer updates it once. ``params`` is a
    list of per-layer ``nnx.State`` (a layer whose parameters are all
    another's gets an empty one), the form ``Pipeline.unpack`` gives.
    """
    layers = model_fn(nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(layers, nnx.Param, ...)

    def loss(params, x, y):
        h = x
        for layer in nnx.merge(graphdef, params, rest):
            h = layer(h)
        return loss_fn(h, y)

    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimizer.init(params)
    losses = []
    for x, y in batches:
        params, opt_state, value = step(params, opt_state, x, y)
        losses.append(float(value))
    return losses, [params[i] if i in params else nnx.State({}) for i in range(len(layers))]
