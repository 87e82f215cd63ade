"""Parameters in their natural shapes: one ``[P, *shape]`` stack per leaf position.

SPMD needs one shape per sharded array, yet pipe devices hold different
layers. The first layout put each device's parameters into one flat row
``[P, N]``; every tick then sliced weights out of the row and concatenated
gradients into it (weight-sized copies per tick, see ``docs/design.md``).
Here each device's leaves are dealt onto *stacks*: a stack is one array
``[P, *shape]`` sharded over ``pipe`` whose entry on device ``p`` is one
parameter leaf of ``p`` (or zeros where ``p`` has nothing to put there).
Inside ``shard_map`` a device sees each stack as a plain array in the leaf's
shape, so a stage reads its weights where they live and adds its weight
gradient into its accumulator stack in place: nothing weight-sized is
copied per tick.

Leaves are dealt by ``(size, dtype)``: the ``i``-th leaf of a given size on a
device goes to the ``i``-th stack of that size. Leaves of equal shape on
different devices (transformer blocks) share stacks, so a stack of blocks
costs each device one block, as in MaxText's stacked stages. A leaf whose
shape differs from the stack's but whose size is the same (an embedding
``[V, D]`` on the first device, an output kernel ``[D, V]`` on the last) is
read through a reshape, which XLA lowers to a bitcast. A device with fewer
leaves of some size than another still holds that stack's entry: that
entry is the layout's only memory overhead, reported by ``overhead``.

The same dealing serves any per-item leaves: parameter copies (``items`` are
copies, with their parameter leaves) and optimizer state (``items`` are
layers, with their state leaves).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Item:
    """One owner of leaves on one device (a parameter copy, a layer's state).

    Attributes:
      device: the pipe device that holds it.
      shapes: its leaves' shapes.
      dtypes: its leaves' dtypes.
    """

    device: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class StackLayout:
    """Where every item's leaves live among the stacks.

    Attributes:
      num_devices: P.
      items: the items, in the order their trees are given.
      shapes: ``[K]`` each stack's entry shape (the first leaf dealt to it).
      dtypes: ``[K]`` each stack's dtype.
      places: per item, per leaf, its stack (``-1``: a zero-size leaf, stored
        nowhere).
    """

    num_devices: int
    items: tuple[Item, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    places: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, items: Sequence[Item], num_devices: int) -> "StackLayout":
        """Deals every item's leaves onto stacks by ``(size, dtype)``.

        Args:
          items: the items; each device's leaves are dealt in item order.
          num_devices: P.

        Returns:
          The layout, with as few stacks as the most loaded device needs.
        """
        shapes, dtypes, by_key = [], [], {}
        used = [dict() for _ in range(num_devices)]
        places = []
        for item in items:
            place = []
            for shape, dtype in zip(item.shapes, item.dtypes):
                size = math.prod(shape)
                if size == 0:
                    place.append(-1)
                    continue
                key = (size, jnp.dtype(dtype))
                n = used[item.device].get(key, 0)
                used[item.device][key] = n + 1
                stacks = by_key.setdefault(key, [])
                if n == len(stacks):
                    stacks.append(len(shapes))
                    shapes.append(tuple(shape))
                    dtypes.append(jnp.dtype(dtype))
                place.append(stacks[n])
            places.append(tuple(place))
        return cls(num_devices, tuple(items), tuple(shapes), tuple(dtypes), tuple(places))

    @property
    def num_stacks(self) -> int:
        """K."""
        return len(self.shapes)

    def read(self, entries: Sequence[jax.Array], item: int) -> list[jax.Array]:
        """Inside ``shard_map``: item ``item``'s leaves from this device's stack entries."""
        spec = self.items[item]
        return [
            jnp.zeros(shape, dtype) if k < 0 else entries[k].reshape(shape)
            for shape, dtype, k in zip(spec.shapes, spec.dtypes, self.places[item])
        ]

    def write(self, entries: Sequence[jax.Array], item: int, leaves: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """Inside ``shard_map``: ``entries`` with item ``item``'s stacks replaced by ``leaves``."""
        out = list(entries)
        for k, leaf in zip(self.places[item], leaves):
            if k >= 0:
                out[k] = leaf.reshape(self.shapes[k]).astype(out[k].dtype)
        return tuple(out)

    def zeros(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """The stacks' global shapes ``[P, *shape]``."""
        return tuple(jax.ShapeDtypeStruct((self.num_devices,) + s, d) for s, d in zip(self.shapes, self.dtypes))

    def to_stacks(self, trees: Sequence[Sequence[Any]], dtype: Any = None) -> list[np.ndarray]:
        """Host stacks ``[P, *shape]`` from every item's leaves.

        Args:
          trees: per item, its leaves (arrays or anything with them in order).
          dtype: cast every stack to it; default each stack's own dtype.

        Returns:
          ``[K]`` NumPy arrays.

        Raises:
          ValueError: if an item's leaf count or a leaf's shape differs.
        """
        out = [np.zeros((self.num_devices,) + s, dtype or d) for s, d in zip(self.shapes, self.dtypes)]
        for i, (item, leaves) in enumerate(zip(self.items, trees)):
            leaves = jax.tree.leaves(leaves)
            shapes = [tuple(np.shape(leaf)) for leaf in leaves]
            if shapes != list(item.shapes):
                raise ValueError(f"item {i} has leaf shapes {list(item.shapes)}, got {shapes}")
            for k, leaf in zip(self.places[i], leaves):
                if k >= 0:
                    out[k][item.device] = np.asarray(leaf).reshape(self.shapes[k])
        return out

    def from_stacks(self, stacks: Sequence[Any], item: int) -> list[np.ndarray]:
        """Item ``item``'s leaves from host stacks ``[P, *shape]``."""
        spec = self.items[item]
        return [
            np.zeros(shape, dtype) if k < 0 else np.asarray(stacks[k][spec.device]).reshape(shape)
            for shape, dtype, k in zip(spec.shapes, spec.dtypes, self.places[item])
        ]

    def held_bytes(self) -> int:
        """Bytes of stack entries every device holds."""
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes))

    def needed_bytes(self) -> list[int]:
        """``[P]`` bytes of the leaves each device's own items have."""
        out = [0] * self.num_devices
        for item in self.items:
            out[item.device] += sum(math.prod(s) * jnp.dtype(d).itemsize for s, d in zip(item.shapes, item.dtypes))
        return out

    def overhead(self) -> list[float]:
        """``[P]`` held bytes over needed bytes, per device (1.0: nothing wasted)."""
        held = self.held_bytes()
        return [held / need if need else float("inf") if held else 1.0 for need in self.needed_bytes()]
