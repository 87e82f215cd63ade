"""``check_mesh_shape`` and ``make_mesh`` on the 8 fake CPU devices."""

import re

import jax
import numpy as np
import pytest

from jaxpipe.mesh import DATA_AXIS, PIPE_AXIS, check_mesh_shape, make_mesh


@pytest.mark.parametrize(
    "shape,expected",
    [((1, 1), (1, 1)), ([2, 4], (2, 4)), ((np.int64(4), np.int32(2)), (4, 2)), ((8, 1), (8, 1))],
    ids=str,
)
def test_check_mesh_shape_accepts_pairs_of_ints(shape, expected):
    result = check_mesh_shape(shape)
    assert result == expected
    assert all(type(n) is int for n in result)


@pytest.mark.parametrize("shape", ["12", b"12", 2, None, (1,), (1, 2, 3), (), (1.0, 2), (1, "2"), (True, 1)], ids=repr)
def test_check_mesh_shape_rejects_non_pairs_with_type_error(shape):
    with pytest.raises(TypeError, match=r"mesh_shape must be a pair \(data, pipe\) of ints, got " + re.escape(repr(shape))):
        check_mesh_shape(shape)


@pytest.mark.parametrize("shape", [(0, 1), (1, 0), (-1, 2), (0, 0)], ids=str)
def test_check_mesh_shape_rejects_entries_below_one(shape):
    with pytest.raises(ValueError, match=rf"must be >= 1, got \(data={shape[0]}, pipe={shape[1]}\)"):
        check_mesh_shape(shape)


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (8, 1), (2, 4), (4, 2), (1, 3), (3, 2)], ids=str)
def test_make_mesh_uses_the_first_devices_with_pipe_neighbours_adjacent(shape):
    mesh = make_mesh(shape)
    data, pipe = shape
    assert mesh.axis_names == (DATA_AXIS, PIPE_AXIS)
    assert mesh.devices.shape == shape
    devices = jax.devices()
    for d in range(data):
        assert list(mesh.devices[d]) == devices[d * pipe : (d + 1) * pipe]


def test_make_mesh_takes_an_explicit_device_list():
    devices = jax.devices()[::-1][:4]
    mesh = make_mesh((2, 2), devices)
    assert mesh.devices.ravel().tolist() == devices


@pytest.mark.parametrize("shape", [(4, 4), (3, 3), (1, 9), (16, 1)], ids=str)
def test_make_mesh_too_large_says_how_many_devices_there_are(shape):
    needed = shape[0] * shape[1]
    with pytest.raises(
        ValueError,
        match=rf"mesh_shape=\({shape[0]}, {shape[1]}\) needs {needed} devices but only 8 are "
        rf"available .*data \* pipe <= 8.*device_count={needed}",
    ):
        make_mesh(shape)


def test_make_mesh_too_large_for_an_explicit_device_list():
    with pytest.raises(ValueError, match=r"needs 4 devices but only 3 are available.*data \* pipe <= 3"):
        make_mesh((2, 2), jax.devices()[:3])
    with pytest.raises(ValueError, match=r"needs 1 devices but only 0 are available \(none\)"):
        make_mesh((1, 1), [])


def test_make_mesh_checks_the_shape_first():
    with pytest.raises(TypeError, match="mesh_shape must be a pair"):
        make_mesh((2, 2, 2))
