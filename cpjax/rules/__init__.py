"""Curvature rules, one module per family, all registered into one registry.

`rule_for(node)` returns the rule the sweep uses for a node: a composite rule for a named
`jax.nn` call, the primitive's own rule, or the generic fallback.
"""

from __future__ import annotations

from jax.extend.core import primitives as prims

from cpjax.rules import bilinear, binary, composite, elementwise, zero  # noqa: F401
from cpjax.rules._base import (
    COMPOSITE_RULES,
    RULES,
    Context,
    Curvature,
    Rule,
    StaticInfo,
    StructuredRule,
)
from cpjax.rules.fallback import FALLBACK, FallbackRule, FallbackWarning

__all__ = [
    "COMPOSITE_RULES", "RULES", "Context", "Curvature", "FALLBACK", "FallbackRule",
    "FallbackWarning", "Rule", "StaticInfo", "StructuredRule", "rule_for", "has_rule",
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
    return RULES.get(node.primitive, FALLBACK)


def has_rule(primitive) -> bool:
    """Return whether `primitive` has a rule of its own (not the generic fallback)."""
    return primitive in RULES
