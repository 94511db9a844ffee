"""Curvature rules, one module per family, all registered into one registry.

`rule_for(node)` returns the rule the sweep uses for a node: a composite rule for a named
`jax.nn` call, the primitive's own rule, or the generic fallback.
"""

from __future__ import annotations

from jax._src.shard_map import shard_map_p
from jax.extend.core import primitives as prims

from cpjax.rules import (  # noqa: F401
    bilinear,
    binary,
    composite,
    elementwise,
    sharding,
    solve,
    zero,
)
from cpjax.rules._base import (
    COMPOSITE_RULES,
    RULES,
    STACKED,
    Context,
    Curvature,
    Rule,
    StaticInfo,
    StructuredRule,
)
from cpjax.rules.fallback import FALLBACK, FallbackRule, FallbackWarning

__all__ = [
    "COMPOSITE_RULES", "RULES", "STACKED", "Context", "Curvature", "FALLBACK", "FallbackRule",
    "FallbackWarning", "Rule", "SPECIAL", "StaticInfo", "StructuredRule", "has_rule",
    "rule_for", "supported_primitives", "supported_primitives_markdown",
]


def rule_for(node) -> Rule:
    """Return the curvature rule for `node`, the fallback when there is none."""
    if node.composite is not None:
        return COMPOSITE_RULES[node.composite]
    if node.primitive is prims.custom_jvp_call_p:
        from cpjax.rules.custom import CUSTOM_JVP

        return CUSTOM_JVP
    if node.primitive is prims.cond_p:
        from cpjax.rules.control import COND

        return COND
    if node.primitive is prims.scan_p:
        from cpjax.rules.scan import SCAN

        return SCAN
    if node.primitive is shard_map_p:
        return sharding.SHARD_MAP
    return RULES.get(node.primitive, FALLBACK)


# Primitives handled by rule_for directly. A while_loop whose carry depends on the
# differentiated arguments is rejected with an error, as jax.grad does.
SPECIAL = {
    prims.cond_p: "cond, switch: the branch taken is swept on its own",
    prims.scan_p: "scan, fori_loop with static bounds: a reverse scan carrying ȳ, T and U",
    prims.while_p: "while_loop: evaluated; an error if its carry is differentiated",
    prims.custom_jvp_call_p: "custom_jvp functions: zero, a named rule, or the generic rule",
    shard_map_p: "shard_map: the body is swept on each device inside a shard_map",
}
# Complex values that depend on the differentiated arguments raise an error because they are
# not supported yet. They are listed so that the coverage test counts them as handled.
COMPLEX = (prims.complex_p, prims.real_p, prims.imag_p, prims.conj_p, prims.fft_p)
for _primitive in COMPLEX:
    SPECIAL[_primitive] = "complex values: an error when they depend on the arguments"


def has_rule(primitive) -> bool:
    """Return whether `primitive` has a rule of its own (not the generic fallback)."""
    return primitive in RULES or primitive in SPECIAL


def supported_primitives() -> dict:
    """Return the registry by family: {family: sorted primitive names}."""
    from cpjax.rules.fallback import FALLBACK_PRIMITIVES

    families = {
        "zero curvature (linear)": zero.LINEAR + sharding.COLLECTIVES,
        "zero curvature (piecewise linear)": zero.PIECEWISE_LINEAR,
        "zero derivative": zero.ZERO_DERIVATIVE,
        "elementwise, closed-form second derivative": tuple(elementwise.SECOND_DERIVATIVES),
        "elementwise, nested JVPs": elementwise.NESTED,
        "elementwise binary, 2×2 split": tuple(
            p for p, r in RULES.items() if isinstance(r, binary.BinaryRule)),
        "bilinear": tuple(p for p, r in RULES.items() if isinstance(r, bilinear.BilinearRule)),
        "linear solve, split in the solution's space": tuple(
            p for p, r in RULES.items() if isinstance(r, solve.LinearSolveRule)),
        "control flow and custom rules": tuple(p for p in SPECIAL if p not in COMPLEX),
        "complex values (an error when differentiated)": COMPLEX,
    }
    table = {family: sorted({p.name for p in ps}) for family, ps in families.items()}
    table["composite calls"] = sorted(COMPOSITE_RULES)
    table["generic rule (warns)"] = sorted(FALLBACK_PRIMITIVES)
    return table


def supported_primitives_markdown() -> str:
    """Render `supported_primitives()` as the README's table."""
    lines = ["| family | primitives |", "|---|---|"]
    for family, names in supported_primitives().items():
        lines.append(f"| {family} | {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(lines)
