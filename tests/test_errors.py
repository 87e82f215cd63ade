"""Bad inputs fail early with a ValueError or TypeError that names the value and the fix.

Almost every error here is raised while ``Pipeline`` checks its arguments,
before anything is compiled; where a test shows that something is accepted,
it runs one gradient on one device against the reference.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models_for_tests import mse
from reference import SAME_MATH_LOSS, assert_close, assert_matches_reference, reference_run

import jaxpipe
from jaxpipe import models

OPTIMIZER = optax.sgd(0.1)
MLP = models.mlp([6, 8, 8, 5])  # 3 layers: [R, 6] -> [R, 5]


def _batch(rows, target_rows=None, din=6, dout=5):
    target_rows = rows if target_rows is None else target_rows
    return np.ones((rows, din), np.float32), np.zeros((target_rows, dout), np.float32)


def _pipeline(model_fn=MLP, mesh_shape=(1, 1), loss_fn=mse, optimizer=OPTIMIZER, num_microbatches=1, batch=None, **options):
    return jaxpipe.Pipeline(
        model_fn, mesh_shape, loss_fn, optimizer, num_microbatches, _batch(4) if batch is None else batch, **options
    )


def _train(model_fn=MLP, mesh_shape=(1, 1), data=None, steps=1, **options):
    data = [_batch(4)] * steps if data is None else data
    return jaxpipe.train(
        model_fn, mesh_shape, data=data, loss_fn=mse, optimizer=OPTIMIZER, steps=steps, progress=False, **options
    )


# The mesh


def test_mesh_needing_more_devices_than_there_are():
    message = (
        r"mesh_shape=\(4, 4\) needs 16 devices but only 8 are available \(cpu\); use a mesh with "
        r"data \* pipe <= 8; or run several processes, e.g. `python -m jaxpipe.launch --nproc 16 -- python "
        r"your_script.py` on this machine .*; or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=16"
    )
    with pytest.raises(ValueError, match=message):
        _pipeline(mesh_shape=(4, 4))
    with pytest.raises(ValueError, match=message):
        _train(mesh_shape=(4, 4))


def test_mesh_larger_than_the_given_devices():
    with pytest.raises(ValueError, match=r"mesh_shape=\(1, 2\) needs 2 devices but only 1 are available"):
        _pipeline(mesh_shape=(1, 2), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 2), (2, 2)], ids=str)
def test_mesh_needing_fewer_devices_uses_the_first_ones(mesh_shape):
    pipe = _pipeline(mesh_shape=mesh_shape, num_microbatches=2, batch=_batch(8))
    needed = mesh_shape[0] * mesh_shape[1]
    assert pipe.mesh.devices.shape == mesh_shape
    assert pipe.mesh.devices.ravel().tolist() == jax.devices()[:needed]


@pytest.mark.parametrize("mesh_shape", [2, "12", None, (2,), (1, 2, 1), (1.0, 2), (1, 2.5), (True, 1)], ids=repr)
def test_mesh_shape_of_the_wrong_type_or_length(mesh_shape):
    with pytest.raises(TypeError, match=r"mesh_shape must be a pair \(data, pipe\) of ints, got " + re.escape(repr(mesh_shape))):
        _pipeline(mesh_shape=mesh_shape)


@pytest.mark.parametrize("mesh_shape", [(0, 1), (1, 0), (2, -1)], ids=str)
def test_mesh_shape_with_entries_below_one(mesh_shape):
    data, pipe = mesh_shape
    with pytest.raises(ValueError, match=rf"mesh_shape entries must be >= 1, got \(data={data}, pipe={pipe}\)"):
        _pipeline(mesh_shape=mesh_shape)


# The batch


def test_rows_not_divisible_by_data_times_microbatches():
    with pytest.raises(
        ValueError,
        match=r"the global batch has 10 rows, which does not divide into data=2 replicas x "
        r"num_microbatches=3; use a batch of a multiple of 6 rows",
    ):
        _pipeline(mesh_shape=(2, 1), num_microbatches=3, batch=_batch(10))


def test_inputs_and_targets_with_different_rows():
    with pytest.raises(ValueError, match=r"inputs have 8 rows but targets have 6; they must match"):
        _pipeline(batch=_batch(8, target_rows=6))


def test_input_leaves_with_different_rows():
    inputs = {"x": np.ones((4, 6), np.float32), "ids": np.ones((3, 2), np.int32)}
    with pytest.raises(ValueError, match=r"every array in inputs must have the same leading dimension \(rows\), got shapes"):
        _pipeline(batch=(inputs, np.zeros((4, 5), np.float32)))


def test_empty_inputs():
    with pytest.raises(ValueError, match=r"inputs is empty; give an array or a pytree of arrays"):
        _pipeline(batch=({}, np.zeros((4, 5), np.float32)))


@pytest.mark.parametrize(
    "batch,kind",
    [(np.ones((4, 6), np.float32), "ndarray"), (_batch(4) + (None,), "tuple"), ({"x": 1, "y": 2}, "dict")],
    ids=["array", "triple", "dict"],
)
def test_batch_that_is_not_a_pair(batch, kind):
    with pytest.raises(TypeError, match=rf"each batch must be a pair \(inputs, targets\) .*got {kind}"):
        _pipeline(batch=batch)


def test_later_batches_are_checked_too():
    pipe = _pipeline(num_microbatches=2, batch=_batch(8))
    with pytest.raises(TypeError, match=r"each batch must be a pair \(inputs, targets\)"):
        pipe.shard_batch(np.ones((8, 6), np.float32))
    with pytest.raises(ValueError, match=r"this pipeline was built for global batches of 8 rows, got 4"):
        pipe.shard_batch(_batch(4))


# The model


def test_fewer_layers_than_pipe_devices():
    with pytest.raises(
        ValueError,
        match=r"the model has 3 layers but mesh_shape=\(1, 4\) has 4 pipe devices; every pipe device "
        r"needs at least one layer, so use pipe <= 3",
    ):
        _pipeline(mesh_shape=(1, 4))


def test_layer_that_fails_on_its_input_shape():
    def model_fn(rngs):
        return [nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs), nnx.Linear(7, 5, rngs=rngs)]

    with pytest.raises(ValueError, match=r"layer 2 \(Linear\) fails on its input float32\[4, 8\]: TypeError: "):
        _pipeline(model_fn, num_microbatches=2, batch=_batch(8))


def test_model_fn_returning_a_single_module():
    with pytest.raises(TypeError, match=r"model_fn must return a list of nnx.Module layers in order, got Linear"):
        _pipeline(lambda rngs: nnx.Linear(6, 5, rngs=rngs))


def test_model_fn_returning_a_generator():
    with pytest.raises(TypeError, match=r"model_fn must return a list of nnx.Module layers in order, got generator"):
        _pipeline(lambda rngs: (nnx.Linear(6, 5, rngs=rngs) for _ in range(2)))


def test_model_fn_returning_a_non_module():
    with pytest.raises(TypeError, match=r"layer 1 is a function, expected an nnx.Module"):
        _pipeline(lambda rngs: [nnx.Linear(6, 5, rngs=rngs), lambda x: x])


def test_model_fn_returning_no_layers():
    with pytest.raises(ValueError, match=r"model_fn returned no layers; it must return a non-empty list"):
        _pipeline(lambda rngs: [])


def test_model_fn_and_loss_fn_not_callable():
    with pytest.raises(TypeError, match=r"model_fn must be callable, got list"):
        _pipeline([nnx.Linear(6, 5, rngs=nnx.Rngs(0))])
    with pytest.raises(TypeError, match=r"loss_fn must be callable, got str"):
        _pipeline(loss_fn="mse")


def test_layer_with_batch_statistics():
    def model_fn(rngs):
        return [nnx.Linear(6, 5, rngs=rngs), nnx.BatchNorm(5, rngs=rngs)]

    with pytest.raises(
        TypeError,
        match=r"layer 1 \(BatchNorm\) holds batch statistics at \['mean', 'var'\] that it would update; "
        r"jaxpipe trains nnx.Param state only.*schedule's order.*nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm.*"
        r"use_running_average=True",
    ):
        _pipeline(model_fn)


def test_nested_batch_statistics_are_named_by_path():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 5, rngs=rngs)
            self.norm = nnx.BatchNorm(5, rngs=rngs)

        def __call__(self, x):
            return self.norm(self.linear(x))

    with pytest.raises(TypeError, match=r"layer 0 \(Block\) holds batch statistics at \['norm/mean', 'norm/var'\]"):
        _pipeline(lambda rngs: [Block(rngs)])


def test_dropout_with_rng_state_is_accepted_and_never_split():
    def model_fn(rngs):
        return [nnx.Linear(6, 5, rngs=rngs), nnx.Dropout(0.1, rngs=rngs)]

    pipe = _pipeline(model_fn)
    assert pipe.placement.specs[1].streams == (("rngs", "key"),)
    assert 1 in pipe.unsplittable


def test_evaluate_refuses_a_layer_that_still_draws_in_evaluation_mode():
    from flax import linen as nn

    class LinenDrop(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic=False):
            return nn.Dropout(0.5)(nn.Dense(5)(x), deterministic=deterministic)

    def model_fn(rngs):
        return [nnx.Linear(6, 6, rngs=rngs), nnx.bridge.ToNNX(LinenDrop(), rngs=rngs).lazy_init(np.ones((1, 6)))]

    pipe = _pipeline(model_fn)
    state = pipe.init()
    with pytest.raises(ValueError, match=r"layer 1 \(ToNNX\) still uses its RNG streams .*after layer.eval\(\).*jaxpipe.linen"):
        pipe.evaluate(state.params, _batch(4))


def _assert_first_gradient_like_reference(pipe, model_fn, batch):
    ref_losses, ref_grads, _ = reference_run(model_fn, [batch], mse, OPTIMIZER)
    loss, grads = pipe.loss_and_grad(pipe.init().params, batch)
    assert_matches_reference([float(loss)], ref_losses, grads=pipe.from_stacks(grads), ref_grads=ref_grads)


def _random_batch(rows=4):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, 6)).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32)


def _linear_then_dropout(rngs):
    return [nnx.Linear(6, 5, rngs=rngs), nnx.Dropout(0.1, deterministic=True)]


def test_dropout_without_rngs_is_accepted():
    """A deterministic Dropout built without RNG streams needs no keys: it is the identity."""
    _assert_first_gradient_like_reference(_pipeline(_linear_then_dropout), _linear_then_dropout, _random_batch())


def test_parameters_of_mixed_dtypes():
    def model_fn(rngs):
        return [nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 5, param_dtype=jnp.bfloat16, rngs=rngs)]

    with pytest.raises(
        TypeError,
        match=r"all parameters must share one floating dtype .*got float32 \(first in layer 0 \(Linear\)\), "
        r"bfloat16 \(first in layer 1 \(Linear\)\); build every layer with the same float param_dtype",
    ):
        _pipeline(model_fn)


class WithAux(nnx.Module):
    """Returns ``(h [R, 8], aux [4])``: ``aux`` does not depend on the rows."""

    def __init__(self, *, rngs):
        self.linear = nnx.Linear(6, 8, rngs=rngs)

    def __call__(self, x):
        return self.linear(x), jnp.linspace(0.0, 1.0, 4)


class UseAux(nnx.Module):
    def __init__(self, *, rngs):
        self.linear = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, h_aux):
        h, aux = h_aux
        return self.linear(h) * aux.sum()


def _aux_model(rngs):
    return [WithAux(rngs=rngs), UseAux(rngs=rngs)]


@pytest.mark.parametrize("num_microbatches", [1, 2], ids=["4-rows", "2-rows"])
def test_boundary_leaf_without_rows_first_at_a_device_cut(num_microbatches):
    """Rejected even when its size happens to equal the micro-batch's rows (4 rows, M=1)."""
    with pytest.raises(ValueError, match=r"the output of layer 0 has a leaf at \[1\] of shape \(4,\)"):
        _pipeline(_aux_model, mesh_shape=(1, 2), num_microbatches=num_microbatches)


def test_boundary_leaf_without_rows_inside_one_device_is_fine():
    """It never crosses a device, so it reaches the next layer whole (the loss scales with its sum)."""
    _assert_first_gradient_like_reference(_pipeline(_aux_model, mesh_shape=(1, 1)), _aux_model, _random_batch())


# The loss


def test_loss_fn_returning_per_row_losses():
    with pytest.raises(
        ValueError,
        match=r"loss_fn must return a float scalar \(the mean loss over one micro-batch\), got float32\[2\]",
    ):
        _pipeline(loss_fn=lambda outputs, targets: jnp.mean((outputs - targets) ** 2, axis=-1), num_microbatches=2)


def test_loss_fn_returning_an_int():
    with pytest.raises(ValueError, match=r"loss_fn must return a float scalar .*got int32\[\]"):
        _pipeline(loss_fn=lambda outputs, targets: jnp.argmax(outputs).astype(jnp.int32))


def test_loss_fn_that_fails_on_the_outputs():
    with pytest.raises(
        ValueError,
        match=r"loss_fn fails on one micro-batch's model outputs float32\[4, 5\] and targets "
        r"float32\[4, 3\]: TypeError: ",
    ):
        _pipeline(batch=_batch(4, dout=3))


# The options


@pytest.mark.parametrize(
    "partition,error,match",
    [
        ((1, 1), ValueError, r"partition=\(1, 1\) sums to 2 but the model has 3 layers; the counts must sum to 3"),
        ((3,), ValueError, r"partition=\(3,\) has 1 entries but .*2 pipe devices; give one layer count per pipe device"),
        ((3, 0), ValueError, r"partition=\(3, 0\): every pipe device needs at least one layer"),
        ((2.0, 1.0), TypeError, r"partition must be a sequence of ints \(layers per pipe device\), got \(2.0, 1.0\)"),
        (3, TypeError, r"partition must be a sequence of ints \(layers per pipe device\), got 3"),
    ],
    ids=["sum", "length", "zero", "floats", "int"],
)
def test_bad_partition(partition, error, match):
    with pytest.raises(error, match=match):
        _pipeline(mesh_shape=(1, 2), partition=partition)


def test_unknown_schedule():
    with pytest.raises(ValueError, match=r"schedule='pipedream' is not one of \(.*'gpipe'.*\)"):
        _pipeline(schedule="pipedream")


@pytest.mark.parametrize("num_microbatches", [0, -2], ids=str)
def test_num_microbatches_below_one(num_microbatches):
    with pytest.raises(ValueError, match=rf"num_microbatches must be >= 1, got {num_microbatches}"):
        _pipeline(num_microbatches=num_microbatches)


@pytest.mark.parametrize("num_microbatches", [2.0, "2", True, None], ids=repr)
def test_num_microbatches_not_an_int(num_microbatches):
    with pytest.raises(TypeError, match=r"num_microbatches must be an int, got " + re.escape(repr(num_microbatches))):
        _pipeline(num_microbatches=num_microbatches)


def test_optimizer_not_a_gradient_transformation():
    with pytest.raises(TypeError, match=r"optimizer must be an optax.GradientTransformation, got function"):
        _pipeline(optimizer=optax.sgd)


# train


@pytest.mark.parametrize("steps", [0, -1], ids=str)
def test_steps_below_one(steps):
    with pytest.raises(ValueError, match=rf"steps must be >= 1, got {steps}"):
        _train(data=[_batch(4)], steps=steps)


@pytest.mark.parametrize("steps", [1.0, "3", None], ids=repr)
def test_steps_not_an_int(steps):
    with pytest.raises(TypeError, match=r"steps must be an int, got " + re.escape(repr(steps))):
        _train(data=[_batch(4)], steps=steps)


def test_steps_may_be_a_numpy_int():
    assert len(_train(data=[_batch(4)], steps=np.int64(1)).losses) == 1


def test_data_list_shorter_than_steps_fails_before_training():
    with pytest.raises(ValueError, match=r"data has 2 batches but steps=3; give an iterable with at least one batch per step"):
        _train(data=[_batch(4)] * 2, steps=3)


def test_data_generator_that_runs_out_before_steps():
    def two_batches():
        yield _batch(4)
        yield _batch(4)

    with pytest.raises(ValueError, match=r"data ran out after 2 batches but steps=3; give an iterable with at least one batch per step"):
        _train(data=two_batches(), steps=3)


def test_empty_data_generator():
    with pytest.raises(ValueError, match=r"data ran out after 0 batches but steps=1"):
        _train(data=iter(()), steps=1)


def test_data_not_iterable():
    with pytest.raises(TypeError, match=r"data must be an iterable of \(inputs, targets\) batches, got int"):
        _train(data=5, steps=1)


def test_train_checks_every_batch():
    def batches():
        yield _batch(4)
        yield np.ones((4, 6), np.float32)

    with pytest.raises(TypeError, match=r"each batch must be a pair \(inputs, targets\) .*got ndarray"):
        _train(data=batches(), steps=2)


def test_interleaved_needs_v_times_p_layers():
    with pytest.raises(ValueError, match=r"virtual_stages=2 on 2 pipe devices needs at least 4 layers .* model has 3.*at most 1"):
        _pipeline(mesh_shape=(1, 2), num_microbatches=2, schedule="interleaved", virtual_stages=2)


def test_interleaved_needs_m_a_multiple_of_p():
    with pytest.raises(ValueError, match=r"M=3.*P=2|multiple of"):
        _pipeline(model_fn=models.mlp([6] * 5 + [5]), mesh_shape=(1, 2), num_microbatches=3,
                  batch=_batch(6), schedule="interleaved", virtual_stages=2)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_virtual_stages_only_with_interleaved(schedule):
    with pytest.raises(ValueError, match=r"virtual_stages=2 with schedule='.*'.*only with schedule='interleaved'"):
        _pipeline(schedule=schedule, virtual_stages=2)


@pytest.mark.parametrize("virtual_stages,error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_virtual_stages_bad_values(virtual_stages, error):
    with pytest.raises(error, match="virtual_stages"):
        _pipeline(schedule="interleaved", virtual_stages=virtual_stages)


def test_partition_per_stage_with_interleaved():
    with pytest.raises(ValueError, match=r"4 stages \(2 virtual stages x 2 pipe devices\)"):
        _pipeline(model_fn=models.mlp([6] * 5 + [5]), mesh_shape=(1, 2), num_microbatches=2,
                  schedule="interleaved", virtual_stages=2, partition=(3, 2))


def test_unknown_executor_and_autodiff_with_other_schedules():
    with pytest.raises(ValueError, match=r"executor='xla' is not one of"):
        _pipeline(executor="xla")
    with pytest.raises(ValueError, match=r"executor='autodiff' runs GPipe only, got schedule='1f1b'"):
        _pipeline(executor="autodiff", schedule="1f1b")


# Options and the lower-level entry points


def test_seed_remat_and_memory_limit_types():
    with pytest.raises(TypeError, match=r"seed must be an int, got 'a'"):
        _pipeline(seed="a")
    with pytest.raises(TypeError, match=r"remat must be True, False or None, got 'yes'"):
        _pipeline(remat="yes")
    with pytest.raises(TypeError, match=r"max_memory_per_device must be a number of bytes, got '1GB'"):
        _pipeline(schedule="auto", max_memory_per_device="1GB")
    with pytest.raises(ValueError, match=r"max_memory_per_device must be a positive number of bytes, got -1"):
        _pipeline(schedule="auto", max_memory_per_device=-1)


def test_devices_must_be_jax_devices():
    with pytest.raises(TypeError, match=r"devices must be jax.Device objects .*got 0"):
        _pipeline(devices=[0, 1])


def test_simulate_rejects_wrong_types():
    with pytest.raises(TypeError, match=r"schedule must be a jaxpipe.Schedule .*got str"):
        jaxpipe.simulate("1f1b", jaxpipe.Costs.uniform(2))
    with pytest.raises(TypeError, match=r"costs must be a jaxpipe.Costs .*got dict"):
        jaxpipe.simulate(jaxpipe.gpipe(2, 2), {"forward": 1.0})


def test_make_plan_per_layer_lengths_must_agree():
    with pytest.raises(ValueError, match=r"one entry per layer .*'forward': 1, 'backward': 2"):
        jaxpipe.make_plan([1.0], [1.0, 2.0], 2, 4, 4, layer_names=["a"], param_bytes=[4], message_bytes=4)


# Batch shapes and dtypes (issue 15)


class _MeanOverTokens(nnx.Module):
    def __call__(self, x):
        return x.mean(1)


def _pool_model(rngs):
    return [nnx.Linear(4, 8, rngs=rngs), _MeanOverTokens()]


def _tokens_batch(rows, tokens, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, tokens, 4)).astype(np.float32), rng.normal(size=(rows, 8)).astype(np.float32)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 2)], ids=str)
def test_a_batch_with_a_shorter_sequence_is_refused(mesh_shape):
    data = [_tokens_batch(8, 3), _tokens_batch(8, 2)]
    with pytest.raises(ValueError, match=re.escape(
        "batch leaf inputs is float32[8, 2, 4], but this pipeline was built for float32[8, 3, 4] "
        "(the example batch's shape and dtype)"
    )):
        jaxpipe.train(_pool_model, mesh_shape, data=data, loss_fn=mse, optimizer=OPTIMIZER, steps=2,
                      progress=False)


def test_batch_leaf_dtype_and_structure_are_checked():
    pipe = _pipeline(num_microbatches=2, batch=_batch(8))
    x, y = _batch(8)
    with pytest.raises(ValueError, match=re.escape("batch leaf targets is int32[8, 5], but this pipeline was built "
                                                   "for float32[8, 5]")):
        pipe.shard_batch((x, y.astype(np.int32)))
    with pytest.raises(ValueError, match=r"the batch's structure .* differs from the example batch's"):
        pipe.shard_batch(({"x": x}, y))
    # float64 and int64 are what JAX makes float32 and int32 of: not an error.
    pipe.shard_batch((x.astype(np.float64), y))


def test_a_dict_leaf_is_named_by_its_path():
    inputs = {"x": np.ones((4, 6), np.float32), "ids": np.zeros((4, 3), np.int32)}
    batch = (inputs, np.zeros((4, 5), np.float32))

    def model(rngs):
        return [_DictSum(rngs=rngs)]

    pipe = _pipeline(model_fn=model, batch=batch)
    bad = ({"x": inputs["x"], "ids": np.zeros((4, 2), np.int32)}, batch[1])
    with pytest.raises(ValueError, match=re.escape("batch leaf inputs['ids'] is int32[4, 2], but this pipeline "
                                                   "was built for int32[4, 3]")):
        pipe.train_step(pipe.init(), bad)


class _DictSum(nnx.Module):
    def __init__(self, *, rngs):
        self.linear = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, batch):
        return self.linear(batch["x"]) + batch["ids"].sum(1, keepdims=True)


def test_eval_batches_are_checked_too():
    data = [_tokens_batch(8, 3)] * 2
    with pytest.raises(ValueError, match=re.escape("eval_data batch 1: batch leaf inputs is float32[8, 5, 4]")):
        jaxpipe.train(_pool_model, (1, 2), data=data, loss_fn=mse, optimizer=OPTIMIZER, steps=2, progress=False,
                      eval_data=[_tokens_batch(8, 3, 1), _tokens_batch(8, 5, 2)])


def test_placed_batches_are_checked_and_data_sharded_rows_are_placed():
    from jax.sharding import NamedSharding, PartitionSpec

    batch = _tokens_batch(8, 3)
    pipe = jaxpipe.Pipeline(_pool_model, (2, 1), mse, OPTIMIZER, 2, batch)
    other = jaxpipe.Pipeline(_pool_model, (2, 1), mse, OPTIMIZER, 2, _tokens_batch(8, 2))
    with pytest.raises(ValueError, match=re.escape("batch leaf inputs is float32[2, 2, 2, 2, 4], but this pipeline "
                                                   "was built for float32[2, 2, 2, 3, 4]")):
        pipe.loss_and_grad(pipe.init().params, other.shard_batch(_tokens_batch(8, 2)))
    # Arrays of [R, ...] rows already sharded over data are placed like host arrays.
    sharded = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(pipe.mesh, PartitionSpec("data"))), batch)
    params = pipe.init().params
    want, _ = pipe.loss_and_grad(params, batch)
    got, _ = pipe.loss_and_grad(params, sharded)
    assert_close(float(got), float(want), SAME_MATH_LOSS, "loss of a placed batch")


# States (issue 15)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 2)], ids=str)
def test_reusing_a_donated_state_is_an_error_before_any_computation(mesh_shape):
    pipe = _pipeline(mesh_shape=mesh_shape, num_microbatches=2, batch=_batch(8))
    state = pipe.init()
    new, loss = pipe.train_step(state, _batch(8))
    message = r"state was donated to an earlier train_step .* pass the state the last train_step returned"
    with pytest.raises(ValueError, match=message):
        pipe.train_step(state, _batch(8))
    with pytest.raises(ValueError, match=r"params was donated to an earlier train_step"):
        pipe.loss_and_grad(state.params, _batch(8))
    again, loss_again = pipe.train_step(new, _batch(8))  # the returned state still works
    assert np.isfinite(float(loss_again)) and int(again.step) == 2


def test_a_state_of_another_pipeline_is_named():
    pipe = _pipeline(mesh_shape=(1, 2), num_microbatches=2, batch=_batch(8))
    other = _pipeline(model_fn=models.mlp([6, 8, 9, 5]), mesh_shape=(1, 2), num_microbatches=2, batch=_batch(8))
    with pytest.raises(ValueError, match=r"state is not a state of this Pipeline: (its structure|state\.params\S* is "
                                         r"float32\[.*, this Pipeline's is float32\[)"):
        pipe.train_step(other.init(), _batch(8))
    adam = _pipeline(mesh_shape=(1, 2), num_microbatches=2, batch=_batch(8), optimizer=optax.adam(0.1))
    with pytest.raises(ValueError, match=r"state is not a state of this Pipeline: its structure"):
        pipe.train_step(adam.init(), _batch(8))


# Messages that name the wrong value and what is right (issue 15)


def test_a_batch_of_zero_rows():
    message = re.escape("the global batch has 0 rows; give at least data=2 x num_microbatches=2 = 4 rows")
    with pytest.raises(ValueError, match=message):
        _pipeline(mesh_shape=(2, 1), num_microbatches=2, batch=_batch(0))
    with pytest.raises(ValueError, match=message):
        _train(mesh_shape=(2, 1), data=[_batch(0)], num_microbatches=2)


def test_the_same_device_twice():
    d0 = jax.devices()[0]
    with pytest.raises(ValueError, match=re.escape(f"devices lists {d0} more than once; every mesh position needs "
                                                   "its own device")):
        _pipeline(mesh_shape=(1, 2), devices=[d0, d0])


@pytest.mark.parametrize("unsplittable", [1, "1"], ids=repr)
def test_unsplittable_that_is_not_a_sequence(unsplittable):
    with pytest.raises(TypeError, match=re.escape(f"unsplittable must be a sequence of layer indices, e.g. "
                                                  f"({unsplittable!r},) or [1, 3], got {unsplittable!r}")):
        _pipeline(unsplittable=unsplittable)


def test_token_ids_beyond_the_vocabulary_are_named_as_a_cause():
    lm = models.transformer_lm(vocab=8, seq_len=6, dim=8, heads=2, blocks=2)
    ids = np.random.default_rng(0).integers(0, 12, (4, 7)).astype(np.int32)
    ids[0, 0] = 11
    with pytest.raises(jaxpipe.NonFiniteError, match=re.escape(
        "Layer 0 (Embed) is the first whose output is not finite. The batch's integer inputs range over [0, 11]: "
        "an id outside an embedding's table (e.g. token ids at or above the vocabulary size"
    )):
        jaxpipe.train(lm, (1, 2), data=[(ids[:, :-1], ids[:, 1:])], loss_fn=models.lm_loss, optimizer=OPTIMIZER,
                      steps=1, progress=False)
