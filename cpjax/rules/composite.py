"""Composite rules for whole `jax.nn` functions that JAX emits as one named jit call.

Inlined, `log_softmax` becomes exp, a sum and a log, each injecting its own probes. Kept
whole, its local curvature has the exact per-row form

    M = −(Σ_k ȳ_k) (diag p − p pᵀ),   p = softmax(z),

and `diag p − p pᵀ = A Aᵀ` with `A = diag √p − p √pᵀ`, so one probe of the row's length
suffices: `F v = √|c| A v`, `G v = sign(c) F v` with `c = −Σ_k ȳ_k`. When the cotangent is
negative (a cross-entropy loss), `c ≥ 0` and the injection is positive semi-definite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cpjax.rules._base import (
    COMPOSITE_RULES,
    Curvature,
    Rule,
    safe_sqrt,
    split_scalar_curvature,
)
from cpjax.rules.binary import BinaryRule
from cpjax.rules.fallback import FALLBACK

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
    from cpjax._axes import elementwise_jaxpr

    if eqn.params.get("name") == "log_softmax" and _log_softmax_axes(eqn) is not None:
        return "log_softmax"
    out_shapes = [v.aval.shape for v in eqn.outvars]
    if (len(out_shapes) == 1 and out_shapes[0] != ()
            and all(v.aval.shape in ((), out_shapes[0]) for v in eqn.invars)
            and elementwise_jaxpr(eqn.params["jaxpr"].jaxpr)):
        return "elementwise"
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
        # A v with A = diag √p − p √pᵀ, for every probe at once (axis 0 indexes the probes).
        axes_k = tuple(a + 1 for a in axes)
        av = root_p * v - p * jnp.sum(root_p * v, axis=axes_k, keepdims=True)
        fv = scale * av
        return [(0, fv, None if ctx.symmetric else jnp.sign(c) * fv)]


class ElementwiseCallRule(Rule):
    """A jit call that acts elementwise (silu, elu, softplus, ...), kept as one function.

    Inlined, `silu(x) = x · σ(x)` injects at the logistic and again at the product, with
    independent probes. Kept whole, each element gets one injection from the exact
    `φ''(x)`, computed by nested JVPs of the call, which follow any custom JVP rule inside
    exactly as `jax.hessian` does. With two dependent operands the per-element 2×2 block is
    split as for `mul`; with more, the generic rule is used.
    """

    def _dependent(self, node, info):
        return [i for i in range(len(node.invars)) if info.dependent(i)]

    def _supported(self, node, info):
        out_shape = node.outvars[0].aval.shape
        dep = self._dependent(node, info)
        return len(dep) <= 2 and all(node.invars[i].aval.shape == out_shape for i in dep)

    def curvature(self, node, info):
        if not self._dependent(node, info) or info.out_signs[0] == 0:
            return Curvature.NONE
        if _call_is_piecewise_linear(node.eqn):
            return Curvature.NONE
        if not self._supported(node, info):
            return FALLBACK.curvature(node, info)
        return Curvature.INDEFINITE

    def inject(self, ctx):
        node, info = ctx.node, ctx.info
        if self.curvature(node, info) is Curvature.NONE:
            return []
        if not self._supported(node, info):
            return FALLBACK.inject(ctx)
        (ybar,) = ctx.ybar
        if ybar is None:
            return []
        dep = self._dependent(node, info)
        if len(dep) == 2 and not info.disjoint(*dep):
            p, q, r = (ybar * _second_partial(node, ctx.invals, i, j)
                       for i, j in ((dep[0], dep[0]), (dep[0], dep[1]), (dep[1], dep[1])))
            block = BinaryRule._inject_block(ctx, p, q, r)
            return [(dep[k], fv, gv) for k, (_, fv, gv) in enumerate(block)]
        out = []
        for salt, i in enumerate(dep):
            m = ybar * _second_partial(node, ctx.invals, i, i)
            fv, gv = split_scalar_curvature(m, ctx.draw(m.shape, m.dtype, salt=salt))
            out.append((i, fv, None if ctx.symmetric else gv))
        return out


@functools.lru_cache(maxsize=256)
def _call_is_piecewise_linear(eqn) -> bool:
    from cpjax.rules.custom import _is_piecewise_linear

    return _is_piecewise_linear(eqn.params["jaxpr"], len(eqn.invars))


def _second_partial(node, vals, i, j):
    """`∂²y/∂x_i∂x_j` elementwise, by nested JVPs with tangents of ones."""
    from cpjax._trace import bind_node

    def y(xi, xj):
        v = list(vals)
        v[i] = xi
        if j != i:
            v[j] = xj
        return bind_node(node, v)[0]

    def d_i(xi, xj):
        return jax.jvp(lambda a: y(a, xj), (xi,), (jnp.ones_like(xi),))[1]

    xi, xj = vals[i], vals[j]
    if i == j:
        return jax.jvp(lambda a: d_i(a, a), (xi,), (jnp.ones_like(xi),))[1]
    return jax.jvp(lambda b: d_i(xi, b), (xj,), (jnp.ones_like(xj),))[1]


COMPOSITE_RULES["log_softmax"] = LogSoftmaxRule()
COMPOSITE_RULES["elementwise"] = ElementwiseCallRule()
