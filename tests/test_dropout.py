"""Dropout and other RNG use inside layers, Linen layers, forward-only evaluation (issue 13).

Every pipeline run is checked against ``reference.reference_run`` with
``rng_keys=True``: the single-device reference processing the global batch
in row blocks of the pipeline's rows per micro-batch B, with the layers'
streams keyed as jaxpipe documents (written again there). Layers with RNG
streams are never split by rows; the balanced runs split their plain layers.
"""

import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from models_for_tests import CASES, batches, dropout_lm, dropout_mlp, mse
from reference import FLOAT32_LOSS, assert_close, assert_matches_reference, reference_eval_loss, reference_run

import jaxpipe
from jaxpipe import models

ROWS, B = 16, 4  # global rows, rows per micro-batch: the reference runs ROWS // B row blocks
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def _check(model_fn, loss_fn, data, runs):
    ref_losses, _, ref_params = reference_run(model_fn, data, loss_fn, OPTIMIZER, microbatches=ROWS // B, rng_keys=True)
    for mesh, options in runs:
        num_mb = ROWS // (mesh[0] * B)
        result = jaxpipe.train(
            model_fn, mesh, data=data, loss_fn=loss_fn, optimizer=OPTIMIZER, steps=len(data),
            num_microbatches=num_mb, progress=False, **options,
        )
        what = f"{mesh} {options}"
        assert_matches_reference(result.losses, ref_losses, result.pipeline.from_stacks(result.state.params), ref_params,
                                 what=what)
        yield result


def _whole_dropout_layers(pipe, layers):
    """The balanced cut split some layer, and none of ``layers``."""
    pieces = [piece for stage in pipe.stages for piece in stage]
    assert any(piece.stop - piece.start < B for piece in pieces), pipe.stages
    assert all(piece.stop - piece.start == B for piece in pieces if piece.layer in layers), pipe.stages
    assert set(layers) <= set(pipe.unsplittable)


def test_dropout_mlp_is_the_same_on_every_mesh_schedule_and_cut():
    data = batches(CASES["mlp"], ROWS, steps=2)
    runs = [
        ((1, 4), {}),
        ((2, 4), {"schedule": "1f1b"}),
        ((1, 4), {"schedule": "balanced"}),
        ((1, 2), {"schedule": "interleaved", "virtual_stages": 2, "remat": True}),
    ]
    pipes = list(_check(dropout_mlp(0.3), mse, data, runs))
    _whole_dropout_layers(pipes[2].pipeline, (0, 2, 4))
    # The check can fail: the same model without dropout has another loss.
    plain_losses, _, _ = reference_run(dropout_mlp(0.0), data[:1], mse, OPTIMIZER, microbatches=ROWS // B)
    assert abs(plain_losses[0] - pipes[0].losses[0]) > 1e-3


def test_dropout_lm_is_the_same_on_every_mesh_schedule_and_cut():
    data = batches(CASES["lm"], ROWS, steps=2)
    runs = [
        ((1, 1), {"schedule": "1f1b"}),
        ((1, 2), {"executor": "autodiff"}),
    ]
    pipes = list(_check(dropout_lm(0.2, blocks=2), models.lm_loss, data, runs))
    assert pipes[0].pipeline.placement.specs[1].streams == (("attn_drop", "rngs", "key"), ("drop", "rngs", "key"))


def _zeros_model(rngs):
    return [nnx.Linear(6, 64, rngs=rngs), nnx.Dropout(0.4, rngs=rngs)]


def _zero_fraction(outputs, targets):
    return jnp.mean((outputs == 0).astype(jnp.float32))


def test_dropout_is_on_and_changes_with_the_step():
    x, y = np.random.default_rng(0).normal(size=(ROWS, 6)).astype(np.float32), np.zeros((ROWS, 64), np.float32)
    pipe = jaxpipe.Pipeline(_zeros_model, (1, 2), _zero_fraction, OPTIMIZER, 4, (x, y))
    params = pipe.init().params
    fractions = [float(pipe.loss_and_grad(params, (x, y), step)[0]) for step in (0, 1, 2)]
    assert all(abs(f - 0.4) < 0.06 for f in fractions), fractions  # 1024 draws: 4 standard deviations
    assert len(set(fractions)) == 3, fractions
    assert float(pipe.evaluate(params, (x, y))) == 0.0


def test_evaluate_equals_the_reference_loss_without_dropout():
    lm_fn = models.transformer_lm(vocab=11, seq_len=6, dim=8, heads=2, blocks=2)
    for model_fn, loss_fn, case, mesh, options in (
        (lm_fn, models.lm_loss, CASES["lm"], (1, 4), {"schedule": "balanced"}),
        (CASES["mlp"].model_fn, mse, CASES["mlp"], (2, 2), {"schedule": "interleaved", "virtual_stages": 2}),
    ):
        x, y = batches(case, ROWS, steps=1)[0]
        pipe = jaxpipe.Pipeline(model_fn, mesh, loss_fn, OPTIMIZER, ROWS // (mesh[0] * B), (x, y), **options)
        params = pipe.init().params
        expected = reference_eval_loss(model_fn, pipe.from_stacks(params), (x, y), loss_fn, ROWS // B)
        assert_close(float(pipe.evaluate(params, (x, y))), expected, FLOAT32_LOSS, f"{mesh} eval loss")


def test_train_evaluates_dropout_models_deterministically():
    data = batches(CASES["lm"], ROWS, steps=2)
    model_fn = dropout_lm(0.2, blocks=2)
    result = jaxpipe.train(
        model_fn, (2, 2), data=data, loss_fn=models.lm_loss, optimizer=OPTIMIZER, steps=2, num_microbatches=2,
        schedule="1f1b", eval_data=data[:1], progress=False,
    )
    params = result.pipeline.from_stacks(result.state.params)
    expected = reference_eval_loss(model_fn, params, data[0], models.lm_loss, ROWS // B)
    assert result.eval_losses[-1][0] == 2
    assert_close(result.eval_losses[-1][1], expected, FLOAT32_LOSS, "eval loss")


class LinenBlock(nn.Module):
    """A pre-norm causal transformer block in Linen, with attention and residual dropout."""

    dim: int
    heads: int
    rate: float

    @nn.compact
    def __call__(self, x, deterministic=False):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.rate)(
            nn.LayerNorm()(x), mask=mask, deterministic=deterministic)
        x = x + nn.Dropout(self.rate)(h, deterministic=deterministic)
        h = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
        return x + nn.Dropout(self.rate)(h, deterministic=deterministic)


def _linen_lm(rate):
    def model_fn(rngs):
        sample = jnp.zeros((1, 6, 8))
        blocks = [jaxpipe.linen(LinenBlock(8, 2, rate), sample, rngs) for _ in range(2)]
        norm = nnx.bridge.ToNNX(nn.LayerNorm(), rngs=rngs).lazy_init(sample)
        return [models.Embed(11, 6, 8, rngs=rngs)] + blocks + [norm, nnx.bridge.ToNNX(nn.Dense(11), rngs=rngs).lazy_init(sample)]

    return model_fn


def test_linen_transformer_blocks_train_to_the_reference():
    rate = 0.2
    data = batches(CASES["lm"], ROWS, steps=2)
    (result,) = _check(_linen_lm(rate), models.lm_loss, data, [((2, 2), {"schedule": "1f1b"})])
    pipe = result.pipeline
    # Layers 1, 2 draw (dropout); the bridged LayerNorm and Dense hold streams but never use them.
    assert all(pipe.placement.specs[i].streams for i in (1, 2, 3, 4))
    assert {1, 2} <= set(pipe.unsplittable) and not {3, 4} & set(pipe.unsplittable)
    params = pipe.init().params
    expected = reference_eval_loss(_linen_lm(rate), pipe.from_stacks(params), data[0], models.lm_loss, ROWS // B)
    assert_close(float(pipe.evaluate(params, data[0])), expected, FLOAT32_LOSS, "eval loss")
    assert abs(result.losses[0] - expected) > 1e-3  # training draws
