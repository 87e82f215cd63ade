"""Tied weights (one parameter several layers use) stay tied wherever the layers land.

A GPT-style LM whose head computes its logits with the embedding's matrix
(``models_for_tests.tied_lm``) must train like plain nnx training of the
layer list as one model (``reference.shared_reference_run``: nnx shares the
variable, so its gradient is the sum over both uses and it is updated once):
losses and parameters after 3 SGD-momentum steps (within
``reference.FLOAT32_LOSS`` and ``FLOAT32_PARAMS``), with every linked leaf (tied leaves and
split-layer copies) bitwise equal to its owner after every step.

Placements: (1, 1) with ``executor="autodiff"`` (both uses on one device,
gradients merged after ``jax.grad``; also saved and resumed through a
checkpoint), (1, 4) 1F1B (embedding on device 0, head on device 3), (2, 4)
GPipe with global-norm clipping (the whole-tree optimizer; the head holds
the ``nnx.Param`` itself), and balanced (1, 4) with costs that split both
the embedding and the head over two devices.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from models_for_tests import _lm_batch, tied_lm
from reference import IDENTICAL, assert_close, assert_matches_reference, shared_reference_run

import jaxpipe
from jaxpipe import models
from jaxpipe.placement import copy_links

SGD = optax.sgd(0.05, momentum=0.9)
CLIPPED = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05, momentum=0.9))
ROWS, STEPS = 16, 3
_REFERENCES = {}


def _data():
    rng = np.random.default_rng(0)
    return [_lm_batch(rng, ROWS) for _ in range(STEPS)]


def _reference(name, optimizer, param):
    if (name, param) not in _REFERENCES:
        _REFERENCES[name, param] = shared_reference_run(tied_lm(param=param), _data(), models.lm_loss, optimizer)
    return _REFERENCES[name, param]


def _assert_linked_equal(pipe, stacks, step):
    """Every tied leaf and split-layer copy equals its owner leaf, bit for bit."""
    host = [np.asarray(a) for a in stacks]
    for po, ko, pc, kc in copy_links(pipe.placement):
        np.testing.assert_array_equal(
            host[kc][pc].ravel(), host[ko][po].ravel(),
            err_msg=f"after step {step}: stack {kc} on device {pc} differs from its owner, stack {ko} on device {po}",
        )


CONFIGS = {
    "(1, 1) autodiff, resumed from a checkpoint": ((1, 1), {"executor": "autodiff"}, "sgd", False, True),
    "(1, 4) 1f1b": ((1, 4), {"schedule": "1f1b"}, "sgd", False, False),
    "(2, 4) gpipe, whole-tree clipping, tied nnx.Param": ((2, 4), {}, "clipped", True, False),
    "balanced (1, 4), both tied layers split": (
        (1, 4), {"schedule": "balanced", "costs": [2.0, 1.0, 1.0, 2.0]}, "sgd", False, False),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_tied_lm_trains_like_plain_nnx(config, tmp_path):
    mesh, options, opt_name, param, resume = CONFIGS[config]
    optimizer = {"sgd": SGD, "clipped": CLIPPED}[opt_name]
    ref_losses, ref_params = _reference(opt_name, optimizer, param)
    data = _data()
    pipe = jaxpipe.Pipeline(tied_lm(param=param), mesh, models.lm_loss, optimizer, 4, data[0], **options)
    plan = pipe.placement
    head = plan.num_layers - 1
    embedding = (11, 8)  # [vocab, dim]
    assert [spec.tied for spec in plan.specs[:head]] == [()] * head
    assert plan.specs[head].tied == ((plan.specs[head].shapes.index(embedding), 0, plan.specs[0].shapes.index(embedding)),)
    if "balanced" in config:
        split = {p.layer for stage in pipe.stages for p in stage if p.stop - p.start < pipe.microbatch_rows}
        assert split == {0, head}, pipe.stages
    state, losses = pipe.init(), []
    _assert_linked_equal(pipe, state.params, 0)
    for step, batch in enumerate(data, start=1):
        state, loss = pipe.train_step(state, batch)
        losses.append(float(loss))
        _assert_linked_equal(pipe, state.params, step)
        if resume and step == 2:
            state = _save_and_resume(pipe, state, tmp_path)
    assert_matches_reference(losses, ref_losses, pipe.from_stacks(state.params), ref_params)
    layers = pipe.layers(state.params)
    if param:
        assert layers[-1].embedding is layers[0].tokens.embedding
    else:
        assert layers[-1].tokens is layers[0].tokens


def _save_and_resume(pipe, state, directory):
    """Saves ``state``, checks what a checkpoint holds, and resumes from it."""
    store = jaxpipe.Checkpoints(directory / "ckpt")
    store.save(pipe, state)
    saved = pipe.from_stacks(state.params)
    # The head's own tree holds its LayerNorm only: the embedding is stored once, in layer 0.
    assert [np.shape(a) for a in jax.tree.leaves(saved[-1])] == [(8,), (8,)]
    with pytest.raises(ValueError, match=r"layer 3 \(TiedHead\) has parameter shapes \[\(8,\), \(8,\)\] \(its tied "
                       r"leaves are given in their owner layers \[0\], not here\), got \[\(8,\), \(8,\), \(11, 8\)\]"):
        pipe.to_stacks([pipe.placement.stacks.from_stacks([np.asarray(a) for a in state.params], i) for i in range(4)])
    restored, info = store.restore(pipe)
    store.close()
    assert info.step == 2
    loaded = jaxpipe.load_layers(tied_lm(), directory / "ckpt")
    assert loaded[-1].tokens is loaded[0].tokens
    _, joint, _ = nnx.split(loaded, nnx.Param, ...)
    assert_close([joint[i] if i in joint else nnx.State({}) for i in range(4)], saved, IDENTICAL, "loaded layers")
    assert_close(pipe.from_stacks(restored.params), saved, IDENTICAL, "restored parameters")
    return restored
