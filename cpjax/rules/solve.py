"""custom_linear_solve (`jnp.linalg.solve`, `inv`, `jax.scipy.linalg.solve`): `x = A(c)⁻¹ b`.

JAX differentiates the solve by its rule: `A dx = db − dA x`, where `dA y` is the JVP of
the solve's `matvec(c, y)` with respect to its constants `c` (the matrix). When `matvec` is
linear in `c`, as for every solve in `jax.numpy`, the local curvature of `⟨ȳ, x⟩` is

    dᵀ M d = −2 λᵀ dA A⁻¹ (db − dA x) = 2 ⟨P d, R d⟩,  so  M = Pᵀ R + Rᵀ P,

with `λ = A⁻ᵀ ȳ` (the cotangent of `b`), `P d = −dAᵀ λ` and `R d = A⁻¹ (db − dA x)`, for a
direction `d = (dc, db)`. Both maps end in the space of `x`, so two probes `v₁, v₂` of
`x`'s shape factor `M`:

    T += Pᵀ v₁ + Rᵀ v₂,   U += Rᵀ v₁ + Pᵀ v₂.

`Pᵀ v` is the VJP of `c ↦ matvec(c, v)` at `−λ`, and `Rᵀ w` is `μ = A⁻ᵀ w` for `b` and the
VJP of `c ↦ matvec(c, x)` at `−μ` for `c`, with `A⁻ᵀ` from the solve's own
`transpose_solve`. The probes have `x`'s size, where the generic rule (`F = M`, `G = I`)
draws them over the matrix and `b`. Summed single-probe variance of the diagonal, 4,000
probes: 1.26 against 3.75 for the generic rule on a 3×3 solve (`matrix_and_rhs` in
tests/test_solve.py), and 0.81 against 3.80 on a 12×12 one. Hutchinson's estimator had
0.045 on the latter: a dense solve couples every entry, and CP's split of a product of
two maps is noisier than an HVP there. A solve whose `matvec` is not linear in its
constants, or that has no `transpose_solve`, uses the generic rule.
"""

from __future__ import annotations

import functools

import jax
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from cpjax.rules._base import Curvature, Rule, register
from cpjax.rules.fallback import FALLBACK


def _layout(node):
    """Return the input indices of `matvec`'s constants and of `b`, and the jaxprs."""
    lengths, jaxprs = node.params["const_lengths"], node.params["jaxprs"]
    start = 0
    starts = []
    for n in lengths:
        starts.append(start)
        start += n
    matvec = list(range(starts[0], starts[0] + lengths.matvec))
    transpose_solve = list(range(starts[3], starts[3] + lengths.transpose_solve))
    b = list(range(start, len(node.invars)))
    return matvec, transpose_solve, b, jaxprs


@functools.lru_cache(maxsize=256)
def _structured(eqn) -> bool:
    """Return whether the solve has a `transpose_solve` and a `matvec` linear in `c`."""
    from cpjax.rules.custom import _is_piecewise_linear

    jaxprs = eqn.params["jaxprs"]
    if jaxprs.transpose_solve is None:
        return False
    return _is_piecewise_linear(jaxprs.matvec, eqn.params["const_lengths"].matvec)


class LinearSolveRule(Rule):
    def _delegate(self, node):
        return self if _structured(node.eqn) else FALLBACK

    def curvature(self, node, info):
        if self._delegate(node) is FALLBACK:
            return FALLBACK.curvature(node, info)
        matvec, _, b, _ = _layout(node)
        if all(s == 0 for s in info.out_signs[:len(b)]):
            return Curvature.NONE
        if not any(info.dependent(i) for i in matvec):
            return Curvature.NONE  # linear in b
        return Curvature.INDEFINITE

    def inject(self, ctx):
        node = ctx.node
        if self._delegate(node) is FALLBACK:
            return FALLBACK.inject(ctx)
        matvec_idx, solve_t_idx, b_idx, jaxprs = _layout(node)
        n_x = len(b_idx)
        if all(y is None for y in ctx.ybar[:n_x]):
            return []
        vals, x = ctx.invals, ctx.outvals[:n_x]
        ybar = [jax.numpy.zeros_like(o) if y is None else y
                for o, y in zip(x, ctx.ybar[:n_x], strict=True)]
        c_dep = [i for i in matvec_idx if ctx.info.dependent(i)]
        b_dep = [k for k, i in enumerate(b_idx) if ctx.info.dependent(i)]
        matvec = jcore.jaxpr_as_fun(jaxprs.matvec)
        solve_t = jcore.jaxpr_as_fun(jaxprs.transpose_solve)

        def transposed_solve(w):
            # A solve with has_aux=True returns its aux values after the solution.
            return solve_t(*[vals[i] for i in solve_t_idx], *w)[:n_x]

        def matvec_vjp(y, cotangent):
            """Return `∂_c ⟨cotangent, matvec(c, y)⟩` for the dependent constants."""
            def of_c(*cs):
                full = [vals[i] for i in matvec_idx]
                for i, c in zip(c_dep, cs, strict=True):
                    full[matvec_idx.index(i)] = c
                return matvec(*full, *y)

            return jax.vjp(of_c, *[vals[i] for i in c_dep])[1](cotangent)

        minus_lambda = [-v for v in transposed_solve(ybar)]

        def p_transpose(v):  # Pᵀ v, which is zero for b
            return list(matvec_vjp(v, minus_lambda))

        def r_transpose(w):  # Rᵀ w, as (the part for c, the part for b)
            mu = transposed_solve(w)
            return list(matvec_vjp(x, [-m for m in mu])), [mu[k] for k in b_dep]

        v1 = [ctx.draw(o.shape, o.dtype, salt=2 * k) for k, o in enumerate(x)]
        v2 = [ctx.draw(o.shape, o.dtype, salt=2 * k + 1) for k, o in enumerate(x)]
        pt1, pt2 = jax.vmap(p_transpose)(v1), jax.vmap(p_transpose)(v2)
        (rt1_c, rt1_b), (rt2_c, rt2_b) = jax.vmap(r_transpose)(v1), jax.vmap(r_transpose)(v2)
        out = [(i, pt1[k] + rt2_c[k], rt1_c[k] + pt2[k]) for k, i in enumerate(c_dep)]
        out += [(b_idx[k], rt2_b[j], rt1_b[j]) for j, k in enumerate(b_dep)]
        return out


register(LinearSolveRule(), prims.linear_solve_p)
