"""The wire format: how an activation between two stages crosses devices.

SPMD needs one shape per sharded array, but stages pass differently shaped
activations (``docs/design.md``, "The message wire format"). A boundary
activation (any pytree whose leaves all have ``B`` leading rows) is described
by a ``Boundary`` and travels as two row-major buffers (``Carrier``): floats
``[B, F]`` in one float dtype and integers ``[B, I]`` as int32, both padded
to the widest boundary, so integer token ids and float hidden states share
one wire format exactly. ``Carrier.encode`` and ``Carrier.decode`` convert
between the two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _kind(dtype) -> str:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if dtype == jnp.bool_ or (jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize <= 4):
        return "int"
    raise TypeError(
        f"boundary activations must be floats, bools or integers of at most 32 "
        f"bits, got dtype {dtype}"
    )


@dataclasses.dataclass(frozen=True)
class Boundary:
    """The structure of one activation between two layers, per micro-batch.

    Attributes:
      treedef: tree structure of the activation.
      shapes: leaf shapes, each ``[B, ...]``.
      dtypes: leaf dtypes.
      kinds: ``"float"`` or ``"int"`` per leaf: which buffer carries it.
      offsets: per leaf, its start column in that buffer.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    kinds: tuple[str, ...]
    offsets: tuple[int, ...]

    @classmethod
    def from_struct(cls, struct: Any, rows: int, where: str) -> "Boundary":
        """Builds a boundary from a pytree of ``jax.ShapeDtypeStruct``."""
        leaves, treedef = jax.tree.flatten(struct)
        if not leaves:
            raise ValueError(f"{where} is empty; every boundary needs at least one array")
        kinds, offsets, used = [], [], {"float": 0, "int": 0}
        for path, leaf in jax.tree_util.tree_leaves_with_path(struct):
            if leaf.ndim == 0 or leaf.shape[0] != rows:
                at = jax.tree_util.keystr(path)
                raise ValueError(
                    f"{where} has a leaf{' at ' + at if at else ''} of shape {tuple(leaf.shape)}; "
                    "every activation leaf that crosses pipe devices must have the "
                    f"micro-batch's {rows} rows first"
                )
            kind = _kind(leaf.dtype)
            kinds.append(kind)
            offsets.append(used[kind])
            used[kind] += math.prod(leaf.shape[1:])
        return cls(
            treedef,
            tuple(tuple(leaf.shape) for leaf in leaves),
            tuple(jnp.dtype(leaf.dtype) for leaf in leaves),
            tuple(kinds),
            tuple(offsets),
        )

    def width(self, kind: str) -> int:
        """Columns this boundary uses in the ``kind`` buffer."""
        return sum(
            math.prod(s[1:]) for s, k in zip(self.shapes, self.kinds) if k == kind
        )


@dataclasses.dataclass(frozen=True)
class Carrier:
    """The wire format of every boundary: ``[B, F]`` floats and ``[B, I]`` int32.

    Attributes:
      rows: B, rows per micro-batch.
      float_width: F (>= 1).
      int_width: I (>= 1).
      float_dtype: the float buffer's dtype (all float boundaries promote to it).
    """

    rows: int
    float_width: int
    int_width: int
    float_dtype: Any

    @classmethod
    def for_boundaries(cls, boundaries: Sequence[Boundary], rows: int) -> "Carrier":
        floats = [d for b in boundaries for d, k in zip(b.dtypes, b.kinds) if k == "float"]
        return cls(
            rows=rows,
            float_width=max([1] + [b.width("float") for b in boundaries]),
            int_width=max([1] + [b.width("int") for b in boundaries]),
            float_dtype=jnp.result_type(*floats) if floats else jnp.dtype(jnp.float32),
        )

    def zeros(self, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Empty float and int buffers."""
        rows = self.rows if rows is None else rows
        return (
            jnp.zeros((rows, self.float_width), self.float_dtype),
            jnp.zeros((rows, self.int_width), jnp.int32),
        )

    def encode(self, boundary: Boundary, tree: Any) -> tuple[jax.Array, jax.Array]:
        """Encodes an activation as ``([B, F], [B, I])`` buffers.

        Built by concatenating the leaves' columns (each kind's offsets are
        consecutive) and zero padding, not by scattering into zeros: a
        scatter covering a whole buffer crashes XLA 0.11's CPU compiler.
        """
        leaves = jax.tree.leaves(tree)
        rows = leaves[0].shape[0]
        parts = {"float": [], "int": []}
        for leaf, kind, off in sorted(zip(leaves, boundary.kinds, boundary.offsets), key=lambda e: e[2]):
            flat = leaf.reshape(rows, -1)
            if kind == "float":
                flat = flat.astype(self.float_dtype)
            else:
                if flat.dtype == jnp.uint32:
                    flat = jax.lax.bitcast_convert_type(flat, jnp.int32)
                flat = flat.astype(jnp.int32)
            parts[kind].append(flat)
        out = []
        for kind, width, dtype in (("float", self.float_width, self.float_dtype), ("int", self.int_width, jnp.int32)):
            used = sum(p.shape[1] for p in parts[kind])
            if used < width:
                parts[kind].append(jnp.zeros((rows, width - used), dtype))
            out.append(parts[kind][0] if len(parts[kind]) == 1 else jnp.concatenate(parts[kind], axis=1))
        return out[0], out[1]

    def decode(self, boundary: Boundary, fbuf: jax.Array, ibuf: jax.Array) -> Any:
        """Decodes an activation from its ``([B, F], [B, I])`` buffers."""
        leaves = []
        for shape, dtype, kind, off in zip(
            boundary.shapes, boundary.dtypes, boundary.kinds, boundary.offsets
        ):
            cols = math.prod(shape[1:])
            if kind == "float":
                leaf = fbuf[:, off : off + cols].astype(dtype)
            else:
                leaf = ibuf[:, off : off + cols]
                leaf = (
                    jax.lax.bitcast_convert_type(leaf, dtype)
                    if dtype == jnp.uint32
                    else leaf.astype(dtype)
                )
            leaves.append(leaf.reshape((fbuf.shape[0],) + shape[1:]))
        return jax.tree.unflatten(boundary.treedef, leaves)
