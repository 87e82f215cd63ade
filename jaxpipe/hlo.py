"""Reading XLA's optimized HLO text: what runs inside a loop, and how many bytes it moves.

Used to pin structural performance properties (no weight-sized copies per
tick, ``tests/test_tick_hlo.py``) so that they cannot silently regress, and
by experiment 09 to count the bytes a tick moves. Only the text format of
``Compiled.as_text()`` is read.
"""

from __future__ import annotations

import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
MOVEMENT = ("copy", "concatenate", "pad", "broadcast", "dynamic-update-slice", "slice", "dynamic-slice", "transpose")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")


def computations(text: str) -> dict[str, list[tuple[str, str, str, str, bool]]]:
    """``{name: [(instruction, shape, opcode, rest, is_root)]}`` of every computation."""
    out, current = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("{")[0].split("(")[0]:
            current = header.group(1)
            out[current] = []
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            out[current].append((m.group(1), m.group(2), m.group(3), m.group(4), line.lstrip().startswith("ROOT")))
    return out


def called(rest: str) -> list[str]:
    """Names of the computations an instruction calls."""
    names = []
    for key in ("calls", "body", "condition", "to_apply", "branch_computations"):
        for m in re.finditer(key + r"=\{?([%\w.\-,\s]+)\}?", rest):
            names += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
    return names


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as ``f32[256,256]{1,0}`` (tuples: the sum)."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def loop_bodies(text: str) -> list[str]:
    """Names of the body computations of every ``while`` in the module."""
    comps = computations(text)
    bodies = []
    for instrs in comps.values():
        for _, _, opcode, rest, _ in instrs:
            if opcode == "while":
                m = re.search(r"body=%?([\w.\-]+)", rest)
                if m:
                    bodies.append(m.group(1))
    return bodies


def _update_bytes(comps: dict, computation: str, rest: str) -> int | None:
    """Bytes of a ``dynamic-update-slice``'s update operand (its second), looked up in ``computation``."""
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    if len(operands) < 2:
        return None
    shapes = {name: shape for name, shape, *_ in comps.get(computation, [])}
    return shape_bytes(shapes[operands[1]]) if operands[1] in shapes else None


def movement_in(text: str, root: str) -> list[tuple[str, str, int]]:
    """``(computation, opcode, bytes)`` of every data-movement operation reachable from ``root``.

    Fusions count as the opcode of their fused root (a fusion whose root is
    a ``copy`` moves data; one whose root is an ``add`` computes). Bitcasts
    are free and not listed. A ``dynamic-update-slice`` (in place) counts
    the bytes of its update, not of the buffer it writes into.
    """
    comps = computations(text)
    roots = {name: next((op for _, _, op, _, r in instrs if r), None) for name, instrs in comps.items()}
    root_rest = {name: next((rest for _, _, _, rest, r in instrs if r), "") for name, instrs in comps.items()}
    seen, todo, out = set(), [root], []
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for _, shape, opcode, rest, _ in comps[name]:
            kind, size = opcode, shape_bytes(shape)
            if opcode == "fusion":
                fused = called(rest)
                kind = roots.get(fused[0]) if fused else None
                if kind == "dynamic-update-slice":
                    size = _update_bytes(comps, fused[0], root_rest[fused[0]]) or size
            else:
                todo += called(rest)
                if kind == "dynamic-update-slice":
                    size = _update_bytes(comps, name, rest) or size
            if kind in MOVEMENT:
                out.append((name, kind, size))
    return out


def opcodes_in_order(text: str, computation: str) -> list[str]:
    """The opcodes of ``computation``'s instructions in the order of the text.

    XLA prints a scheduled module (``is_scheduled=true``, as ``Compiled.as_text``
    gives it) in its execution order, so on a backend that runs one
    instruction after another (CPU) this is the order they run in.
    """
    return [opcode for _, _, opcode, _, _ in computations(text).get(computation, [])]
