"""Elementwise unary primitives: `M = diag(ȳ ⊙ φ''(x))`.

Each entry gives `φ''` in closed form from the input `x`, the output `y` and the
equation's params. It also gives the sign of `φ''` where that is the same for every input,
which lets the sweep use `T = U` when every injection is positive semi-definite.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from cpjax.rules._base import (
    Curvature,
    Rule,
    register,
    sign_of_product,
    split_scalar_curvature,
)


class ElementwiseRule(Rule):
    """Local curvature `ȳ ⊙ φ''(x)` for an elementwise `y = φ(x)`."""

    def __init__(self, second_derivative, sign=None):
        self.second_derivative = second_derivative  # (x, y, params) -> φ''(x)
        self.sign = sign  # +1 or -1 when φ'' has one sign everywhere; else None

    def static_sign(self, node):
        return self.sign(node.params) if callable(self.sign) else self.sign

    def curvature(self, node, info):
        if not info.dependent(0) or info.out_signs[0] == 0:
            return Curvature.NONE
        if self.static_sign(node) == 0:
            return Curvature.NONE
        sign = sign_of_product(info.out_signs[0], self.static_sign(node))
        return Curvature.PSD if sign == 1 else Curvature.INDEFINITE

    def inject(self, ctx):
        (x,), (y,), (ybar,) = ctx.invals, ctx.outvals, ctx.ybar
        if ybar is None:
            return []
        m = ybar * self.second_derivative(x, y, ctx.node.params)
        v = ctx.draw(x.shape, x.dtype)
        fv, gv = split_scalar_curvature(m, v)
        return [(0, fv, None if ctx.symmetric else gv)]


def _nested_second_derivative(primitive):
    """φ'' by forward-over-forward differentiation, exact for an elementwise primitive."""

    def d2(x, y, params):
        def phi(z):
            return primitive.bind(z, **params)

        def dphi(z):
            return jax.jvp(phi, (z,), (jnp.ones_like(z),))[1]

        return jax.jvp(dphi, (x,), (jnp.ones_like(x),))[1]

    return d2


def _integer_pow(x, y, params):
    n = params["y"]
    if n in (0, 1):
        return jnp.zeros_like(x)
    if n == 2:
        return jnp.full_like(x, 2)
    return n * (n - 1) * lax.integer_pow(x, n - 2)


def _integer_pow_sign(params):
    n = params["y"]
    if n in (0, 1):
        return 0
    if n % 2 == 0 and n > 0:
        return 1
    return None


_SQRT_PI = math.sqrt(math.pi)
SECOND_DERIVATIVES = {
    lax.exp_p: (lambda x, y, p: y, 1),
    lax.exp2_p: (lambda x, y, p: y * math.log(2) ** 2, 1),
    lax.expm1_p: (lambda x, y, p: y + 1, 1),
    lax.log_p: (lambda x, y, p: -1 / (x * x), -1),
    lax.log1p_p: (lambda x, y, p: -1 / ((1 + x) * (1 + x)), -1),
    lax.tanh_p: (lambda x, y, p: -2 * y * (1 - y * y), None),
    lax.logistic_p: (lambda x, y, p: y * (1 - y) * (1 - 2 * y), None),
    lax.sin_p: (lambda x, y, p: -y, None),
    lax.cos_p: (lambda x, y, p: -y, None),
    lax.tan_p: (lambda x, y, p: 2 * y * (1 + y * y), None),
    lax.asin_p: (lambda x, y, p: x / (1 - x * x) ** 1.5, None),
    lax.acos_p: (lambda x, y, p: -x / (1 - x * x) ** 1.5, None),
    lax.atan_p: (lambda x, y, p: -2 * x / (1 + x * x) ** 2, None),
    lax.sinh_p: (lambda x, y, p: y, None),
    lax.cosh_p: (lambda x, y, p: y, 1),
    lax.asinh_p: (lambda x, y, p: -x / (1 + x * x) ** 1.5, None),
    lax.acosh_p: (lambda x, y, p: -x / (x * x - 1) ** 1.5, -1),
    lax.atanh_p: (lambda x, y, p: 2 * x / (1 - x * x) ** 2, None),
    lax.sqrt_p: (lambda x, y, p: -0.25 / (y * y * y), -1),
    lax.rsqrt_p: (lambda x, y, p: 0.75 * y**5, 1),
    lax.cbrt_p: (lambda x, y, p: -2 / (9 * y**5), None),
    lax.square_p: (lambda x, y, p: jnp.full_like(x, 2), 1),
    lax.integer_pow_p: (_integer_pow, _integer_pow_sign),
    lax.erf_p: (lambda x, y, p: -4 / _SQRT_PI * x * jnp.exp(-x * x), None),
    lax.erfc_p: (lambda x, y, p: 4 / _SQRT_PI * x * jnp.exp(-x * x), None),
    lax.erf_inv_p: (lambda x, y, p: 0.5 * math.pi * y * jnp.exp(2 * y * y), None),
    lax.lgamma_p: (lambda x, y, p: lax.polygamma(jnp.ones_like(x), x), None),
    lax.digamma_p: (lambda x, y, p: lax.polygamma(jnp.full_like(x, 2), x), None),
}

# Elementwise primitives without a short closed form: φ'' comes from nested JVPs of the
# primitive itself, which is still exact and per element.
NESTED = (lax.bessel_i0e_p, lax.bessel_i1e_p)

for _primitive, (_d2, _sign) in SECOND_DERIVATIVES.items():
    register(ElementwiseRule(_d2, _sign), _primitive)
for _primitive in NESTED:
    register(ElementwiseRule(_nested_second_derivative(_primitive)), _primitive)
