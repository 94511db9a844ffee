"""Order computations where XLA's scheduler would keep large arrays alive.

XLA's CPU backend drops optimization barriers before it schedules, so a data dependence is
what orders two computations there.
"""

from __future__ import annotations

import numpy as np
from jax import lax


def after(x, y):
    """Return `x` unchanged, but computed from a value of `y`, so no earlier than `y`.

    The added term is `min(|y₀|, 0)`: zero, or NaN where `y₀` is NaN (the estimate is then
    NaN anyway). Its gradient is stopped, since at `y₀ = 0` the minimum's would not be zero.

    Example:
      >>> import jax.numpy as jnp
      >>> after(jnp.ones(2), jnp.array([-3.0]))
      Array([1., 1.], dtype=float32)
    """
    # Written with `lax` operations, because each `jnp` function traces through a jit wrapper
    # of its own and the sweep calls `after` at most equations. Together with the `lax` forms
    # of the accumulator's sums and of `safe_sqrt`, this cut the tracing of the suite's 10k
    # transformer by 8 to 12 ms, of about 180 ms.
    first = lax.abs(lax.reshape(lax.slice(y, (0,) * y.ndim, (1,) * y.ndim), ()))
    zero = lax.convert_element_type(
        lax.stop_gradient(lax.min(first, lax.full((), 0, first.dtype))), x.dtype)
    if x.dtype == np.bool_:  # `lax.add` rejects booleans.
        return lax.bitwise_or(x, zero)
    return lax.add(x, zero)
