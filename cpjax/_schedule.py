"""Order computations where XLA's scheduler would keep large arrays alive.

XLA's CPU backend drops optimization barriers before it schedules, so a data dependence is
what orders two computations there.
"""

from __future__ import annotations

import jax.numpy as jnp
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
    first = jnp.abs(y.reshape(-1)[0])
    zero = lax.stop_gradient(jnp.minimum(first, jnp.zeros((), first.dtype)))
    return x + zero.astype(x.dtype)
