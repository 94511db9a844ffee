"""Bilinear primitives (dot_general, conv_general_dilated): `M = [[0, K], [Kᵀ, 0]]`.

With one operand constant the equation is linear and injects nothing. With both dependent
on disjoint leaf sets, `M` only couples different leaves and is dropped for diagonal
estimates. Otherwise, for probes `v = (v_a, v_b)`: `T_a += K v_b`, `T_b += Kᵀ v_a`,
`U_a += v_a`, `U_b += v_b`, where `K v_b = ∂_a ⟨ȳ, B(a, v_b)⟩` is the VJP of `B(·, v_b)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cpjax.rules._base import STACKED, Curvature, Rule, register


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
        if ctx.symmetric or ctx.num_samples == 1:
            return [(0, ta, va), (1, tb, vb)]
        return [(0, _stack_flat(ta, va), STACKED), (1, _stack_flat(tb, vb), STACKED)]


def _stack_flat(t, u):
    """Return the rows `[t; u]`, stacked along the probe axis on flat vectors.

    The vmapped VJP leaves the probe axis among the product's free axes, so `t` is a
    transpose of the product's output. Stacked in the operand's shape, XLA's CPU backend
    (jaxlib 0.10.2) fused that transpose into the concatenation. Each such kernel of the
    suite's 10M transformer with ten probes took 70 to 150 ms of LLVM time to compile.
    Flattened first, the transpose is a kernel of its own, and compile time there fell
    from 3.4 to 3.0 times value_and_grad's. Ten probes ran at the same speed on the 10M
    transformer and 2 % slower on the 10k and 0.5M ones. One probe ran 3 % faster with
    the fused form and compiled fast enough, so it is kept there.

    NOTE: measured on a CPU only.
    """
    k = t.shape[0]
    flat = jnp.concatenate([t.reshape(k, -1), u.reshape(k, -1)])
    return flat.reshape(2 * k, *t.shape[1:])


register(BilinearRule(), lax.dot_general_p, lax.conv_general_dilated_p)
