"""The build phases alone (``build.py``) and the options' one home (``PipelineConfig``).

``choose_stages`` is checked against a brute-force min-max over every
contiguous cut; nothing here compiles a step.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import optax
import pytest
from models_for_tests import mse

import jaxpipe
from jaxpipe import models
from jaxpipe.build import LayerCosts, choose_stages, trace_model
from jaxpipe.config import PipelineConfig


def _costs(forward, backward):
    forward, backward = np.asarray(forward, np.float64), np.asarray(backward, np.float64)
    n = len(forward)
    return LayerCosts(forward, backward, "cost", tuple(f"layer{i}" for i in range(n)), (4.0,) * n, (0.0,) * n, 64.0)


def _min_max_cuts(total, num_stages):
    """Every partition of ``total`` into ``num_stages`` contiguous non-empty runs whose largest sum is least."""
    n, best, found = len(total), np.inf, []
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = (0,) + cuts + (n,)
        counts = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        worst = max(sum(total[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        if worst < best - 1e-12:
            best, found = worst, [counts]
        elif abs(worst - best) <= 1e-12:
            found.append(counts)
    return found


# Forward and backward costs that are not proportional: their sum has one
# min-max cut for 3 and for 4 stages, and it is no min-max cut of either alone.
FORWARD = [6.0, 6.0, 2.0, 5.0, 6.0, 6.0, 5.0]
BACKWARD = [3.0, 2.0, 5.0, 6.0, 6.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "options,num_devices",
    [({"schedule": "1f1b"}, 3), ({"schedule": "interleaved", "virtual_stages": 2, "num_microbatches": 2}, 2)],
    ids=["1f1b-P3", "interleaved-V2P2"],
)
def test_choose_stages_gives_the_min_max_cut_of_forward_plus_backward(options, num_devices):
    config = PipelineConfig(**options)
    num_stages = config.virtual_stages * num_devices
    total = [f + b for f, b in zip(FORWARD, BACKWARD)]
    (best,) = _min_max_cuts(total, num_stages)
    assert best not in _min_max_cuts(FORWARD, num_stages) + _min_max_cuts(BACKWARD, num_stages)

    choice = choose_stages(_costs(FORWARD, BACKWARD), config, num_devices, rows=4)

    assert choice.partition == best
    assert [[(p.layer, p.start, p.stop) for p in stage] for stage in choice.stages] == [
        [(layer, 0, 4) for layer in range(start, start + count)]
        for start, count in zip(np.cumsum((0,) + choice.partition[:-1]), choice.partition)
    ]
    assert (choice.schedule, choice.virtual_stages, choice.cut) == (config.schedule, config.virtual_stages, "integer")
    assert choice.plan.chosen.stages == choice.stages


def test_choose_stages_keeps_an_unsplittable_layer_whole_in_a_fractional_cut():
    forward, backward = [1.0, 1.0, 4.0, 1.0, 1.0], [2.0, 2.0, 8.0, 2.0, 2.0]
    config = PipelineConfig(schedule="balanced")
    free = choose_stages(_costs(forward, backward), config, 2, rows=8)
    assert any(p.layer == 2 and p.stop - p.start < 8 for stage in free.stages for p in stage), (
        "without the constraint the even cut falls inside layer 2"
    )

    kept = choose_stages(_costs(forward, backward), config, 2, rows=8, unsplittable=(2,))

    pieces = [p for stage in kept.stages for p in stage if p.layer == 2]
    assert [(p.start, p.stop) for p in pieces] == [(0, 8)]
    assert kept.cut == "fractional" and kept.schedule == "1f1b"
    assert kept.plan.unsplittable == (2,)


def test_trace_model_shapes_one_microbatch_of_the_example_batch():
    widths = [6, 8, 3]
    batch = (np.ones((12, 6), np.float32), np.zeros((12, 3), np.float32))
    traced = trace_model(models.mlp(widths), mse, batch, PipelineConfig(num_microbatches=2), 3, 1)
    assert traced.microbatch_rows == 2  # 12 rows / (D=3 x M=2)
    assert [s.shape for s in traced.structs] == [(2, w) for w in widths]
    assert traced.y_mb.shape == (2, 3)


def test_config_normalises_and_revalidates_on_replace():
    config = PipelineConfig(schedule="balanced", partition=None, costs=np.array([1, 2]), unsplittable=[1])
    assert (config.schedule, config.cut, config.costs, config.unsplittable) == ("1f1b", "fractional", (1.0, 2.0), (1,))
    with pytest.raises(ValueError, match=r"cut='fractional' \(schedule='balanced'\) needs executor='table'"):
        dataclasses.replace(config, executor="autodiff")
    with pytest.raises(ValueError, match=r"schedule='auto' computes its own cut; drop partition=\(1, 2\)"):
        PipelineConfig(schedule="auto", partition=(1, 2))
    with pytest.raises(TypeError, match=r"costs must be a Profile, \[L\] numbers .*got 'cheap'"):
        PipelineConfig(costs="cheap")


def test_options_are_given_once():
    config = PipelineConfig(num_microbatches=2, schedule="1f1b")
    assert PipelineConfig.from_options(config, num_microbatches=2) is config
    with pytest.raises(ValueError, match=r"options \{'num_microbatches': 4\} contradict config="):
        PipelineConfig.from_options(config, num_microbatches=4)
    with pytest.raises(TypeError, match=r"unknown option shedule; the pipeline options are num_microbatches, "):
        jaxpipe.train(models.mlp([6, 3]), data=[], loss_fn=mse, optimizer=optax.sgd(0.1), steps=1, shedule="1f1b")


def test_a_pipeline_built_from_a_config_runs_it():
    batch = (np.ones((8, 6), np.float32), np.zeros((8, 5), np.float32))
    config = PipelineConfig(num_microbatches=4, schedule="1f1b", seed=3)
    pipe = jaxpipe.Pipeline(models.mlp([6, 8, 8, 5]), (1, 2), mse, optax.sgd(0.1), None, batch, config=config)
    assert pipe.config is config
    assert (pipe.schedule, pipe.num_microbatches, pipe.microbatch_rows, pipe.seed) == ("1f1b", 4, 2, 3)
    assert pipe.table.num_microbatches == 4 and pipe.table.num_devices == 2
