"""The calibrated planner: the message it prices is the one the executor sends, and the fit finds the overheads.

No timing here (experiment 07 measures predictions against real steps): the
fit is checked on steps synthesised from known overheads, and the priced
message against the placement's wire format.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpipe
from jaxpipe import models
from jaxpipe.calibrate import Calibration, _probes, fit, predicted_step
from jaxpipe.planner import ORDER_MARGIN


def _mse(o, t):
    return jnp.mean((o - t) ** 2)


def _lm(schedule):
    rows, seq, vocab = 4, 8, 512
    tokens = np.random.default_rng(0).integers(0, vocab, size=(4 * rows, seq + 1)).astype(np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])
    return jaxpipe.Pipeline(models.transformer_lm(vocab, seq, 32, 2, 2), (1, 2), models.lm_loss, optax.sgd(0.1), 4,
                            batch, schedule=schedule)


@pytest.mark.parametrize("schedule", ["1f1b", "balanced"])
def test_the_planned_message_is_the_executors(schedule):
    """An LM whose logits are 16x its hidden state: the plan prices the hidden state the wire carries.

    The plain cut puts the head alone on device 1; the balanced cut splits
    the head by rows, each piece taking its own rows' loss. Either way only
    hidden states cross, and the planner's message must be the carrier's
    bytes (it was the largest activation, the logits, before).
    """
    pipe = _lm(schedule)
    carrier = pipe.placement.carrier
    sent = carrier.rows * carrier.float_width * jnp.dtype(carrier.float_dtype).itemsize
    if pipe.placement.sends_ints:
        sent += carrier.rows * carrier.int_width * 4
    assert pipe.plan.chosen.message_bytes == sent
    assert max(pipe.layer_costs.boundary_bytes) >= 8 * sent


def test_fit_recovers_the_overheads_the_steps_were_made_with():
    truth = Calibration(tick_s=3e-4, send_s=2e-9, byte_s=1e-10, flop_s=2e-11, device="cpu", num_devices=2,
                        process_count=1)
    rng = np.random.default_rng(0)
    runs = []
    # Three probes (ticks, messages, weights) separate the three fitted constants.
    for name in ("ticks", "messages", "weights"):
        model_fn, rows, width, schedule = _probes(2)[name]
        batch = tuple(rng.normal(size=(4 * rows, width)).astype(np.float32) for _ in range(2))
        pipe = jaxpipe.Pipeline(model_fn, (1, 2), _mse, optax.sgd(0.1), 4, batch, schedule=schedule,
                                calibration=truth)
        assert pipe.plan.unit == "s"
        runs.append((pipe, predicted_step(pipe, truth)))
    found = fit(runs, dataclasses.replace(truth, tick_s=0.0, send_s=1e-12, byte_s=3e-11))
    assert found.tick_s == pytest.approx(truth.tick_s, rel=1e-2)
    assert found.send_s == pytest.approx(truth.send_s, rel=1e-2)
    assert found.byte_s == pytest.approx(truth.byte_s, rel=1e-2)
    assert found.flop_s == truth.flop_s
    assert max(abs(r) for r in found.residual) < 1e-3
    # Each overhead is priced: leaving one out changes some probe's prediction by over 1 %.
    for field in ("tick_s", "send_s", "byte_s"):
        partial = dataclasses.replace(truth, **{field: 0.0})
        assert max(abs(predicted_step(p, partial) / m - 1) for p, m in runs) > 0.01, field


def test_calibration_saves_loads_and_refuses(tmp_path):
    c = Calibration(1e-4, 1e-9, 2e-10, 3e-11, "cpu", 2, 2, (0.01, -0.02))
    c.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == c
    (tmp_path / "bad.json").write_text('{"format": 0}')
    with pytest.raises(ValueError, match="format 1"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="tick_s"):
        Calibration(-1.0, 0.0, 0.0, 0.0, "cpu", 2, 1)
    with pytest.raises(ValueError, match="num_devices"):
        Calibration(0.0, 0.0, 0.0, 0.0, "cpu", 0, 1)
    with pytest.raises(TypeError, match="calibration"):
        jaxpipe.PipelineConfig(calibration=3)


def test_calibration_refuses_costs_in_unknown_units():
    batch = tuple(np.ones((8, 16), np.float32) for _ in range(2))
    c = Calibration(1e-4, 1e-9, 2e-10, 3e-11, "cpu", 2, 1)
    with pytest.raises(ValueError, match="seconds"):
        jaxpipe.Pipeline(models.mlp([16] * 4), (1, 2), _mse, optax.sgd(0.1), 2, batch, costs=[1.0, 2.0, 3.0],
                         calibration=c)


def test_a_calibration_prices_interleavings_extra_ticks():
    """4 equal layers on 2 devices: compute alone predicts interleaved V=2 1.06x faster than plain
    (a smaller bubble), so auto takes it; with a per-tick overhead its extra ticks cancel the gain,
    and auto keeps plain 1F1B (a prediction inside ``ORDER_MARGIN`` is a tie)."""
    total = np.ones(4)
    common = dict(layer_names=list("abcd"), param_bytes=[4.0] * 4, message_bytes=8.0)
    compute_only = jaxpipe.make_plan(total / 3, 2 * total / 3, 2, 8, 8, **common)
    assert compute_only.chosen.schedule == "interleaved"
    gain = compute_only.plain.step_time / compute_only.chosen.step_time
    assert gain > ORDER_MARGIN
    calibration = Calibration(tick_s=0.08, send_s=0.0, byte_s=0.0, flop_s=0.0, device="cpu", num_devices=2,
                              process_count=1)
    calibrated = jaxpipe.make_plan(total / 3, 2 * total / 3, 2, 8, 8, **common, calibration=calibration)
    interleaved = next(c for c in calibrated.candidates if c.schedule == "interleaved" and c.cut == "integer")
    assert calibrated.plain.step_time / interleaved.step_time < ORDER_MARGIN
    assert calibrated.chosen is calibrated.plain and "another order" in calibrated.reason
