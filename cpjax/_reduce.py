"""Sums over axes, written as matrix products with vectors of ones.

XLA's CPU backend (jaxlib 0.10.2) hands a reduction to YNNPACK together with the
elementwise operations that feed it. Where one of those broadcasts an operand along the
probe axis, as rows of T and U times a per-example value do, the fused reduction ran 1.5
to 6 times slower than a product with ones. For example, summing `x * s` over the last
axis, with `x` of shape (2, 32, 16, 24) and `s` of shape (32, 16, 24), took 66 µs against
16 µs per call on two CPU cores. Without the broadcast the product with ones was often the
slower one, so it is used only where the measurements favour it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def sum_axes(x, axes, keepdims: bool = False, scale: float = 1.0):
    """Return `scale * jnp.sum(x, axis=axes, keepdims=keepdims)`, as a product with ones.

    `x` is a floating-point array. 16-bit inputs are summed in float32, at the highest
    precision, so that no accelerator rounds the summands to a shorter format. The sum is
    multiplied by `scale` before it is cast back to `x`'s dtype, so that a mean over many
    entries does not overflow float16 on the way.

    Example:
      >>> import jax.numpy as jnp
      >>> sum_axes(jnp.ones((2, 3, 4)), (1,))
      Array([[3., 3., 3., 3.],
             [3., 3., 3., 3.]], dtype=float32)
    """
    axes = tuple(sorted(a % x.ndim for a in axes))
    if not axes:
        return x if scale == 1.0 else (x * scale).astype(x.dtype)
    sum_dtype = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
    ones = jnp.ones([x.shape[a] for a in axes], x.dtype)
    out = lax.dot_general(x, ones, ((axes, tuple(range(len(axes)))), ((), ())),
                          precision=lax.Precision.HIGHEST, preferred_element_type=sum_dtype)
    if scale != 1.0:
        out = out * scale
    out = out.astype(x.dtype)
    if keepdims:
        out = out.reshape([1 if a in axes else n for a, n in enumerate(x.shape)])
    return out
