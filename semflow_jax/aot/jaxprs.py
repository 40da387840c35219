"""Walking a jaxpr as one platform's program runs it, and counting the FLOPs of its products.

A jaxpr holds every branch of a `jax.lax.platform_dependent` choice (cpu/kernels.py, `on_cpu`); a program
lowered for one platform keeps only that platform's branch. `equations(jaxpr, platform)` yields what that
program runs, each equation with how many times it runs (scan bodies times their length). `matmul_flops`
counts the multiply-adds of its dot_general and conv_general_dilated equations (a convolution's taps on
padding and dilation holes left out, as aot/flops.py counts them), which is what model FLOPs
(and MFU) conventionally count: elementwise work, reductions and transcendentals are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from semflow_jax.aot import flops


def _branch_for(platforms, platform: str) -> int:
    """Index of the branch a platform_dependent cond takes on `platform` (a None entry is the default)."""
    for i, names in enumerate(platforms):
        if names is not None and platform in names:
            return i
    return next(i for i, names in enumerate(platforms) if names is None)


def _sub_jaxprs(value) -> list:
    """The jaxprs inside one equation parameter (a ClosedJaxpr, a Jaxpr, or a tuple of them)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    out = []
    for item in items:
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
            out.append(inner)
    return out


def equations(jaxpr, platform: str = "cpu") -> Iterator[tuple[object, int]]:
    """(equation, times it runs) of `jaxpr` (a Jaxpr or ClosedJaxpr) and every jaxpr inside it, as a program
    lowered for `platform` runs them: platform-dependent conds contribute only that platform's branch, other
    conds every branch (an upper bound), a scan body `length` times, a while body once (its trip count is not
    in the jaxpr)."""
    for eqn, times, _ in scoped_equations(jaxpr, platform):
        yield eqn, times


def scoped_equations(jaxpr, platform: str = "cpu", times: int = 1, scope: str = ""):
    """`equations` with each equation's full module scope: the name stacks of the equations it is inside
    (an inner jaxpr's names are relative to the equation holding it), joined with "/"."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        name = "/".join(filter(None, (scope, str(eqn.source_info.name_stack))))
        yield eqn, times, name
        params = eqn.params
        if eqn.primitive.name == "cond" and params.get("branches_platforms") is not None:
            branch = params["branches"][_branch_for(params["branches_platforms"], platform)]
            yield from scoped_equations(branch, platform, times, name)
            continue
        inner_times = times * int(params["length"]) if eqn.primitive.name == "scan" else times
        for value in params.values():
            for sub in _sub_jaxprs(value):
                yield from scoped_equations(sub, platform, inner_times, name)


def equation_flops(eqn) -> float:
    """2 x multiply-adds of one dot_general or conv_general_dilated equation; 0 for anything else."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
        contracted = math.prod(lhs.shape[d] for d in lhs_contract)
        return 2.0 * math.prod(out.shape) * contracted
    if name == "conv_general_dilated":
        lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
        p, spec = eqn.params, eqn.params["dimension_numbers"]
        dims = []
        for d in range(len(spec.rhs_spec) - 2):
            dims.append((lhs.shape[spec.lhs_spec[2 + d]], rhs.shape[spec.rhs_spec[2 + d]],
                         out.shape[spec.out_spec[2 + d]], p["window_strides"][d], p["padding"][d][0],
                         p["lhs_dilation"][d], p["rhs_dilation"][d]))  # fmt: skip
        # Input features per group (the kernel's) times the taps on real inputs: aot/flops.py.
        return flops.conv_flops(math.prod(out.shape), rhs.shape[spec.rhs_spec[1]], dims)
    return 0.0


def matmul_flops(jaxpr, platform: str) -> float:
    """FLOPs of every product (dot_general, conv_general_dilated) the `platform` program of jaxpr runs."""
    return sum(equation_flops(eqn) * times for eqn, times in equations(jaxpr, platform))
