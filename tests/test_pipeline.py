"""Every mesh and micro-batch count trains exactly like the single-device reference.

Losses, gradients and parameters after 3 SGD momentum steps are compared
within ``reference.FLOAT32_LOSS`` and ``FLOAT32_PARAMS``: the pipeline sums
micro-batch losses in a different order than the reference's one big batch,
which moves results by a few float32 ulps; a wrong gradient (missing
micro-batch, wrong device, wrong scale) moves them by orders of magnitude more.
"""

from __future__ import annotations

import functools

import numpy as np
import optax
import pytest
from models_for_tests import CASES, batches
from reference import assert_trains_like_reference, reference_run

import jaxpipe

ROWS_PER_MICROBATCH = 2
OPTIMIZER = optax.sgd(0.05, momentum=0.9)


@functools.cache
def _reference(case_name, rows):
    case = CASES[case_name]
    return reference_run(case.model_fn, batches(case, rows), case.loss_fn, OPTIMIZER)


def _check(case_name, mesh, m, check_grads=False, **options):
    """Trains 3 steps on the pipeline and compares with the reference."""
    case = CASES[case_name]
    rows = mesh[0] * m * ROWS_PER_MICROBATCH
    data = batches(case, rows)
    ref_losses, ref_grads, ref_params = _reference(case_name, rows)
    pipe = jaxpipe.Pipeline(case.model_fn, mesh, case.loss_fn, OPTIMIZER, m, data[0], **options)
    assert_trains_like_reference(pipe, data, ref_losses, ref_params, ref_grads if check_grads else None)
    return pipe


# A covering design rather than the full grid (6 meshes x 3 micro-batch counts x 3
# models x 2 schedules would compile 100 pipelines): every mesh meets both
# schedules, every model meets both schedules and every kind of M (one, P, not a
# multiple of P), and each of those combinations meets a data-parallel mesh.
# Gradients are compared on a third of the cases.
MATCHES = [
    # mesh, M, model, schedule, check gradients
    ((1, 2), 5, "conv", "1f1b", False),
    ((1, 2), 1, "conv", "gpipe", True),
    ((1, 4), 4, "mlp", "gpipe", False),
    ((1, 4), 9, "conv", "1f1b", True),
    ((1, 8), 8, "lm", "gpipe", False),
    ((1, 8), 1, "mlp", "1f1b", False),
    ((2, 4), 1, "lm", "1f1b", False),
    ((2, 4), 9, "mlp", "gpipe", False),
    ((4, 2), 2, "conv", "gpipe", False),
    ((4, 2), 5, "mlp", "1f1b", True),
    ((8, 1), 1, "mlp", "gpipe", False),
    ((8, 1), 3, "mlp", "1f1b", True),
]


@pytest.mark.parametrize("mesh,m,case_name,schedule,grads", MATCHES, ids=str)
def test_matches_reference(mesh, m, case_name, schedule, grads):
    pipe = _check(case_name, mesh, m, check_grads=grads, schedule=schedule)
    assert sum(pipe.partition) == 8 and len(pipe.partition) == mesh[1]


INTERLEAVED = [
    # mesh, M (a multiple of P), virtual stages (V * P <= 8 layers), model
    ((1, 2), 2, 4, "lm"),
    ((1, 4), 8, 2, "conv"),
    ((1, 8), 8, 1, "mlp"),
    ((2, 4), 4, 2, "mlp"),
    ((4, 2), 4, 4, "conv"),
    ((8, 1), 3, 4, "mlp"),
]


@pytest.mark.parametrize("mesh,m,v,case_name", INTERLEAVED, ids=str)
def test_interleaved_matches_reference(mesh, m, v, case_name):
    pipe = _check(case_name, mesh, m, check_grads=mesh == (2, 4), schedule="interleaved", virtual_stages=v)
    assert len(pipe.partition) == v * mesh[1]
    assert pipe.table.virtual_stages == v


def test_autodiff_gpipe_matches_reference():
    _check("lm", (2, 4), 9, check_grads=True, executor="autodiff")


@pytest.mark.parametrize(
    "mesh,m,schedule,v",
    [((1, 4), 3, "gpipe", 1), ((2, 4), 4, "interleaved", 2)],
    ids=str,
)
def test_dict_inputs_targets_and_int_leaves_crossing_devices(mesh, m, schedule, v):
    pipe = _check("dict", mesh, m, check_grads=True, schedule=schedule, virtual_stages=v)
    assert pipe.placement.sends_ints


def test_autodiff_remat_matches_reference():
    _check("conv", (2, 4), 4, executor="autodiff", remat=True)


@pytest.mark.parametrize(
    "case_name,mesh,m,schedule,v",
    [("mlp", (1, 4), 4, "interleaved", 2)],
    ids=str,
)
def test_table_remat_matches_reference(case_name, mesh, m, schedule, v):
    """``remat=True``: backwards recompute from the stashed input, same result."""
    pipe = _check(case_name, mesh, m, check_grads=True, schedule=schedule, virtual_stages=v, remat=True)
    assert pipe.plan.chosen.remat


def test_saved_residuals_are_counted_in_memory():
    """Saving residuals costs memory the plan shows; remat drops it."""
    case = CASES["lm"]
    data = batches(case, 8)
    plans = [jaxpipe.Pipeline(case.model_fn, (1, 4), case.loss_fn, OPTIMIZER, 4, data[0], schedule="1f1b",
                              remat=remat).plan.chosen for remat in (False, True)]
    assert np.all(plans[0].memory[:-1] > plans[1].memory[:-1])
    assert plans[0].memory[-1] == plans[1].memory[-1]
    assert plans[0].step_time < plans[1].step_time


def test_explicit_partition_is_used():
    pipe = _check("mlp", (1, 4), 4, partition=(2, 1, 1, 4))
    assert pipe.partition == (2, 1, 1, 4)
    assert pipe.placement.device_copies == ((0, 1), (2,), (3,), (4, 5, 6, 7))
