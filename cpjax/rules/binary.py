"""Elementwise binary primitives: per element a 2×2 block `ȳ·[[φ_aa, φ_ab], [φ_ab, φ_bb]]`.

Where only one operand depends on the differentiated arguments, the block reduces to the
scalar `ȳ φ_aa` (or `ȳ φ_bb`), so `mul` or `div` by a constant injects nothing. Where both do
and their leaf sets are disjoint, the cross term `φ_ab` cannot reach the diagonal and is
dropped for diagonal estimates. Otherwise the block is split per element by its closed-form
eigendecomposition `Q Λ Qᵀ` into `F = Q|Λ|^½`, `G = Q sign(Λ)|Λ|^½`.

Where one operand is broadcast along the other (a layer norm's divisor, a scalar factor)
and the full operand's own second partial is zero (`mul`, `div`), the elements that share
one broadcast entry have a curvature of rank 2, split with two probes per broadcast entry
(`BinaryRule._inject_arrow`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from cpjax._reduce import sum_axes
from cpjax.rules._base import (
    STACKED,
    Curvature,
    Rule,
    register,
    safe_sqrt,
    sign_of_product,
    split_scalar_curvature,
)


def sum_to_shape(x, shape, lead=0, by_product=False):
    """Sum `x` over the axes along which an operand of `shape` was broadcast.

    `lead` leading axes of `x` (the probes) are kept. Operands of lax's elementwise
    primitives are either scalars or broadcast along axes of size 1. With `by_product`,
    the sum is a product with ones (see `cpjax._reduce`).
    """
    if x.shape[lead:] == tuple(shape):
        return x
    if len(shape) == 0:
        axes, keepdims = tuple(range(lead, x.ndim)), False
    else:
        axes = tuple(lead + k for k, n in enumerate(shape) if n == 1 and x.shape[lead + k] != 1)
        keepdims = True
    if by_product:
        return sum_axes(x, axes, keepdims=keepdims)
    return jnp.sum(x, axis=axes, keepdims=keepdims)


def _sum_and_difference(x):
    """Return `[x₀ - x₁; x₀ + x₁]` for `x` of shape (2, K, ...), as rows (2K, ...).

    It is a product with `[[1, -1], [1, 1]]`, not a concatenation. XLA's CPU backend emits
    a concatenation with one branch per operand, and each branch here carried the code of
    both probe hashes. On the suite's 10k transformer at K = 10 the product cut the compile
    thread time by 5 % and left the run time unchanged.
    """
    signs = jnp.array([[1, -1], [1, 1]], x.dtype)
    out = lax.dot_general(signs, x.reshape(2, -1), (((1,), (0,)), ((), ())),
                          precision=lax.Precision.HIGHEST)
    return out.reshape(2 * x.shape[1], *x.shape[2:])


def _mul(a, b, y):
    zero = jnp.zeros_like(y)
    return zero, jnp.ones_like(y), zero


def _div(a, b, y):
    inv_b = 1 / b
    return jnp.zeros_like(y), -inv_b * inv_b, 2 * a * inv_b * inv_b * inv_b


def _pow(a, b, y):
    log_a = jnp.log(a)
    return b * (b - 1) * jnp.power(a, b - 2), jnp.power(a, b - 1) * (1 + b * log_a), y * log_a**2


def _atan2(a, b, y):
    r2 = a * a + b * b
    scale = 1 / (r2 * r2)
    return -2 * a * b * scale, (a * a - b * b) * scale, 2 * a * b * scale


class BinaryRule(Rule):
    """Curvature of an elementwise `y = φ(a, b)` from its three second partials."""

    def __init__(self, partials, zero_aa=False, zero_bb=False, sign_bb=None):
        self.partials = partials  # (a, b, y) -> (φ_aa, φ_ab, φ_bb)
        self.zero_aa = zero_aa  # φ_aa = 0 everywhere
        self.zero_bb = zero_bb  # φ_bb = 0 everywhere
        self.sign_bb = sign_bb  # sign of φ_bb where it is the same everywhere

    def curvature(self, node, info):
        dep_a, dep_b = info.dependent(0), info.dependent(1)
        if info.out_signs[0] == 0 or not (dep_a or dep_b):
            return Curvature.NONE
        if dep_a and dep_b and not info.disjoint(0, 1):
            return Curvature.INDEFINITE
        kinds = []
        if dep_a and not self.zero_aa:
            kinds.append(None)
        if dep_b and not self.zero_bb:
            kinds.append(sign_of_product(info.out_signs[0], self.sign_bb))
        if not kinds:
            return Curvature.NONE
        return Curvature.PSD if all(k == 1 for k in kinds) else Curvature.INDEFINITE

    def inject(self, ctx):
        info = ctx.info
        (a, b), (y,), (ybar,) = ctx.invals, ctx.outvals, ctx.ybar
        if ybar is None:
            return []
        faa, fab, fbb = self.partials(a, b, y)
        dep_a, dep_b = info.dependent(0), info.dependent(1)
        if dep_a and dep_b and not info.disjoint(0, 1):
            full = self._arrow_operand(a.shape, b.shape, y.shape)
            if full is not None:
                return self._inject_arrow(ctx, full, ybar * fab, ybar * (fbb, faa)[full])
            block = self._inject_block(ctx, ybar * faa, ybar * fab, ybar * fbb)
            shapes = [x.shape for x in ctx.invals]
            return [
                (i, sum_to_shape(fv, shapes[i], 1), sum_to_shape(gv, shapes[i], 1))
                for i, fv, gv in block
            ]
        out = []
        for i, dep, zero, second in ((0, dep_a, self.zero_aa, faa), (1, dep_b, self.zero_bb, fbb)):
            if dep and not zero:
                # An operand broadcast along size-1 axes gets the sum of its elements' curvature.
                m = sum_to_shape(ybar * second, ctx.invals[i].shape)
                v = ctx.draw(m.shape, m.dtype, salt=i)
                fv, gv = split_scalar_curvature(m, v)
                out.append((i, fv, None if ctx.symmetric else gv))
        return out

    def _arrow_operand(self, shape_a, shape_b, shape_y):
        """Return the index of the full operand if the other one is broadcast, else None.

        The full operand must have a zero second partial of its own (`mul`, and `div` by a
        broadcast divisor). Then each group of elements that share one broadcast entry has
        an arrow-shaped curvature of rank at most 2.
        """
        shapes = (shape_a, shape_b)
        for full, zero in ((0, self.zero_aa), (1, self.zero_bb)):
            if zero and shapes[full] == shape_y and shapes[1 - full] != shape_y:
                return full
        return None

    def _inject_arrow(self, ctx, full, q, r):
        """Inject the curvature of one broadcast entry and the elements that share it.

        For a group of elements `x_j` sharing the broadcast entry `z`, the curvature is
        `[[0, q], [qᵀ, s]]` with `s = Σ_j r_j`: rank 2, spanned by `q / ‖q‖` and `z`, with
        two probes per group instead of two per element, so the rows of `z` carry no sum of
        independent terms. The core `[[0, ‖q‖], [‖q‖, s]]` has eigenvalues
        `λ± = s/2 ± ρ`, `ρ = √(s²/4 + ‖q‖²)`, so `λ+ ≥ 0 ≥ λ-` and `λ+ λ- = -‖q‖²`. Its
        symmetric split (the one of `_inject_block`) simplifies to
        `F w = (q (w₁ - w₂), λ+ w₁ - λ- w₂) / √(2ρ)` and `G w = (q (w₁ + w₂), λ+ w₁ + λ- w₂)
        / √(2ρ)`: one square root per group, and no division by `‖q‖`.
        """
        shared = ctx.invals[1 - full].shape
        # Sum ‖q‖² and s in one reduction. The groups' values are formed as flat vectors,
        # which compile faster (see `split_scalar_curvature`).
        squares, total = sum_to_shape(jnp.stack([q * q, r]), shared, 1).reshape(2, -1)
        half = 0.5 * total
        rho = safe_sqrt(half * half + squares)
        # Where ρ = 0, q and s are 0 too, so every row is 0 whatever the divisor.
        divisor = jnp.sqrt(2 * jnp.where(rho > 0, rho, 0.5))
        w1 = ctx.draw(rho.shape, rho.dtype, salt=0)
        w2 = ctx.draw(rho.shape, rho.dtype, salt=1)
        # A scalar shared entry has no size-1 axes to broadcast along: add them.
        expanded = (w1.shape[0],) + (1,) * (q.ndim - len(shared)) + tuple(shared)
        if ctx.symmetric:
            positive = ((half + rho) * w1 / divisor).reshape(-1, *shared)
            negative = ((half - rho) * w2 / divisor).reshape(-1, *shared)
            f_probes = ((w1 - w2) / divisor).reshape(expanded)
            g_probes = ((w1 + w2) / divisor).reshape(expanded)
            return [(full, q * f_probes, q * g_probes),
                    (1 - full, positive - negative, positive + negative)]
        # Both operands get [F v; G v] stacked along the probe axis. For the full operand it
        # is one product with the stacked probes, so the sum of rows reads one array.
        probes = jnp.stack([w1, w2]) / divisor
        stacked = _sum_and_difference(probes).reshape(2 * expanded[0], *expanded[1:])
        scaled = jnp.stack([half + rho, half - rho])[:, None] * probes
        shared_rows = _sum_and_difference(scaled).reshape(-1, *shared)
        return [(full, q * stacked, STACKED), (1 - full, shared_rows, STACKED)]

    @staticmethod
    def _inject_block(ctx, p, q, r):
        """Inject the per-element block [[p, q], [q, r]] by its eigendecomposition."""
        # Closed form without trigonometric functions: λ = (p + r)/2 ± ρ, and the first
        # eigenvector (c, s) has cos 2θ = ((p − r)/2)/ρ and the sign of q.
        half_gap = 0.5 * (p - r)
        rho = safe_sqrt(half_gap * half_gap + q * q)
        cos_2theta = jnp.where(rho > 0, half_gap / jnp.where(rho > 0, rho, 1), 1)
        c = safe_sqrt(0.5 * (1 + cos_2theta))
        s = jnp.where(q >= 0, 1, -1) * safe_sqrt(0.5 * (1 - cos_2theta))
        mid = 0.5 * (p + r)
        lam1, lam2 = mid + rho, mid - rho
        w1 = ctx.draw(p.shape, p.dtype, salt=0)
        w2 = ctx.draw(p.shape, p.dtype, salt=1)
        f1, g1 = split_scalar_curvature(lam1, w1)
        f2, g2 = split_scalar_curvature(lam2, w2)
        return [
            (0, c * f1 - s * f2, c * g1 - s * g2),
            (1, s * f1 + c * f2, s * g1 + c * g2),
        ]


register(BinaryRule(_mul, zero_aa=True, zero_bb=True), lax.mul_p)
register(BinaryRule(_div, zero_aa=True), lax.div_p)
register(BinaryRule(_pow, sign_bb=1), lax.pow_p)
register(BinaryRule(_atan2), lax.atan2_p)
