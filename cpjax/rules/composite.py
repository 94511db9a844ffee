"""Composite rules for whole `jax.nn` functions that JAX emits as one named jit call.

Inlined, `log_softmax` becomes exp, a sum and a log, each injecting its own probes. Kept
whole, its local curvature has the exact per-row form

    M = −(Σ_k ȳ_k) (diag p − p pᵀ),   p = softmax(z),

and `diag p − p pᵀ = A Aᵀ` with `A = diag √p − p √pᵀ`, so one probe of the row's length
suffices: `F v = √|c| A v`, `G v = sign(c) F v` with `c = −Σ_k ȳ_k`. When the cotangent is
negative (a cross-entropy loss), `c ≥ 0` and the injection is positive semi-definite.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cpjax.rules._base import COMPOSITE_RULES, Curvature, Rule, safe_sqrt

# The primitives `jax.nn.log_softmax` is built from; a call named log_softmax with any
# other primitive inside (a `where` mask, say) is inlined instead.
_LOG_SOFTMAX_PRIMITIVES = frozenset({
    lax.reduce_max_p, lax.max_p, lax.broadcast_in_dim_p, lax.stop_gradient_p, lax.sub_p,
    lax.exp_p, lax.reduce_sum_p, lax.log_p, lax.is_finite_p, lax.select_n_p,
})


def _log_softmax_axes(eqn):
    jaxpr = eqn.params["jaxpr"].jaxpr
    if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        return None
    if any(e.primitive not in _LOG_SOFTMAX_PRIMITIVES for e in jaxpr.eqns):
        return None
    sums = [e for e in jaxpr.eqns if e.primitive is lax.reduce_sum_p]
    if len(sums) != 1:
        return None
    return tuple(sums[0].params["axes"])


def match_composite(eqn) -> str | None:
    """Return the name of the composite rule for a jit call, or None to inline it."""
    if eqn.params.get("name") == "log_softmax" and _log_softmax_axes(eqn) is not None:
        return "log_softmax"
    return None


class LogSoftmaxRule(Rule):
    def curvature(self, node, info):
        if not info.dependent(0) or info.out_signs[0] == 0:
            return Curvature.NONE
        return Curvature.PSD if info.out_signs[0] == -1 else Curvature.INDEFINITE

    def inject(self, ctx):
        (z,), (y,), (ybar,) = ctx.invals, ctx.outvals, ctx.ybar
        if ybar is None:
            return []
        axes = _log_softmax_axes(ctx.node.eqn)
        p = jnp.exp(y)
        root_p = jnp.sqrt(p)
        c = -jnp.sum(ybar, axis=axes, keepdims=True)
        scale = safe_sqrt(jnp.abs(c))
        v = ctx.draw(z.shape, z.dtype)
        # A v with A = diag √p − p √pᵀ, for every probe at once (axis 0 holds the probes).
        axes_k = tuple(a + 1 for a in axes)
        av = root_p * v - p * jnp.sum(root_p * v, axis=axes_k, keepdims=True)
        fv = scale * av
        return [(0, fv, None if ctx.symmetric else jnp.sign(c) * fv)]


COMPOSITE_RULES["log_softmax"] = LogSoftmaxRule()
