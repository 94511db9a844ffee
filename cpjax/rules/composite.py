"""Composite rules for whole `jax.nn` functions that JAX emits as one named jit call.

Three kinds are kept whole: `log_softmax`, calls that act elementwise (silu, elu, ...) and
calls that act on each row of their last axis alone (`jax.nn.standardize`, or any such
function the user wraps in `jax.jit`). Other calls are inlined.

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
from jax._src import core as jax_core

from cpjax.rules._base import (
    COMPOSITE_RULES,
    Curvature,
    Rule,
    StructuredRule,
    safe_sqrt,
    split_scalar_curvature,
)
from cpjax.rules.binary import BinaryRule
from cpjax.rules.fallback import FALLBACK

# The primitives `jax.nn.log_softmax` is built from; a call named log_softmax with any
# other primitive inside (a `where` mask, say) is inlined instead. Inside a shard_map, JAX
# adds a `pvary` of the constant -inf.
_LOG_SOFTMAX_PRIMITIVES = frozenset({
    lax.reduce_max_p, lax.max_p, lax.broadcast_in_dim_p, lax.stop_gradient_p, lax.sub_p,
    lax.exp_p, lax.reduce_sum_p, lax.log_p, lax.is_finite_p, lax.select_n_p, jax_core.pvary_p,
})


def _log_softmax_axes(eqn):
    jaxpr = eqn.params["jaxpr"].jaxpr
    if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        return None
    if any(e.primitive not in _LOG_SOFTMAX_PRIMITIVES for e in jaxpr.eqns):
        return None
    return summed_axes(eqn)


def summed_axes(eqn):
    """Return the axes of the one sum in a call (a softmax's rows), or None."""
    sums = [e for e in eqn.params["jaxpr"].jaxpr.eqns if e.primitive is lax.reduce_sum_p]
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
    if _rowwise_call(eqn):
        return "rowwise"
    return None


# Maximum row length for which a row-wise call gets its exact local curvature. The rule
# forms an n × n block per row with n Hessian-vector products and splits it with `eigh`.
ROWWISE_LIMIT = 64


def _rowwise_call(eqn) -> bool:
    """Return whether a jit call maps each row along its last axis on its own.

    One input and one output of the same shape `(..., n)` with `2 <= n <= ROWWISE_LIMIT`,
    whose equations keep every leading axis aligned and mix only the last one (a layer
    normalisation such as `jax.nn.standardize`, say).
    """
    if len(eqn.invars) != 1 or len(eqn.outvars) != 1:
        return False
    x, y = eqn.invars[0].aval, eqn.outvars[0].aval
    if (x.ndim < 2 or x.shape != y.shape or not 2 <= x.shape[-1] <= ROWWISE_LIMIT
            or not jnp.issubdtype(x.dtype, jnp.floating)):
        return False
    return _row_local(eqn.params["jaxpr"], x.shape)


def _input_roles(shape):
    roles = [k if n > 1 else "unit" for k, n in enumerate(shape[:-1])]
    return tuple(roles) + ("row",)


def _row_local(closed_jaxpr, shape) -> bool:
    """Return whether every leading axis of the input stays aligned (see `_rowwise_call`)."""
    from cpjax._axes import axis_map
    from cpjax._trace import Var, build_program

    program = build_program(closed_jaxpr)
    roles = {program.invars[0]: _input_roles(shape)}
    for node in program.nodes:
        tracked = [i for i, a in enumerate(node.invars) if isinstance(a, Var) and a in roles]
        if not tracked:
            continue  # computed from constants only
        if len(node.outvars) != 1:
            return False
        out = node.outvars[0]
        out_roles = [None] * out.aval.ndim
        for i in tracked:
            atom, mapping = node.invars[i], axis_map(node, i)
            for k, role in enumerate(roles[atom]):
                target = mapping[k] if k < len(mapping) else None
                if role == "unit":
                    continue
                if not (isinstance(target, tuple) and target[0] == 0):
                    if role == "row":
                        continue  # reduced over the row
                    return False
                t = target[1]
                if role != "row" and atom.aval.shape[k] != out.aval.shape[t]:
                    return False  # a partial slice along a leading axis
                if out_roles[t] not in (None, role):
                    return False
                out_roles[t] = role
        for t, n in enumerate(out.aval.shape):
            if n == 1:
                out_roles[t] = "unit"
            elif out_roles[t] is None:
                if t != out.aval.ndim - 1:
                    return False
                out_roles[t] = "row"  # broadcast along the row
        roles[out] = tuple(out_roles)
    final = program.outvars[0]
    return isinstance(final, Var) and roles.get(final) == _input_roles(shape)


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


def row_blocks(node, x, ybar):
    """Return the Jacobian and the Hessian of `ȳ · f` of a row-wise call, row by row.

    Both have shape `(..., n, n)` with `[..., i, j] = ∂y_i/∂x_j` and `∂²(ȳ · y)/∂x_i∂x_j`.
    Because rows do not interact, a tangent of ones at position `j` of every row gives
    column `j` of every row's block at once: `n` JVPs and `n` Hessian-vector products.
    """
    from cpjax._trace import bind_node

    def f(z):
        return bind_node(node, [z])[0]

    def grad(z):
        return jax.vjp(f, z)[1](ybar)[0]

    n = x.shape[-1]
    basis = jnp.moveaxis(jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), (*x.shape[:-1], n, n)),
                         -2, 0)
    jacobian = jax.vmap(lambda e: jax.jvp(f, (x,), (e,))[1])(basis)
    hessian = jax.vmap(lambda e: jax.jvp(grad, (x,), (e,))[1])(basis)
    # Axis 0 indexes j (the tangent); move it last.
    jacobian, hessian = jnp.moveaxis(jacobian, 0, -1), jnp.moveaxis(hessian, 0, -1)
    return jacobian, 0.5 * (hessian + jnp.swapaxes(hessian, -1, -2))


class RowwiseCallRule(Rule):
    """A row-wise jit call (a layer normalisation), kept whole with its exact curvature.

    Inlined, `(x − mean) / sqrt(var + ε)` injects at every square, division and root with
    independent probes, and those large injections cancel only on average. Kept whole,
    each row gets one injection from its exact `n × n` block `M = Σ_i ȳ_i ∇²y_i`, split
    as `M = V Λ Vᵀ`: `F v = V |Λ|^½ v`, `G v = V sign(Λ) |Λ|^½ v`.

    NOTE: since the inlined division by a broadcast divisor is split per row (rank 2, see
    `rules/binary.py`), the inlined form has had less variance: 49 against 58 summed over a
    3 × 6 layer norm, and a variance ratio of 5.5e4 against 7.6e4 on the two-block
    transformer of `benchmarks/transformer_variance.py`. This rule may now cost variance.
    """

    def curvature(self, node, info):
        if not info.dependent(0) or info.out_signs[0] == 0:
            return Curvature.NONE
        if _call_is_piecewise_linear(node.eqn):  # a sort or a cumulative maximum, say
            return Curvature.NONE
        return Curvature.INDEFINITE

    def inject(self, ctx):
        if self.curvature(ctx.node, ctx.info) is Curvature.NONE:
            return []
        (x,), (ybar,) = ctx.invals, ctx.ybar
        if ybar is None:
            return []
        _, block = row_blocks(ctx.node, x, ybar)
        work = jnp.promote_types(block.dtype, jnp.float32)  # eigh has no 16-bit form
        eigenvalues, vectors = jnp.linalg.eigh(block.astype(work))
        scale = safe_sqrt(jnp.abs(eigenvalues))
        v = ctx.draw(x.shape, work)
        f = vectors * scale[..., None, :]
        fv = jnp.einsum("...ij,k...j->k...i", f, v).astype(x.dtype)
        if ctx.symmetric:
            return [(0, fv, None)]
        g = vectors * (jnp.sign(eigenvalues) * scale)[..., None, :]
        gv = jnp.einsum("...ij,k...j->k...i", g, v).astype(x.dtype)
        return [(0, fv, gv)]


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


def softmax_centre(p, w, axes):
    """Return `w − p Σ w`, summed over the softmax `axes`. For `w = p ⊙ ȳ` it is the VJP."""
    return w - p * jnp.sum(w, axis=axes, keepdims=True)


class SoftmaxRule(StructuredRule):
    """`p = softmax(f)` over some axes, written out and kept whole (see `cpjax._softmax`).

    Per row, `Σ_k ȳ_k ∇²p_k = diag(c) − c pᵀ − p cᵀ` with `c = p ⊙ (ȳ − ⟨ȳ, p⟩)`, the
    cotangent of `f`. Since `Σ c = 0` this equals `Aᵀ diag(c) A` with `A = I − 1 pᵀ`, so one
    probe `v` of the row's length gives `F v = Aᵀ(√|c| ⊙ v)` and `G v = Aᵀ(sign(c) √|c| ⊙ v)`,
    where `Aᵀ u = u − p Σ u`. The curvature is indefinite: `c` sums to zero.

    The rule runs the node's whole backward step. The cotangent, the rows and the injection
    all take the form `w − p Σ w`, with `w = p ⊙ ȳ` for the cotangent and
    `w = p ⊙ R + [√|c| v; sign(c) √|c| v]` for the rows R, so the rows and their injection
    share one sum over each row.
    """

    def curvature(self, node, info):
        if not info.dependent(0) or info.out_signs[0] == 0:
            return Curvature.NONE
        return Curvature.INDEFINITE

    def forward(self, node, vals):
        from cpjax._trace import bind_node

        outs = bind_node(node, vals)
        return outs, outs[0]

    def backward(self, ctx, p, ybar, rows):
        axes = summed_axes(ctx.node.eqn)
        grad = softmax_centre(p, p * ybar[0], axes)
        rows_axes = tuple(a + 1 for a in axes)  # axis 0 indexes the rows
        w = None if rows[0] is None else p * rows[0]
        if ctx.ybar[0] is not None and ctx.kind is not Curvature.NONE:
            (f,) = ctx.invals
            u = safe_sqrt(jnp.abs(grad)) * ctx.draw(f.shape, f.dtype)
            injection = u if ctx.symmetric else jnp.concatenate([u, jnp.sign(grad) * u])
            w = injection if w is None else w + injection
        return [grad], [None if w is None else softmax_centre(p, w, rows_axes)]


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
COMPOSITE_RULES["rowwise"] = RowwiseCallRule()
COMPOSITE_RULES["softmax"] = SoftmaxRule()
