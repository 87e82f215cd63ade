"""``load_layers``: a checkpoint's trained layers on one device, without a mesh or a pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_for_tests import CASES, batches

import jaxpipe

CASE = CASES["mlp"]


def _leaves(layers):
    return jax.tree.leaves(nnx.state(layers))


@pytest.mark.parametrize("mesh,schedule,param_dtype", [((1, 2), "1f1b", None), ((2, 2), "balanced", jnp.bfloat16)])
def test_load_layers_returns_the_trained_layers(tmp_path, mesh, schedule, param_dtype):
    result = jaxpipe.train(
        CASE.model_fn, mesh, data=batches(CASE, mesh[0] * 2 * 2), loss_fn=CASE.loss_fn, optimizer=optax.adam(1e-2),
        steps=3, num_microbatches=2, schedule=schedule, param_dtype=param_dtype, progress=False,
        checkpoint_dir=tmp_path, checkpoint_every=1, keep_checkpoints=None,
    )
    layers = jaxpipe.load_layers(CASE.model_fn, tmp_path)
    assert [type(layer) for layer in layers] == [type(layer) for layer in result.layers]
    got, want = _leaves(layers), _leaves(result.layers)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and isinstance(a, jax.Array)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    first = _leaves(jaxpipe.load_layers(CASE.model_fn, tmp_path, step=1))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, want))
    x = batches(CASE, 4)[0][0]
    h, ref = x, x
    for layer, trained in zip(layers, result.layers):  # the loaded layers run as plain Flax modules
        h, ref = layer(h), trained(ref)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(ref))


def test_load_layers_errors(tmp_path):
    jaxpipe.train(CASE.model_fn, (1, 1), data=batches(CASE, 4, steps=1), loss_fn=CASE.loss_fn,
                  optimizer=optax.sgd(0.1), steps=1, progress=False, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*missing' is not a folder"):
        jaxpipe.load_layers(CASE.model_fn, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*empty"):
        jaxpipe.load_layers(CASE.model_fn, tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no complete checkpoint for step 5 in .*ckpt; it has steps \[1\]"):
        jaxpipe.load_layers(CASE.model_fn, tmp_path / "ckpt", step=5)
    with pytest.raises(ValueError, match=r"holds a model of \d+ layers, but model_fn builds 2"):
        jaxpipe.load_layers(lambda rngs: [nnx.Linear(2, 2, rngs=rngs) for _ in range(2)], tmp_path / "ckpt")
