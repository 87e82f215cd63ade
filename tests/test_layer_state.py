"""Non-parameter state a pipeline keeps constant: frozen batch statistics train to the reference."""

import jax
import numpy as np
import optax
from flax import nnx
from models_for_tests import mse
from reference import assert_matches_reference, reference_run

import jaxpipe


def _frozen_norm_model(rngs):
    """Linear, BatchNorm with fixed non-trivial running statistics (frozen), Linear, tanh, Linear."""
    norm = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
    norm.mean[...] = jax.numpy.linspace(-1.0, 1.0, 8)
    norm.var[...] = jax.numpy.linspace(0.5, 3.0, 8)
    return [nnx.Linear(6, 8, rngs=rngs), norm, nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 5, rngs=rngs)]


def _batches(rows=8, steps=3):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(rows, 6)).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32))
            for _ in range(steps)]


def test_frozen_batch_norm_trains_to_the_reference_and_keeps_its_statistics():
    data = _batches()
    optimizer = optax.sgd(0.1, momentum=0.9)
    ref_losses, _, ref_params = reference_run(_frozen_norm_model, data, mse, optimizer)
    # Dropping the statistics (mean 0, var 1) would change the very first loss.
    plain = nnx.BatchNorm(8, use_running_average=True, rngs=nnx.Rngs(0))
    unfrozen_losses, _, _ = reference_run(
        lambda rngs: [m if i != 1 else plain for i, m in enumerate(_frozen_norm_model(rngs))], data[:1], mse, optimizer)
    assert abs(unfrozen_losses[0] - ref_losses[0]) > 1e-3
    for mesh, schedule in (((1, 2), "1f1b"), ((2, 2), "balanced")):
        result = jaxpipe.train(
            _frozen_norm_model, mesh, data=data, loss_fn=mse, optimizer=optimizer, steps=3, num_microbatches=2,
            schedule=schedule, progress=False,
        )
        assert_matches_reference(result.losses, ref_losses, result.pipeline.from_stacks(result.state.params), ref_params,
                                 what=f"{mesh} {schedule}")
        built = _frozen_norm_model(nnx.Rngs(0))[1]
        np.testing.assert_array_equal(np.asarray(result.layers[1].mean[...]), np.asarray(built.mean[...]))
        np.testing.assert_array_equal(np.asarray(result.layers[1].var[...]), np.asarray(built.var[...]))
