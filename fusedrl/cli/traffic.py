"""The byte-traffic model of ``fusedrl aot``: a Triton kernel's loads and stores read from its compiled Triton IR
(``compiled.asm["ttir"]``) and priced per unit of work (a token, a pair, a position).

Every ``tt.load`` / ``tt.store`` is an :class:`Access` with its element size, its lanes (the tensor's size, 1 for a
scalar) and the ``scf.for`` loops around it. A :class:`Geometry` says how the program covers the units: a vector
access inside the sweep moves ``elements_per_unit`` elements per unit (masked-off lanes move nothing), a scalar
access outside it is paid once per program. Anything else (a vector access in an extra loop around the sweep, a
scalar one inside a loop) has a trip count the model does not know and raises, so a kernel change that adds a
re-read cannot be priced silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Geometry:
    """How a kernel's accesses map onto units. ``elements_per_unit``: elements one sweep moves per unit (V for a
    row of logits, 1 when each vector lane is one unit); ``units_per_program``: units one program covers (scalar
    accesses are once per program); ``sweep_loops``: the ``scf.for`` loops that make up the sweep (0: the grid
    covers it), where every vector access must sit.

    ``loop_trips`` > 0 prices tiles instead (kernels that load tiles of several tensors, like the segmented LoRA
    matmuls of ops/multi_lora): every access moves all its lanes on each of its ``loop_trips ** loops`` executions
    per program (every loop of the kernel runs ``loop_trips`` times and no lane is masked in the representative
    case), and ``elements_per_unit`` / ``sweep_loops`` are unused."""

    unit: str
    elements_per_unit: int
    units_per_program: float
    sweep_loops: int
    loop_trips: int = 0


@dataclass(frozen=True)
class ExtraPass:
    """Traffic the launcher adds outside the kernel (a torch pre-pass), counted by hand from its torch code."""

    bytes_per_unit: float
    what: str


class Access(NamedTuple):
    """One ``tt.load`` / ``tt.store`` of a kernel's Triton IR."""

    kind: str  # "load" or "store"
    element_bytes: int
    lanes: int  # elements per execution: the tensor's size, 1 for a scalar access
    loops: int  # enclosing scf.for loops
    line: str


_ACCESS = re.compile(r"\btt\.(load|store)\b")
_POINTER = re.compile(r":\s*(?:tensor<((?:\d+x)+)!tt\.ptr<(\w+)>>|!tt\.ptr<(\w+)>)\s*(?:loc\(|$)")


def _element_bytes(type_name: str) -> int:
    """Bytes of one element: bf16 -> 2, f32 -> 4, i64 -> 8; i1 (bool) and fp8 take a byte."""
    bits = re.search(r"\d+", type_name)
    if bits is None:
        raise ValueError(f"no bit width in element type {type_name!r}")
    return max(1, int(bits.group()) // 8)


def kernel_accesses(ttir: str) -> list[Access]:
    """Every load and store of a kernel's Triton IR text with its element size, lanes and loop depth."""
    accesses, regions = [], []  # regions: one entry per open brace, True for an scf.for body
    for line in ttir.splitlines():
        if _ACCESS.search(line):
            match = _POINTER.search(line)
            if match is None:
                raise ValueError(f"unrecognised pointer type in {line.strip()!r}")
            dims, vector_type, scalar_type = match.groups()
            lanes = 1
            for dim in (dims or "").split("x"):
                lanes *= int(dim) if dim else 1
            accesses.append(Access(_ACCESS.search(line).group(1), _element_bytes(vector_type or scalar_type),
                                   lanes, sum(regions), line.strip()))
        code = re.sub(r'"[^"]*"', "", line)  # location strings may hold any character
        for char in code:
            if char == "{":
                regions.append("scf.for" in code)
            elif char == "}":
                regions.pop()
    return accesses


def modelled_bytes_per_unit(accesses: Sequence[Access], geometry: Geometry) -> float:
    """Bytes per unit of the kernel's accesses; raises on an access the geometry cannot price (a vector access
    outside the sweep or in a loop around it: a re-read whose count is unknown; a scalar access inside a loop)."""
    if geometry.loop_trips:
        per_program = sum(a.element_bytes * a.lanes * geometry.loop_trips**a.loops for a in accesses)
        return per_program / geometry.units_per_program
    total = 0.0
    for access in accesses:
        if access.lanes > 1:
            if access.loops != geometry.sweep_loops:
                raise ValueError(f"vector {access.kind} in {access.loops} loops, the sweep has "
                                 f"{geometry.sweep_loops}: update the spec's geometry ({access.line})")
            total += access.element_bytes * geometry.elements_per_unit
        else:
            if access.loops:
                raise ValueError(f"scalar {access.kind} inside a loop: its trip count is not modelled "
                                 f"({access.line})")
            total += access.element_bytes / geometry.units_per_program
    return total
