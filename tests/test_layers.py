"""Pure pieces of ``layers.py``, ``stacks.py``, ``wire.py`` and ``tracing.py``: splitting, ties, stacks, messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_for_tests import CASES

from jaxpipe.stacks import Item, StackLayout
from jaxpipe.layers import apply_layer, merge_layers, model_graph, split_layers
from jaxpipe.tracing import check_rows_follow, trace_at_rows, trace_boundaries
from jaxpipe.wire import Boundary, Carrier


class Affine(nnx.Module):
    """``x * scale + shift`` with a scalar and a vector parameter: leaves of different ranks."""

    def __init__(self, dim, *, rngs):
        self.scale = nnx.Param(jax.random.normal(rngs.params(), ()))
        self.shift = nnx.Param(jax.random.normal(rngs.params(), (dim,)))

    def __call__(self, x):
        return x * self.scale[...] + self.shift[...]


class NoParams(nnx.Module):
    def __call__(self, x):
        return jnp.tanh(x)


def _hetero_layers(rngs):
    """Six layers of different parameter trees and sizes (one without parameters)."""
    return [
        nnx.Linear(3, 4, rngs=rngs),
        nnx.Linear(4, 6, use_bias=False, rngs=rngs),
        NoParams(),
        nnx.LayerNorm(6, rngs=rngs),
        Affine(6, rngs=rngs),
        nnx.Linear(6, 2, rngs=rngs),
    ]


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def _abstract_layers(case_name):
    """A test model's layers with shape-only parameters: no initialisation to run."""
    return nnx.eval_shape(lambda: CASES[case_name].model_fn(nnx.Rngs(0)))


# split_layers


def test_split_layers_gives_specs_params_and_dtype():
    layers = _hetero_layers(nnx.Rngs(0))
    specs, params, dtype = split_layers(layers)
    assert dtype == jnp.float32
    assert [s.index for s in specs] == list(range(6))
    assert [s.name for s in specs] == ["Linear", "Linear", "NoParams", "LayerNorm", "Affine", "Linear"]
    assert sorted(specs[0].shapes) == [(3, 4), (4,)]
    assert specs[1].shapes == ((4, 6),)
    assert specs[2].shapes == () and specs[2].size == 0
    assert [s.size for s in specs] == [16, 24, 0, 12, 7, 14]
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    for spec, tree, layer in zip(specs, params, layers):
        assert [tuple(leaf.shape) for leaf in jax.tree.leaves(tree)] == list(spec.shapes)
        y = apply_layer(spec, tree, x)
        np.testing.assert_array_equal(y, layer(x))
        x = y


def test_split_layers_accepts_bfloat16_parameters():
    layers = [nnx.Linear(3, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)) for _ in range(2)]
    _, _, dtype = split_layers(layers)
    assert dtype == jnp.bfloat16


def test_split_layers_without_parameters_defaults_to_float32():
    _, _, dtype = split_layers([NoParams(), NoParams()])
    assert dtype == jnp.float32


def test_split_layers_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(TypeError, match="must return a list of nnx.Module layers in order, got Linear"):
        split_layers(nnx.Linear(2, 2, rngs=rngs))
    with pytest.raises(TypeError, match="layer 1 is a str, expected an nnx.Module"):
        split_layers([nnx.Linear(2, 2, rngs=rngs), "relu"])
    with pytest.raises(ValueError, match="returned no layers; it must return a non-empty list"):
        split_layers([])
    with pytest.raises(TypeError, match=r"got float32 \(first in layer 0 \(Linear\)\), bfloat16 \(first in layer 1"):
        split_layers([nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 2, param_dtype=jnp.bfloat16, rngs=rngs)])


class Holder(nnx.Module):
    """Reaches other layers' objects: ``module`` (a sub-module) and ``param`` (an ``nnx.Param``), twice each way."""

    def __init__(self, module, param, *, rngs):
        self.module, self.param, self.again = module, param, param
        self.norm = nnx.LayerNorm(3, rngs=rngs)

    def __call__(self, x):
        return x


def test_ties_are_found_by_identity_and_rebuilt_by_merge_layers():
    """Tied leaves: a shared sub-module, a shared nnx.Param, a layer listed twice; never a copy of equal value."""
    rngs = nnx.Rngs(0)
    embed, linear = nnx.Embed(5, 3, rngs=rngs), nnx.Linear(3, 3, rngs=rngs)
    twin = nnx.Linear(3, 3, rngs=rngs)
    twin.kernel = nnx.Param(linear.kernel[...])  # equal values, another variable: not tied
    layers = [embed, linear, twin, linear, Holder(embed, linear.bias, rngs=rngs)]
    specs, params, _ = split_layers(layers)
    # Full trees keep every leaf a layer computes with; leaf order is nnx's sorted paths.
    assert [len(s.shapes) for s in specs] == [1, 2, 2, 2, 4]  # Holder: again (bias), module/embedding, norm x2
    assert [s.tied for s in specs] == [(), (), (), ((0, 1, 0), (1, 1, 1)), ((0, 1, 0), (1, 0, 0))]
    assert [s.own_leaves for s in specs] == [(0,), (0, 1), (0, 1), (), (2, 3)]
    own = [s.own(p) for s, p in zip(specs, params)]
    # The own trees are what nnx gives for the whole list split at once (a shared variable at its first path).
    _, joint, _ = nnx.split(layers, nnx.Param, ...)
    assert [jax.tree.structure(t) for t in own] == [
        jax.tree.structure(joint[i] if i in joint else nnx.State({})) for i in range(5)
    ]
    rebuilt = merge_layers(model_graph(layers), own)
    assert rebuilt[3] is rebuilt[1] and rebuilt[4].module is rebuilt[0]
    assert rebuilt[4].param is rebuilt[4].again is rebuilt[1].bias and rebuilt[2].kernel is not rebuilt[1].kernel
    np.testing.assert_array_equal(rebuilt[0].embedding[...], embed.embedding[...])


# StackLayout (natural-shape stacks)


def _items(specs, device_layers, dtype):
    device_of = {li: p for p, layers in enumerate(device_layers) for li in layers}
    return [Item(device_of[i], spec.shapes, (dtype,) * len(spec.shapes)) for i, spec in enumerate(specs)]


@pytest.mark.parametrize(
    "device_layers",
    [((0, 1, 2, 3, 4, 5),), ((0, 1), (2, 3), (4, 5)), ((0,), (1, 2), (3, 4, 5)), ((0,), (1,), (2,), (3,), (4,), (5,))],
    ids=str,
)
def test_stack_layout_round_trip(device_layers):
    specs, params, dtype = split_layers(_hetero_layers(nnx.Rngs(1)))
    layout = StackLayout.build(_items(specs, device_layers, dtype), len(device_layers))
    stacks = layout.to_stacks(params)
    assert [a.shape[0] for a in stacks] == [len(device_layers)] * layout.num_stacks
    for i, want in enumerate(params):
        for g, w in zip(layout.from_stacks(stacks, i), jax.tree.leaves(want)):
            assert g.shape == w.shape
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # Inside shard_map a device reads its leaves from its entries, in their shapes.
    for p, layers in enumerate(device_layers):
        entries = [jnp.asarray(a[p]) for a in stacks]
        for li in layers:
            for g, w in zip(layout.read(entries, li), jax.tree.leaves(params[li])):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_stack_layout_shares_stacks_between_devices_and_never_between_leaves_of_one_device():
    """Equal-size leaves of different devices share a stack; one device's leaves never do."""
    specs, params, dtype = split_layers(_hetero_layers(nnx.Rngs(0)))
    device_layers = ((0, 1, 2), (3, 4, 5))
    layout = StackLayout.build(_items(specs, device_layers, dtype), 2)
    for layers in device_layers:
        used = [k for li in layers for k in layout.places[li] if k >= 0]
        assert len(used) == len(set(used))
    # What each device really holds (its row of every packed stack) and needs (its layers' leaves).
    held = sum(a[0].nbytes for a in layout.to_stacks(params))
    needed = [sum(np.asarray(leaf).nbytes for li in layers for leaf in jax.tree.leaves(params[li]))
              for layers in device_layers]
    assert layout.held_bytes() == held and layout.needed_bytes() == needed
    assert held < sum(needed), "blocks of equal size on both devices must share stacks"
    assert all(o >= 1.0 for o in layout.overhead())


def test_stack_layout_embedding_and_output_kernel_share_a_stack():
    """[V, D] on the first device and [D, V] on the last: one stack, read through a reshape."""
    layers = [nnx.Embed(12, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 12, use_bias=False, rngs=nnx.Rngs(1))]
    specs, params, dtype = split_layers(layers)
    layout = StackLayout.build(_items(specs, ((0,), (1,)), dtype), 2)
    assert layout.num_stacks == 1 and layout.overhead() == [1.0, 1.0]
    stacks = layout.to_stacks(params)
    for i in range(2):
        np.testing.assert_array_equal(layout.from_stacks(stacks, i)[0], np.asarray(jax.tree.leaves(params[i])[0]))


def test_stack_layout_layers_without_parameters():
    specs, params, dtype = split_layers([NoParams(), NoParams()])
    layout = StackLayout.build(_items(specs, ((0,), (1,)), dtype), 2)
    assert layout.num_stacks == 0 and layout.to_stacks(params) == []


def test_stack_layout_bfloat16_round_trip():
    layers = [nnx.Linear(3, 5, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), nnx.Linear(5, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))]
    specs, params, dtype = split_layers(layers)
    layout = StackLayout.build(_items(specs, ((0,), (1,)), dtype), 2)
    stacks = layout.to_stacks(params)
    assert all(a.dtype == jnp.bfloat16 for a in stacks)
    for i, want in enumerate(params):
        for g, w in zip(layout.from_stacks(stacks, i), jax.tree.leaves(want)):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# Boundary and Carrier


def _activation(rows, seed=0):
    """A pytree with every supported leaf dtype, including extreme values."""
    rng = np.random.default_rng(seed)
    u32 = rng.integers(0, 2**32, size=(rows, 3), dtype=np.uint64).astype(np.uint32)
    u32[0] = [2**31, 2**32 - 1, 0]
    i32 = rng.integers(-(2**31), 2**31, size=(rows,), dtype=np.int64).astype(np.int32)
    i32[0], i32[-1] = -(2**31), 2**31 - 1
    return {
        "hidden": rng.normal(size=(rows, 3)).astype(np.float32) * np.float32(1e30),
        "half": jnp.asarray(rng.normal(size=(rows, 2, 2)), jnp.bfloat16),
        "ids": i32,
        "pixels": rng.integers(0, 256, size=(rows, 4), dtype=np.uint8),
        "mask": rng.integers(0, 2, size=(rows, 2)).astype(bool),
        "hash": u32,
        "small": rng.integers(-128, 128, size=(rows, 2, 1), dtype=np.int8),
        "nested": (rng.normal(size=(rows,)).astype(np.float32), np.full((rows, 1), 2**31 + 7, np.uint32)),
    }


def _assert_exact(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        where = jax.tree_util.keystr(path)
        assert g.dtype == jnp.asarray(w).dtype, where
        assert g.shape == np.shape(w), where
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=where)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_carrier_round_trip_is_exact_for_every_dtype(jit):
    rows = 5
    tree = _activation(rows)
    boundary = Boundary.from_struct(jax.tree.map(lambda a: _struct(np.shape(a), a.dtype), tree), rows, "test")
    assert boundary.kinds == tuple(
        "float" if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else "int" for a in jax.tree.leaves(tree)
    )
    carrier = Carrier.for_boundaries([boundary], rows)
    assert carrier.float_dtype == jnp.float32
    assert carrier.float_width == boundary.width("float") == 3 + 4 + 1
    assert carrier.int_width == boundary.width("int") == 1 + 4 + 2 + 3 + 2 + 1

    def round_trip(t):
        fbuf, ibuf = carrier.encode(boundary, t)
        assert fbuf.shape == (rows, carrier.float_width) and ibuf.shape == (rows, carrier.int_width)
        assert ibuf.dtype == jnp.int32
        return carrier.decode(boundary, fbuf, ibuf)

    _assert_exact((jax.jit(round_trip) if jit else round_trip)(tree), tree)


def test_carrier_pads_to_the_widest_boundary():
    rows = 3
    small = {"ids": np.arange(rows, dtype=np.int32), "x": np.ones((rows, 2), np.float32)}
    large = (np.full((rows, 4, 2), 0.5, np.float32), np.full((rows, 5), 2**32 - 2, np.uint32))
    bounds = [Boundary.from_struct(jax.tree.map(lambda a: _struct(a.shape, a.dtype), t), rows, "b") for t in (small, large)]
    carrier = Carrier.for_boundaries(bounds, rows)
    assert (carrier.float_width, carrier.int_width) == (8, 5)
    for boundary, tree in zip(bounds, (small, large)):
        fbuf, ibuf = carrier.encode(boundary, tree)
        _assert_exact(carrier.decode(boundary, fbuf, ibuf), tree)
    fbuf, ibuf = carrier.encode(bounds[0], small)
    np.testing.assert_array_equal(np.asarray(fbuf[:, 2:]), 0)
    np.testing.assert_array_equal(np.asarray(ibuf[:, 1:]), 0)


def test_carrier_float_dtype():
    rows = 2
    bf16 = Boundary.from_struct(_struct((rows, 3), jnp.bfloat16), rows, "a")
    f32 = Boundary.from_struct(_struct((rows, 1), jnp.float32), rows, "b")
    ints = Boundary.from_struct(_struct((rows, 4), jnp.int32), rows, "c")
    assert Carrier.for_boundaries([bf16], rows).float_dtype == jnp.bfloat16
    assert Carrier.for_boundaries([bf16, f32], rows).float_dtype == jnp.float32
    only_ints = Carrier.for_boundaries([ints], rows)
    assert only_ints.float_dtype == jnp.float32 and only_ints.float_width == 1 and only_ints.int_width == 4
    tree = jnp.asarray([[1.5, -2.0, 3.0], [0.25, 8.0, -0.5]], jnp.bfloat16)
    carrier = Carrier.for_boundaries([bf16, f32], rows)
    _assert_exact(carrier.decode(bf16, *carrier.encode(bf16, tree)), tree)


@pytest.mark.parametrize(
    "struct,match",
    [
        (_struct((4,), jnp.float32), r"has a leaf of shape \(4,\); every activation leaf .* 2 rows first"),
        ((_struct((2, 3), jnp.float32), _struct((), jnp.float32)), r"leaf at \[1\] of shape \(\); .* 2 rows first"),
        ({"a": _struct((3, 2), jnp.int32)}, r"leaf at \['a'\] of shape \(3, 2\); .* 2 rows first"),
        ((), r"is empty; every boundary needs at least one array"),
    ],
    ids=["no-rows", "scalar", "wrong-rows", "empty"],
)
def test_boundary_rejects_leaves_without_rows_first(struct, match):
    with pytest.raises(ValueError, match=match):
        Boundary.from_struct(struct, 2, "the output of layer 3")


def test_boundary_rejects_unsupported_dtypes():
    with pytest.raises(TypeError, match="floats, bools or integers of at most 32 bits, got dtype complex64"):
        Boundary.from_struct(_struct((2, 3), jnp.complex64), 2, "b")


# trace_boundaries, trace_at_rows, check_rows_follow


def test_trace_boundaries_lm_shapes():
    specs, params, _ = split_layers(_abstract_layers("lm"))
    structs = trace_boundaries(specs, params, _struct((3, 6), jnp.int32))
    assert len(structs) == len(specs) + 1 == 9
    assert (structs[0].shape, structs[0].dtype) == ((3, 6), jnp.int32)
    for s in structs[1:-1]:
        assert (s.shape, s.dtype) == ((3, 6, 8), jnp.float32)
    assert (structs[-1].shape, structs[-1].dtype) == ((3, 6, 11), jnp.float32)


def test_trace_boundaries_conv_and_pytree_shapes():
    specs, params, _ = split_layers(_abstract_layers("conv"))
    structs = trace_boundaries(specs, params, np.zeros((2, 16, 16, 3), np.float32))
    assert [s.shape for s in structs] == [
        (2, 16, 16, 3), (2, 8, 8, 4), (2, 8, 8, 6), (2, 4, 4, 8), (2, 4, 4, 6),
        (2, 2, 2, 8), (2, 2, 2, 5), (2, 2, 2, 4), (2, 3),
    ]
    specs, params, _ = split_layers(_abstract_layers("dict"))
    x = {"x": _struct((4, 6), jnp.float32), "ids": _struct((4, 3), jnp.int32)}
    structs = trace_boundaries(specs, params, x)
    assert [(a.shape, a.dtype) for a in structs[1]] == [((4, 8), jnp.float32), ((4, 3), jnp.int32)]
    assert {k: v.shape for k, v in structs[-1].items()} == {"mean": (4, 2), "logits": (4, 3)}


def test_trace_boundaries_names_the_failing_layer():
    rngs = nnx.Rngs(0)
    specs, params, _ = split_layers([nnx.Linear(6, 8, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)])
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\) fails on its input float32\[7, 8\]"):
        trace_boundaries(specs, params, _struct((7, 6), jnp.float32))


class WithAux(nnx.Module):
    """Returns ``(h [B, 3], aux [4])``: the aux array does not depend on the rows."""

    def __call__(self, x):
        return x, jnp.arange(4.0)


class DropAux(nnx.Module):
    def __call__(self, h_aux):
        return h_aux[0] + h_aux[1].sum()


class FixedRows(nnx.Module):
    """Works only on micro-batches of 4 rows."""

    def __call__(self, x):
        return x.reshape(4, -1)


def test_trace_at_rows_and_check_rows_follow():
    specs, params, _ = split_layers([NoParams(), WithAux(), DropAux()])
    x = _struct((4, 3), jnp.float32)
    structs = trace_boundaries(specs, params, x)
    probe = trace_at_rows(specs, params, x, 5)
    assert [jax.tree.map(lambda a: a.shape, s) for s in probe] == [(5, 3), (5, 3), ((5, 3), (4,)), (5, 3)]
    check_rows_follow(structs[1], probe[1], 5, "the output of layer 0")
    Boundary.from_struct(structs[2], 4, "the output of layer 1")
    with pytest.raises(ValueError, match=r"output of layer 1 has a leaf at \[1\] of shape \(4,\) whose first "
                       r"dimension does not follow the rows \(it is \(4,\) for micro-batches of 5 rows\)"):
        check_rows_follow(structs[2], probe[2], 5, "the output of layer 1")


def test_trace_at_rows_is_none_for_layers_tied_to_one_row_count():
    specs, params, _ = split_layers([FixedRows()])
    assert trace_boundaries(specs, params, _struct((4, 2), jnp.float32))[-1].shape == (4, 2)
    assert trace_at_rows(specs, params, _struct((4, 2), jnp.float32), 5) is None
