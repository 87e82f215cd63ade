"""``train``'s metrics, progress bar, callbacks, evaluation, non-finite steps and option errors.

Losses, gradient norms and eval losses are checked against the plain
single-device reference (``reference.FLOAT32_LOSS``; the gradient norm
``reference.FLOAT32_PARAMS``).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_worker
from flax import nnx
from reference import FLOAT32_LOSS, FLOAT32_PARAMS, assert_close, assert_matches_reference, reference_run

import jaxpipe
from jaxpipe.checkpoint import Checkpoints
from jaxpipe.metrics import StepMetrics
from jaxpipe.train import NonFiniteError

MODEL, LOSS = train_worker.MODEL, train_worker.mse
OPTIMIZER = optax.adam(1e-2)
DATA = [batch for batch, _ in zip(train_worker.data(), range(6))]
EVAL = [batch for batch, _ in zip(train_worker.data(seed=1), range(2))]


def _train(mesh=(1, 1), steps=5, data=DATA, **options):
    options.setdefault("progress", False)
    return jaxpipe.train(
        MODEL, mesh, data=data, loss_fn=LOSS, optimizer=OPTIMIZER, steps=steps, num_microbatches=2,
        devices=jax.devices()[: mesh[0] * mesh[1]], **options,
    )


def _plain_eval_loss(params):
    """The mean loss over EVAL of the layers with ``params``, applied one after the other."""
    layers = MODEL(nnx.Rngs(0))
    losses = []
    for x, y in EVAL:
        h = x
        for layer, p in zip(layers, params):
            graphdef, _, rest = nnx.split(layer, nnx.Param, ...)
            h = nnx.merge(graphdef, p, rest)(h)
        losses.append(float(LOSS(h, y)))
    return float(np.mean(losses))


def _timed_from_outside(monkeypatch, pause_s):
    """Makes every train step ``pause_s`` longer and records its wall time as seen from outside."""
    seconds, original = [], jaxpipe.Pipeline.train_step_stats

    def timed(self, state, batch):
        start = time.perf_counter()
        out = jax.block_until_ready(original(self, state, batch))
        time.sleep(pause_s)
        seconds.append(time.perf_counter() - start)
        return out

    monkeypatch.setattr(jaxpipe.Pipeline, "train_step_stats", timed)
    return seconds


def test_metrics_file_callbacks_eval_and_progress_bar(tmp_path, capfd, monkeypatch):
    seen, pause_s = [], 0.05
    step_s = _timed_from_outside(monkeypatch, pause_s)
    path = tmp_path / "logs" / "metrics.jsonl"
    result = _train((1, 2), 5, log_every=2, eval_data=EVAL, eval_every=2, metrics_path=path,
                    callbacks=[seen.append], progress=True)
    bar = capfd.readouterr().err
    assert "5/5" in bar and "loss=" in bar and "step_s=" in bar and "ex/s=" in bar and "eval=" in bar
    ref_losses, ref_grads, _ = reference_run(MODEL, DATA[:5], LOSS, OPTIMIZER)
    assert_matches_reference(result.losses, ref_losses)
    assert [m.step for m in seen] == [1, 2, 3, 4, 5] and [m.loss for m in seen] == result.losses
    assert all(isinstance(m, StepMetrics) for m in seen)
    with pytest.raises(AttributeError):
        seen[0].loss = 0.0  # frozen
    ref_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(ref_grads))))
    assert_close(seen[0].grad_norm, ref_norm, FLOAT32_PARAMS, "gradient norm")
    # The global batch's rows over the step's wall time: the step took at least
    # the time measured around the call, and at most that plus pause_s (train's
    # own work around the call is far quicker); a row count or a time 2x off
    # (rows per micro-batch, say) falls outside.
    rows = len(DATA[0][0])
    for m, outside in zip(seen, step_s, strict=True):
        assert outside <= rows / m.examples_per_s <= outside + pause_s, (m, outside)
    want_eval = [(k, _plain_eval_loss(reference_run(MODEL, DATA[:k], LOSS, OPTIMIZER)[2])) for k in (2, 4, 5)]
    assert [k for k, _ in result.eval_losses] == [2, 4, 5]
    assert_close([v for _, v in result.eval_losses], [v for _, v in want_eval], FLOAT32_LOSS, "eval losses")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]
    for line in lines:
        m = seen[line["step"] - 1]
        assert line == {"step": m.step, "loss": m.loss, "step_time_s": m.step_time_s,
                        "examples_per_s": m.examples_per_s, "grad_norm": m.grad_norm, "eval_loss": m.eval_loss}


def test_a_callback_returning_true_stops_quietly_after_a_checkpoint(tmp_path, capfd):
    directory = tmp_path / "ckpt"
    result = _train(steps=6, checkpoint_dir=directory, callbacks=[lambda m: m.step == 3])
    assert result.stopped == "callback" and len(result.losses) == 3
    assert result.checkpoint.step == 3 and Checkpoints(directory).steps() == [3]
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3]  # the step it stopped at, though log_every=10
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


def test_a_non_finite_batch_stops_before_its_update_and_keeps_the_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    bad = list(DATA)
    x, y = bad[2]
    bad[2] = (np.where(np.arange(x.size).reshape(x.shape) == 0, np.inf, x).astype(np.float32), y)
    with pytest.raises(NonFiniteError, match=r"^step 3: the loss is (nan|inf)") as caught:
        _train(steps=5, data=bad, checkpoint_dir=directory, checkpoint_every=1)
    err = caught.value
    assert isinstance(err, ValueError) and err.step == 3 and err.layers
    assert "The update was not applied and the last checkpoint (step 2" in str(err)
    assert Checkpoints(directory).steps() == [1, 2]


def test_a_non_finite_parameter_names_its_layer():
    def poisoned(rngs):
        layers = MODEL(rngs)
        bias = layers[2].linear.bias
        bias[...] = bias[...].at[0].set(jnp.nan)
        return layers

    with pytest.raises(NonFiniteError, match=r"^step 1: .*non-finite parameters in layers 2 \(Dense\);") as caught:
        jaxpipe.train(poisoned, data=DATA, loss_fn=LOSS, optimizer=OPTIMIZER, steps=2, progress=False)
    assert 2 in caught.value.layers


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(checkpoint_dir=3), TypeError, r"checkpoint_dir must be a path \(str or os.PathLike\) or None, got int"),
        (dict(checkpoint_dir=_file), ValueError, r"checkpoint_dir=.*a_file' is a file; give a folder"),
        (dict(checkpoint_every=2), ValueError, r"checkpoint_every=2 needs checkpoint_dir"),
        (dict(checkpoint_dir="D", checkpoint_every=0), ValueError, r"checkpoint_every must be >= 1, got 0"),
        (dict(checkpoint_dir="D", checkpoint_every=1.5), TypeError, r"checkpoint_every must be an int, got 1.5"),
        (dict(checkpoint_dir="D", keep_checkpoints=0), ValueError, r"keep_checkpoints must be >= 1 \(or None"),
        (dict(checkpoint_dir="D", keep_checkpoints="3"), TypeError, r"keep_checkpoints must be an int or None"),
        (dict(log_every=0), ValueError, r"log_every must be >= 1, got 0"),
        (dict(log_every=None), TypeError, r"log_every must be an int, got None"),
        (dict(metrics_path=5), TypeError, r"metrics_path must be a path \(str or os.PathLike\) or None, got int"),
        (dict(eval_every=2), ValueError, r"eval_every=2 needs eval_data"),
        (dict(eval_steps=2), ValueError, r"eval_steps=2 needs eval_data"),
        (dict(eval_data=EVAL, eval_steps=0), ValueError, r"eval_steps must be >= 1, got 0"),
        (dict(eval_data=EVAL, eval_steps=1.5), TypeError, r"eval_steps must be an int, got 1.5"),
        (dict(eval_data=EVAL, eval_every=0), ValueError, r"eval_every must be >= 1, got 0"),
        (dict(eval_data=[]), ValueError, r"eval_data is empty"),
        (dict(eval_data=5), TypeError, r"eval_data must be an iterable of \(inputs, targets\) batches, got int"),
        (dict(eval_data=[(EVAL[0][0][:6], EVAL[0][1][:6])]), ValueError,
         r"eval_data batch 0: this pipeline was built for global batches of 8 rows, got 6"),
        (dict(callbacks=print), TypeError, r"callbacks must be a list or tuple of functions, got builtin_function"),
        (dict(callbacks=[1]), TypeError, r"callbacks\[0\] must be callable, got int"),
        (dict(progress="yes"), TypeError, r"progress must be True or False, got 'yes'"),
        (dict(data=lambda position: 5), TypeError, r"data\(0\) must be an iterable of \(inputs, targets\) batches"),
    ],
)
def test_option_errors(tmp_path, options, error, message):
    if "checkpoint_dir" in options:
        d = options["checkpoint_dir"]
        options["checkpoint_dir"] = d(tmp_path) if callable(d) else tmp_path / d if isinstance(d, str) else d
    with pytest.raises(error, match=message):
        _train(**options)


def _counted(seed, read):
    for batch in train_worker.data(seed):
        read.append(1)
        yield batch


def _plain_eval_losses(params, batches):
    """Each batch's loss under the layers with ``params``, applied one after the other (jitted)."""
    layers = MODEL(nnx.Rngs(0))
    splits = [nnx.split(layer, nnx.Param, ...) for layer in layers]

    @jax.jit
    def loss(params, x, y):
        h = x
        for (graphdef, _, rest), p in zip(splits, params):
            h = nnx.merge(graphdef, p, rest)(h)
        return LOSS(h, y)

    return [float(loss(params, x, y)) for x, y in batches]


def test_an_endless_eval_generator_is_read_one_batch_at_a_time_up_to_eval_steps():
    read = []
    result = _train((1, 2), 2, eval_data=_counted(1, read), eval_steps=3)
    assert len(read) == 3  # not one more: the generator is never drained
    params = reference_run(MODEL, DATA[:2], LOSS, OPTIMIZER)[2]
    want = np.mean(_plain_eval_losses(params, [b for b, _ in zip(train_worker.data(1), range(3))]))
    assert [k for k, _ in result.eval_losses] == [2]
    assert_close(result.eval_losses[0][1], want, FLOAT32_LOSS, "eval loss")


def test_eval_steps_defaults_to_100_batches_of_an_endless_generator_with_a_warning():
    read = []
    with pytest.warns(UserWarning, match=r"eval_data has no length and more than 100 batches; evaluating on the "
                                         r"first 100 \(pass eval_steps= to choose how many\)"):
        result = _train((1, 1), 1, eval_data=_counted(1, read))
    assert len(read) == 101
    params = reference_run(MODEL, DATA[:1], LOSS, OPTIMIZER)[2]
    want = np.mean(_plain_eval_losses(params, [b for b, _ in zip(train_worker.data(1), range(100))]))
    assert_close(result.eval_losses[0][1], want, FLOAT32_LOSS, "eval loss")


def test_a_list_is_evaluated_whole_whatever_its_length():
    batches = [b for b, _ in zip(train_worker.data(1), range(3))]
    result = _train((1, 1), 1, eval_data=batches)
    params = reference_run(MODEL, DATA[:1], LOSS, OPTIMIZER)[2]
    assert_close(result.eval_losses[0][1], np.mean(_plain_eval_losses(params, batches)), FLOAT32_LOSS, "eval loss")
