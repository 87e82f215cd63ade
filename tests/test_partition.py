"""The partitioner is exact and its inputs are checked."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import FLOAT_SUMS, assert_close

from jaxpipe.partition import check_partition, partition_layers


def _max_load(costs, counts):
    cuts = np.cumsum((0,) + tuple(counts))
    return max(sum(costs[cuts[p] : cuts[p + 1]]) for p in range(len(counts)))


def _brute_force(costs, num_devices):
    """The least largest-device load over every contiguous cut, by enumeration."""
    num_layers = len(costs)
    best = float("inf")
    for inner in itertools.combinations(range(1, num_layers), num_devices - 1):
        counts = np.diff((0,) + inner + (num_layers,))
        best = min(best, _max_load(costs, counts))
    return best


def _check_valid(counts, num_layers, num_devices):
    assert isinstance(counts, tuple) and all(type(n) is int for n in counts)
    assert len(counts) == num_devices
    assert min(counts) >= 1
    assert sum(counts) == num_layers


@st.composite
def _problems(draw):
    num_layers = draw(st.integers(1, 9))
    num_devices = draw(st.integers(1, num_layers))
    costs = draw(
        st.one_of(
            st.lists(st.integers(0, 12), min_size=num_layers, max_size=num_layers),
            st.lists(st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False), min_size=num_layers, max_size=num_layers),
        )
    )
    return [float(c) for c in costs], num_devices


@settings(max_examples=300, deadline=None)
@given(_problems())
def test_partition_layers_is_optimal(problem):
    costs, num_devices = problem
    counts = partition_layers(costs, num_devices)
    _check_valid(counts, len(costs), num_devices)
    best = _brute_force(costs, num_devices)
    assert _max_load(costs, counts) <= best * (1 + 1e-9) + 1e-9
    assert partition_layers(costs, num_devices) == counts


def test_partition_layers_is_optimal_on_seeded_random_costs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_layers = int(rng.integers(1, 11))
        num_devices = int(rng.integers(1, num_layers + 1))
        costs = rng.exponential(size=num_layers).tolist()
        counts = partition_layers(costs, num_devices)
        _check_valid(counts, num_layers, num_devices)
        assert_close(_max_load(costs, counts), _brute_force(costs, num_devices), FLOAT_SUMS, "largest load")


@pytest.mark.parametrize(
    "costs,num_devices,expected",
    [
        ([1] * 8, 4, (2, 2, 2, 2)),
        ([1] * 8, 8, (1,) * 8),
        ([1] * 8, 1, (8,)),
        ([0] * 5, 5, (1,) * 5),
        ([1, 1, 1, 1, 4], 2, (4, 1)),
        ([4, 1, 1, 1, 1], 2, (1, 4)),
        ([1, 2, 3, 4, 5, 6], 3, (3, 2, 1)),
    ],
    ids=str,
)
def test_partition_layers_known_cuts(costs, num_devices, expected):
    assert partition_layers(costs, num_devices) == expected


def test_partition_layers_accepts_numpy_costs():
    assert partition_layers(np.array([3.0, 1.0, 1.0, 1.0], np.float32), 2) == (1, 3)


def test_partition_layers_errors():
    with pytest.raises(ValueError, match=r"the model has 3 layers but the mesh has 4 pipe devices.*use pipe <= 3"):
        partition_layers([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match=r"layer costs must be finite and >= 0, got \[1.0, -2.0\]"):
        partition_layers([1.0, -2.0], 2)
    with pytest.raises(ValueError, match=r"layer costs must be finite and >= 0, got \[1.0, nan\]"):
        partition_layers([1.0, float("nan")], 1)
    with pytest.raises(ValueError, match=r"layer costs must be finite and >= 0, got \[inf, 1.0\]"):
        partition_layers([float("inf"), 1.0], 2)


# check_partition


def test_check_partition_returns_a_tuple_of_ints():
    result = check_partition([np.int64(2), 1, np.int32(3)], 6, 3)
    assert result == (2, 1, 3) and all(type(n) is int for n in result)


@pytest.mark.parametrize(
    "partition,error,match",
    [
        ((2, 2), ValueError, r"partition=\(2, 2\) sums to 4 but the model has 6 layers; the counts must sum to 6"),
        ((4, 3), ValueError, r"partition=\(4, 3\) sums to 7 but the model has 6 layers"),
        ((6,), ValueError, r"partition=\(6,\) has 1 entries but .*2 pipe devices; give one layer count per pipe device"),
        ((2, 2, 2), ValueError, r"partition=\(2, 2, 2\) has 3 entries but .*2 pipe devices"),
        ((6, 0), ValueError, r"partition=\(6, 0\): every pipe device needs at least one layer"),
        ((7, -1), ValueError, r"partition=\(7, -1\): every pipe device needs at least one layer"),
        ((3.0, 3.0), TypeError, r"partition must be a sequence of ints \(layers per pipe device\), got \(3.0, 3.0\)"),
        ((True, 5), TypeError, r"partition must be a sequence of ints .*got \(True, 5\)"),
        (6, TypeError, r"partition must be a sequence of ints .*got 6"),
        ("33", TypeError, r"partition must be a sequence of ints .*got '33'"),
        (None, TypeError, r"partition must be a sequence of ints .*got None"),
    ],
    ids=repr,
)
def test_check_partition_messages(partition, error, match):
    with pytest.raises(error, match=match):
        check_partition(partition, 6, 2)
