"""Bilinear primitives (dot_general, conv_general_dilated): `M = [[0, K], [Kᵀ, 0]]`.

With one operand constant the equation is linear and injects nothing. With both dependent
on disjoint leaf sets, `M` only couples different leaves and is dropped for diagonal
estimates. Otherwise, for probes `v = (v_a, v_b)`: `T_a += K v_b`, `T_b += Kᵀ v_a`,
`U_a += v_a`, `U_b += v_b`, where `K v_b = ∂_a ⟨ȳ, B(a, v_b)⟩` is the VJP of `B(·, v_b)`.
"""

from __future__ import annotations

import jax
from jax import lax

from cpjax.rules._base import Curvature, Rule, register


class BilinearRule(Rule):
    def curvature(self, node, info):
        if info.out_signs[0] == 0 or not (info.dependent(0) and info.dependent(1)):
            return Curvature.NONE
        if info.disjoint(0, 1):
            return Curvature.NONE
        return Curvature.INDEFINITE

    def inject(self, ctx):
        from cpjax._trace import bind_node

        if self.curvature(ctx.node, ctx.info) is Curvature.NONE or ctx.ybar[0] is None:
            return []
        (a, b), (ybar,) = ctx.invals, ctx.ybar
        node = ctx.node
        va = ctx.draw(a.shape, a.dtype, salt=0)
        vb = ctx.draw(b.shape, b.dtype, salt=1)

        def k_times(vb_k):
            return jax.vjp(lambda x: bind_node(node, [x, vb_k])[0], a)[1](ybar)[0]

        def k_transpose_times(va_k):
            return jax.vjp(lambda x: bind_node(node, [va_k, x])[0], b)[1](ybar)[0]

        ta = jax.vmap(k_times)(vb)
        tb = jax.vmap(k_transpose_times)(va)
        return [(0, ta, va), (1, tb, vb)]


register(BilinearRule(), lax.dot_general_p, lax.conv_general_dilated_p)
