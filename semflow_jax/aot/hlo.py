"""What a compiled program does, read from its optimized HLO text: collectives, loops, source functions.

`collectives(text, mesh)` lists every collective the program runs per call (all-reduce, all-gather,
reduce-scatter, all-to-all, collective-permute and their async forms): kind, how many times it runs, the
bytes it moves per chip, and the mesh axes its device groups span. Counts are dynamic: a collective inside a
while loop (a scan over micro-batches, the sampler's N Euler steps, XLA's windowed einsums) counts once per
iteration, the trip count read from the loop's condition (`counter < constant`); a loop whose condition has
another form counts once and is reported in `unknown_trip_counts`. Bytes per chip: the array an all-gather
produces, the array an all-reduce, reduce-scatter, all-to-all or permute reads.

Device groups come in three spellings (explicit `{{0,1},{2,3}}`, iota `[2,2]<=[4]T(1,0)`, and the named
`mesh['axis_0'=2,...] {'axis_1'}` with optional `device_ids=(...)`); each is expanded to device ids, which
index the program's devices in the mesh's order, and the axes along which a group's devices differ are the
mesh axes the collective runs over.

`function_names(text)` is the set of Python functions whose operations the compiled program holds (the
StackFrames tables XLA keeps in the module), which tests/test_tpu.py uses to show that a TPU program holds
none of the CPU forms of cpu/kernels.py.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

from semflow_jax.aot import flops

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
}  # fmt: skip
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")  # fmt: skip
_CALLS = re.compile(
    r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%[\w.\-]+)"
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")


@dataclasses.dataclass
class Instruction:
    """One HLO instruction: its name, result shape text, opcode, operand names and attribute text."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the text between the opcode's parentheses (a constant's value)
    attrs: str
    root: bool = False


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one opening at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[text[start]]]
    i = start + 1
    while stack:
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif ch == stack[-1]:
            stack.pop()
        i += 1
    return i


def _instruction(line: str) -> Instruction | None:
    s = line.strip()
    root = s.startswith("ROOT ")
    if root:
        s = s[5:]
    if not s.startswith("%") or " = " not in s:
        return None
    name, rest = s[1:].split(" = ", 1)
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    end = _matching(rest, paren)
    operands = re.findall(r"%([\w.\-]+)", rest[paren:end])
    return Instruction(name, shape, opcode, operands, rest[paren + 1 : end - 1], rest[end:], root)


def computations(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: its instructions}, the entry computation's name) of an HLO module's text."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            inst = _instruction(line)
            if inst is not None:
                comps[current].append(inst)
    return comps, entry


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape text (an array, or a tuple: the sum of its arrays; layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape.split("{")[0] if not shape.startswith("(") else shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _constant(by_name: dict[str, Instruction], name: str) -> int | None:
    """The integer value of instruction `name`, a constant or a copy/bitcast/convert of one; None otherwise."""
    inst = by_name.get(name)
    while inst is not None and inst.opcode in ("copy", "bitcast", "convert") and inst.operands:
        inst = by_name.get(inst.operands[0])
    if inst is None or inst.opcode != "constant" or not re.fullmatch(r"-?\d+", inst.args.strip()):
        return None
    return int(inst.args)


def _tuple_index(by_name: dict[str, Instruction], name: str) -> int | None:
    """k where instruction `name` is get-tuple-element(parameter, index=k); None otherwise."""
    inst = by_name.get(name)
    if inst is None or inst.opcode != "get-tuple-element" or not inst.operands:
        return None
    source = by_name.get(inst.operands[0])
    m = re.search(r"index=(\d+)", inst.attrs)
    return int(m.group(1)) if m and source is not None and source.opcode == "parameter" else None


def _element(inst: Instruction | None, k: int) -> str | None:
    """The name of operand k of a tuple instruction; None for anything else."""
    if inst is None or inst.opcode != "tuple" or k >= len(inst.operands):
        return None
    return inst.operands[k]


def _trip_count(
    condition: list[Instruction], body: list[Instruction], init: Instruction | None, caller: dict
) -> int | None:
    """How many times a while loop runs, from its condition `counter < N`, the body's `counter + step`
    (XLA unrolls loops, its windowed einsums among them, into steps of 2) and the counter's first value in
    the loop's operand tuple `init` (an instruction of `caller`, {name: instruction}); None for any other
    form."""
    cond = {i.name: i for i in condition}
    root = next((i for i in condition if i.root), None)
    if (
        root is None
        or root.opcode != "compare"
        or "direction=LT" not in root.attrs
        or len(root.operands) != 2
    ):
        return None
    k, limit = _tuple_index(cond, root.operands[0]), _constant(cond, root.operands[1])
    if k is None or limit is None:
        return None
    loop = {i.name: i for i in body}
    nxt = loop.get(_element(next((i for i in body if i.root), None), k) or "")
    if nxt is None or nxt.opcode != "add" or len(nxt.operands) != 2:
        return None
    a, b = nxt.operands
    step = _constant(loop, b) if _tuple_index(loop, a) == k else None
    if step is None and _tuple_index(loop, b) == k:
        step = _constant(loop, a)
    first = _element(init, k)
    start = None if first is None else _constant(caller, first)
    if not step or step < 0 or start is None:
        return None
    return max(0, -(-(limit - start) // step))


def multiplicities(comps: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, int], int]:
    """(how many times each computation runs per call of the entry, loops whose trip count was unknown)."""
    runs: dict[str, int] = collections.defaultdict(int)
    unknown = 0

    def visit(name: str, times: int) -> None:
        nonlocal unknown
        runs[name] += times
        insts = comps.get(name, [])
        by_name = {i.name: i for i in insts}
        for inst in insts:
            called = dict(_CALLS.findall(inst.attrs))
            trips = 1
            if inst.opcode == "while":
                body, condition = (comps.get(called.get(key, "%")[1:], []) for key in ("body", "condition"))
                init = by_name.get(inst.operands[0]) if inst.operands else None
                trips = _trip_count(condition, body, init, by_name)
                if trips is None:
                    unknown, trips = unknown + 1, 1
            for key, value in called.items():
                for target in re.findall(r"%([\w.\-]+)", value):
                    visit(target, times * (trips if key in ("body", "condition") else 1))

    visit(entry, 1)
    return dict(runs), unknown


def _iota(spec: str) -> np.ndarray:
    """The flat device order of an iota spec "[d0,d1,...]" with an optional "T(p0,p1,...)"."""
    m = re.fullmatch(r"\[([0-9,]+)\](?:T\(([0-9,]+)\))?", spec.strip())
    dims = [int(d) for d in m.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(2):
        ids = ids.transpose([int(p) for p in m.group(2).split(",")])
    return ids.reshape(-1)


def device_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """The device-id groups of a collective's attributes; None where the spelling is not one we read."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
    named = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? \{([^}]*)\}", attrs)
    if named:
        axes = re.findall(r"'([\w]+)'=(\d+)", named.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = np.arange(num_devices) if not named.group(2) else _device_ids(named.group(2))
        grid = ids.reshape(sizes)
        chosen = [names.index(a) for a in re.findall(r"'([\w]+)'", named.group(3))]
        rest = [i for i in range(len(names)) if i not in chosen]
        grid = grid.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen))
        return grid.tolist()
    iota = re.search(r"replica_groups=(\[[0-9,]+\])<=(\[[0-9,]+\](?:T\([0-9,]+\))?)", attrs)
    if iota:
        shape = [int(d) for d in iota.group(1)[1:-1].split(",")]
        return _iota(iota.group(2)).reshape(shape[0], -1).tolist()
    explicit = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if explicit:
        groups = [
            [int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", explicit.group(1))
        ]
        return groups or [list(range(num_devices))]
    return None


def _device_ids(spec: str) -> np.ndarray:
    spec = spec.strip()
    if spec.startswith("["):
        return _iota(spec)
    return np.asarray([int(x) for x in re.findall(r"\d+", spec)])


def group_axes(groups: list[list[int]], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes (of an {axis name: size} mesh, devices in its order) along which some group varies."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    varying = set()
    for group in groups:
        coords = np.stack(np.unravel_index(np.asarray(group), sizes), axis=-1)
        varying |= {names[i] for i in range(len(names)) if len(set(coords[:, i].tolist())) > 1}
    return tuple(n for n in names if n in varying)


def collectives(text: str, mesh_shape: dict[str, int]) -> dict:
    """Every collective a compiled program runs per call, by kind and mesh axes (see the module docstring):
    {"by_kind": [{kind, axes, count, bytes_per_chip, in_program}], "count", "bytes_per_chip",
    "unknown_trip_counts"}."""
    comps, entry = computations(text)
    runs, unknown = multiplicities(comps, entry)
    devices = math.prod(mesh_shape.values())
    table: dict[tuple, list[float]] = {}
    for comp, insts in comps.items():
        times = runs.get(comp, 0)
        shapes = {i.name: i.shape for i in insts}
        for inst in insts:
            kind = inst.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or inst.opcode.endswith("-done"):
                continue
            operand = sum(shape_bytes(shapes.get(o, "")) for o in inst.operands)
            groups = device_groups(inst.attrs, devices)
            axes = ("?",) if groups is None else group_axes(groups, mesh_shape)
            moved = operand * (len(groups[0]) if groups and kind == "all-gather" else 1)
            row = table.setdefault((kind, axes), [0, 0.0, 0])
            row[0] += times
            row[1] += times * moved
            row[2] += 1
    by_kind = [
        {"kind": k, "axes": list(a), "count": int(c), "bytes_per_chip": b, "in_program": int(n)}
        for (k, a), (c, b, n) in sorted(table.items())
    ]
    return {
        "by_kind": by_kind,
        "count": sum(r["count"] for r in by_kind),
        "bytes_per_chip": sum(r["bytes_per_chip"] for r in by_kind),
        "unknown_trip_counts": unknown,
    }


def function_names(text: str) -> set[str]:
    """The Python functions (qualified names) the compiled program's operations were traced in."""
    block = re.search(r"^FunctionNames\n(.*?)\n\n", text, re.S | re.M)
    return set(re.findall(r'^\d+ "([^"]*)"', block.group(1), re.M)) if block else set()


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _window(attrs: str, rank: int) -> dict[str, list]:
    """A convolution's window attribute (size, stride, pad, lhs_dilate, rhs_dilate) per spatial dimension."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=(\S+)", m.group(1))) if m else {}

    def ints(key, default):
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * rank

    pads = [tuple(int(v) for v in re.fullmatch(r"(-?\d+)_(-?\d+)", p).groups())
            for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * rank  # fmt: skip
    return {"stride": ints("stride", 1), "pad": pads, "lhs_dilate": ints("lhs_dilate", 1),
            "rhs_dilate": ints("rhs_dilate", 1)}  # fmt: skip


def _product_flops(inst: Instruction, shapes: dict[str, str]) -> float:
    """2 x multiply-adds of one dot or convolution (TPUs express products as convolutions too), counted as
    aot/flops.py counts them: taps on padding and dilation holes do no work."""
    out = _dims(inst.shape)
    if inst.opcode == "dot":
        lhs = _dims(shapes.get(inst.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
        contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * math.prod(out) * contracted
    lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
    rhs = _dims(shapes.get(inst.operands[1], "")) if len(inst.operands) > 1 else []
    m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", inst.attrs)
    if not lhs or not rhs or not m or [len(x) for x in m.groups()] != [len(lhs), len(rhs), len(out)]:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    rank = sum(ch.isdigit() for ch in rhs_l)
    w = _window(inst.attrs, rank)
    dims = []
    for d in range(rank):
        i = str(d)
        dims.append((lhs[lhs_l.index(i)], rhs[rhs_l.index(i)], out[out_l.index(i)], w["stride"][d],
                     w["pad"][d][0], w["lhs_dilate"][d], w["rhs_dilate"][d]))  # fmt: skip
    return flops.conv_flops(math.prod(out), rhs[rhs_l.index("i")], dims)


def matmul_flops(text: str) -> float:
    """FLOPs of every product (convolution, dot) a compiled program runs per call, per device: each counted
    as many times as its computation runs (loop bodies times their trip counts), rematerialized ones
    included. The compiler's own cost analysis counts a loop body once."""
    comps, entry = computations(text)
    runs, _ = multiplicities(comps, entry)
    total = 0.0
    for comp, insts in comps.items():
        times = runs.get(comp, 0)
        if not times:
            continue
        shapes = {i.name: i.shape for i in insts}
        total += times * sum(_product_flops(i, shapes) for i in insts if i.opcode in ("convolution", "dot"))
    return total
