"""Per-layer cost profiling: measured times, bytes, flops, reuse and caching."""

import dataclasses
import json
import importlib
import time

import jax
import numpy as np
import pytest
from flax import nnx
from models_for_tests import CASES

from jaxpipe import models

# ``jaxpipe.profile`` may name the function once the package exports it, so
# take the module itself from the import system.
prof = importlib.import_module("jaxpipe.profile")
Profile, profile = prof.Profile, prof.profile

ROWS = 4


def _sample(case, rows=ROWS + 2):
    return case.make_batch(np.random.default_rng(0), rows)[0]


@pytest.fixture
def timed(monkeypatch):
    """Records every function ``profile`` times."""
    calls = []
    original = prof._time

    def counted(fn, args, warmup, repeats):
        calls.append(fn)
        return original(fn, args, warmup, repeats)

    monkeypatch.setattr(prof, "_time", counted)
    return calls


@pytest.fixture(scope="module")
def lm_run():
    """The test LM's layers, sample, profile, and the number of timed calls."""
    case = CASES["lm"]
    layers, sample = case.model_fn(nnx.Rngs(0)), _sample(case)
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        original = prof._time
        mp.setattr(prof, "_time", lambda *a: calls.append(a[0]) or original(*a))
        result = profile(layers, sample, ROWS, repeats=2, piece_fractions=(), warmup=1)
    return layers, sample, result, len(calls)


def _check_costs(layers, sample, result):
    assert isinstance(result, Profile)
    assert result.microbatch_rows == ROWS and result.device == jax.devices()[0].device_kind
    assert len(result.layers) == len(layers)
    for arr in (result.forward(), result.backward(), result.total()):
        assert arr.shape == (len(layers),) and np.all(np.isfinite(arr)) and np.all(arr > 0)
    h = jax.tree.map(lambda a: jax.ShapeDtypeStruct((ROWS,) + a.shape[1:], a.dtype), sample)
    for i, (layer, cost) in enumerate(zip(layers, result.layers)):
        count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param)))
        h = jax.eval_shape(layer, h)
        assert (cost.index, cost.name) == (i, type(layer).__name__)
        assert cost.param_bytes == 4 * count
        assert cost.activation_bytes == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(h))
        assert cost.flops is not None and cost.flops > 0


def test_lm_costs_are_measured_and_sized(lm_run):
    layers, sample, result, _ = lm_run
    _check_costs(layers, sample, result)


@pytest.mark.parametrize("name", ["mlp", "dict"])
def test_costs_are_measured_and_sized(name):
    case = CASES[name]
    layers, sample = case.model_fn(nnx.Rngs(0)), _sample(case)
    _check_costs(layers, sample, profile(layers, sample, ROWS, repeats=2, piece_fractions=(), warmup=1))


def test_identical_layers_are_measured_once(lm_run):
    _, _, result, calls = lm_run
    # Embed, Block (x6, measured once) and Head: a forward and a backward each.
    assert calls == 2 * 3
    blocks = result.layers[1:7]
    assert all(
        (c.forward_s, c.backward_s, c.flops) == (blocks[0].forward_s, blocks[0].backward_s, blocks[0].flops)
        for c in blocks
    )


def test_layers_differing_in_code_are_measured_separately(timed):
    # Same class and shapes; only the static ``activate`` flag differs.
    layers = [models.Dense(4, 4, activate=True, rngs=nnx.Rngs(0)), models.Dense(4, 4, activate=False, rngs=nnx.Rngs(1))]
    profile(layers, np.ones((2, 4), np.float32), 2, repeats=1, piece_fractions=(), warmup=0)
    assert len(timed) == 2 * 2


def test_model_fn_is_accepted():
    result = profile(models.mlp([4, 3]), np.ones((2, 4), np.float32), 2, repeats=1, piece_fractions=(), warmup=0,
                     seed=3)
    assert [c.name for c in result.layers] == ["Dense"]
    assert result.layers[0].param_bytes == 4 * (4 * 3 + 3)


def _timed_here(layer, x, repeats):
    """Median seconds of the layer's jitted value and parameter gradient, timed in this test.

    Parameters only: the layer is a model's first, whose backward ``profile`` times without the
    input gradient (no executor computes it).
    """
    graphdef, params = nnx.split(layer)
    fn = jax.jit(jax.value_and_grad(lambda p, x: nnx.merge(graphdef, p)(x).sum()))
    jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def test_profiled_times_agree_with_timing_the_layer_here():
    """A 1024-wide layer's profiled forward + backward is within 0.4x-2.5x of timing its value and gradient here.

    A generous bound (the machine is shared), not a speed test: timing errors
    (not waiting for the result, timing another function, seconds per row)
    are off by 10x or more. A layer 8x narrower (1/64 the flops) costs less.
    """
    rows, width = 256, 1024
    big = nnx.Linear(width, width, rngs=nnx.Rngs(0))
    x = np.ones((rows, width), np.float32)
    result = profile([big], x, rows, repeats=7, piece_fractions=(), warmup=1)
    both_s = _timed_here(big, x, repeats=7)
    assert 0.4 < result.total()[0] / both_s < 2.5, (result.total()[0], both_s)
    narrow = profile([nnx.Linear(width // 8, width // 8, rngs=nnx.Rngs(0))], x[:, : width // 8], rows, repeats=5,
                     piece_fractions=())
    assert narrow.total()[0] < result.total()[0]


def test_save_load_round_trip(lm_run, tmp_path):
    result = lm_run[2]
    path = tmp_path / "costs.json"
    result.save(path)
    assert Profile.load(path) == result
    edited = dataclasses.replace(result, layers=(dataclasses.replace(result.layers[0], flops=None),) + result.layers[1:])
    edited.save(path)
    assert Profile.load(path) == edited
    older = json.loads(path.read_text())
    del older["format"]  # a profile saved before format 3 priced pieces by their share of rows
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="format 1, this jaxpipe reads format 3"):
        Profile.load(tmp_path / "older.json")
    (tmp_path / "bad.json").write_text('{"layers": 3}')
    with pytest.raises(ValueError, match="not a saved jaxpipe Profile"):
        Profile.load(tmp_path / "bad.json")


def test_cache_is_reused_and_refreshed(tmp_path, timed):
    # Layers 1 and 2 are identical and measured once (a forward and a backward timing); layer 0
    # has their shapes but is measured apart, its backward without the input gradient.
    layers = [nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(3)]
    sample = np.ones((3, 4), np.float32)
    path = tmp_path / "costs.json"
    first = profile(layers, sample, 2, repeats=1, piece_fractions=(), warmup=0, cache=path)
    assert len(timed) == 4 and Profile.load(path) == first

    timed.clear()
    assert profile(layers, sample, 2, repeats=1, piece_fractions=(), warmup=0, cache=path) == first
    assert timed == []

    # Another micro-batch size does not match the cache: measured and saved anew.
    other = profile(layers, sample, 3, repeats=1, piece_fractions=(), warmup=0, cache=path)
    assert len(timed) == 4 and other.microbatch_rows == 3
    assert Profile.load(path) == other

    # Other layers (a different width) do not match either.
    timed.clear()
    wider = [nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1))]
    profile(wider, sample, 3, repeats=1, piece_fractions=(), warmup=0, cache=path)
    assert len(timed) == 4


def test_str_is_a_table(lm_run):
    lines = str(lm_run[2]).splitlines()
    assert lines[0] == f"Profile on {jax.devices()[0].device_kind}, {ROWS} rows per micro-batch"
    assert all(col in lines[1] for col in ("layer", "name", "fwd ms", "bwd ms", "GFLOP", "param MB", "act MB"))
    assert len(lines) == 2 + 8 + 1
    assert "Embed" in lines[2] and "Head" in lines[-2] and lines[-1].startswith("total")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"microbatch_rows": 0}, ValueError, "microbatch_rows must be >= 1"),
        ({"microbatch_rows": 7}, ValueError, "at least microbatch_rows=7 rows"),
        ({"microbatch_rows": 2.0}, TypeError, "microbatch_rows must be an int"),
        ({"repeats": 0}, ValueError, "repeats must be >= 1"),
        ({"warmup": -1}, ValueError, "warmup must be >= 0"),
        ({"layers": []}, ValueError, "layers is empty"),
        ({"layers": [lambda x: x]}, TypeError, "expected an nnx.Module"),
        ({"layers": "Dense"}, TypeError, "list of nnx.Module"),
        ({"sample": {}}, ValueError, "sample_inputs is empty"),
        ({"sample": np.float32(1.0)}, ValueError, r"shape \(\)"),
    ],
)
def test_errors(kwargs, error, match):
    layers = kwargs.pop("layers", [nnx.Linear(6, 3, rngs=nnx.Rngs(0))])
    sample = kwargs.pop("sample", np.ones((6, 6), np.float32))
    kwargs.setdefault("microbatch_rows", ROWS)
    with pytest.raises(error, match=match):
        profile(layers, sample, **kwargs)


def test_layer_failing_on_its_input_is_named():
    layers = [nnx.Linear(6, 3, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(0))]
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\) fails"):
        profile(layers, np.ones((2, 6), np.float32), 2)


def test_a_profile_with_the_loss_times_the_last_layer_with_it(tmp_path, timed):
    """``loss_fn`` adds one timing, the last layer's forward, loss and gradients fused; its backward is
    that less its forward, at least its backward alone. A cached profile without the loss is not reused
    for one with it."""
    layers = [nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(2)]
    sample, targets = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
    path = tmp_path / "costs.json"
    plain = profile(layers, sample, 2, repeats=1, piece_fractions=(), warmup=0, cache=path)
    timed.clear()
    fused = profile(layers, sample, 2, repeats=1, piece_fractions=(), warmup=0, cache=path,
                    loss_fn=lambda o, t: ((o - t) ** 2).mean(), sample_targets=targets)
    assert len(timed) == 5 and fused.with_loss and not plain.with_loss
    with pytest.MonkeyPatch.context() as mp:  # every program 1 s: fused less forward (0 s) is under the backward
        mp.setattr(prof, "_time", lambda *args: 1.0)
        flat = profile(layers, sample, 2, piece_fractions=(), loss_fn=lambda o, t: ((o - t) ** 2).mean(),
                       sample_targets=targets)
    assert flat.layers[-1].backward_s == 1.0
    assert Profile.load(path) == fused
    with pytest.raises(ValueError, match="sample_targets"):
        profile(layers, sample, 2, loss_fn=lambda o, t: o.mean())


def test_pieces_are_timed_at_their_rows_and_the_fractional_cut_prices_them(tmp_path, timed):
    """Every layer is timed again at each piece row count; a fractional cut then balances the measured
    piece costs: with pieces of few rows dear, the cut is the best of all row splits by the same
    prediction, not the equal-share split."""
    layers = [nnx.Linear(4, 4, rngs=nnx.Rngs(i)) for i in range(2)]
    path = tmp_path / "costs.json"
    measured = profile(layers, np.ones((4, 4), np.float32), 4, repeats=1, warmup=0, cache=path, piece_fractions=(0.5,))
    assert measured.piece_rows == (2,) and len(timed) == 2 * 2 * 2  # 2 layers (first without input gradient)
    assert all(len(c.piece_forward_s) == len(c.piece_backward_s) == 1 for c in measured.layers)
    assert Profile.load(path) == measured

    # Layer 0 costs 3, layer 1 costs 1 (a third forward); a piece of r rows of 8 costs s(r) of its layer.
    dear = (0.5, 0.6, 0.8)  # at 2, 4 and 6 rows; r / 8 would be 0.25, 0.5, 0.75
    costs = tuple(
        prof.LayerCost(i, "Dense", c / 3, 2 * c / 3, None, 64, 32, tuple(c / 3 * d for d in dear),
                       tuple(2 * c / 3 * d for d in dear))
        for i, c in enumerate((3.0, 1.0))
    )
    fixed = Profile(costs, 8, "cpu", piece_rows=(2, 4, 6))
    common = dict(num_devices=2, num_microbatches=8, rows=8, layer_names=["Dense"] * 2, param_bytes=[64, 64],
                  message_bytes=32)

    def fractional(plan):
        return next(c for c in plan.candidates if c.cut == "fractional" and c.schedule == "1f1b")

    planner = importlib.import_module("jaxpipe.planner")
    shares = fractional(planner.make_plan(fixed.forward(), fixed.backward(), **common))
    priced = fractional(planner.make_plan(fixed.forward(), fixed.backward(), **common, piece_scale=fixed.piece_scale()))
    assert shares.stages[0][0].stop == 5  # 3 * 5/8 against 3 * 3/8 + 1: equal shares of the cost line
    Piece = importlib.import_module("jaxpipe.partition").Piece
    step = {
        r: planner.predict(((Piece(0, 0, r),), (Piece(0, r, 8), Piece(1, 0, 8))), "1f1b", 1, "fractional",
                           fixed.forward(), fixed.backward(), 2, 8, 8, [64, 64], 32, None,
                           piece_scale=fixed.piece_scale()).step_time
        for r in range(1, 8)
    }
    assert priced.stages[0][0].stop == min(step, key=step.get) == 6
    assert priced.step_time == pytest.approx(step[6])
