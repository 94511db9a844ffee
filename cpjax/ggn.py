"""The diagonal of the generalised Gauss-Newton matrix: by CP, and exactly.

For a loss `ℓ(z)` of a model's output `z = m(θ)`, the GGN is `G = Jᵀ ∇²ℓ(z) J` with
`J = ∂z/∂θ`: the Hessian without the model's own curvature. CP estimates its diagonal by
injecting curvature only in the loss (Monte Carlo GGN; BackPACK calls it DiagGGN-MC and
Sophia Gauss-Newton-Bartlett). For a convex loss every injection is positive
semi-definite, so one vector is carried and the estimate is never negative. For a network
of piecewise-linear units (ReLU) with a convex loss, the GGN equals the Hessian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpjax import _checks
from cpjax._api import _transform
from cpjax._trace import Composition
from cpjax.baselines import _flat_objective


def _check_loss_args(name, loss_args):
    if not isinstance(loss_args, (tuple, list)):
        raise TypeError(
            f"{name} requires loss_args to be a tuple of extra arguments for loss_fn, got "
            f"{type(loss_args).__name__}. Pass loss_args=(targets,) for a single one."
        )
    return tuple(loss_args)


def cp_ggn_diag(model_fn, loss_fn, argnums=0, *, num_samples=1, probe="rademacher",
                separable=True, sample_chunk_size=None):
    """Return a function estimating the Gauss-Newton diagonal of `loss_fn(model_fn(...))`.

    Args:
      model_fn: the model, `model_fn(*args) -> z` (any pytree of arrays).
      loss_fn: the loss, `loss_fn(z, *loss_args) -> scalar`.
      argnums: which of the model's arguments to differentiate.
      num_samples: K, the number of probes averaged in one sweep.
      probe: "rademacher" or "gaussian".
      separable: use the separable-axis form where the batch axis allows (see
        `cp_hessian_diag`).
      sample_chunk_size: carry at most this many probes in one sweep (see
        `cp_hessian_diag`).

    Returns:
      `fn(*args, loss_args=(), key)` returning the estimate with the structure of
      `args[argnums]`.

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> model = lambda w, x: jnp.tanh(x @ w)
      >>> loss = lambda z, y: 0.5 * jnp.sum((z - y) ** 2)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
      >>> d = cpjax.cp_ggn_diag(model, loss)(jnp.ones((3, 2)) / 3, x, loss_args=(y,),
      ...                                     key=jax.random.key(0))
      >>> d.shape
      (3, 2)
    """
    run = _ggn_runner("cp_ggn_diag", model_fn, loss_fn, argnums, num_samples, probe,
                      separable, sample_chunk_size)

    def ggn_fn(*args, loss_args=(), key=None):
        return run(args, loss_args, key)[2]

    return ggn_fn


def cp_value_grad_and_ggn_diag(model_fn, loss_fn, argnums=0, *, num_samples=1,
                               probe="rademacher", separable=True, sample_chunk_size=None):
    """Return a function giving the loss, its gradient and a CP estimate of the GGN diagonal.

    All three come from one forward pass and one backward sweep. Because only the loss
    injects curvature, the sweep carries the cotangent and `num_samples` linear rows; for a
    convex loss (softmax cross-entropy, squared error) one vector per probe (T = U).

    Args:
      model_fn, loss_fn, argnums, num_samples, probe, separable, sample_chunk_size: as in
        `cp_ggn_diag`.

    Returns:
      `fn(*args, loss_args=(), key)` returning `(value, grad, diag)`, where `value` is
      `loss_fn(model_fn(*args), *loss_args)` and `grad` and `diag` have the structure of
      `args[argnums]` (a tuple of such for a tuple `argnums`).

    Example:
      >>> import jax, jax.numpy as jnp, cpjax
      >>> model = lambda w, x: x @ w
      >>> loss = lambda z, y: 0.5 * jnp.sum((z - y) ** 2)
      >>> x, y = jnp.array([[1.0, 2.0]]), jnp.zeros(1)
      >>> value, grad, diag = cpjax.cp_value_grad_and_ggn_diag(model, loss)(
      ...     jnp.ones(2), x, loss_args=(y,), key=jax.random.key(0))
      >>> diag  # x², exact here because the loss has a single output
      Array([1., 4.], dtype=float32)
    """
    run = _ggn_runner("cp_value_grad_and_ggn_diag", model_fn, loss_fn, argnums, num_samples,
                      probe, separable, sample_chunk_size)

    def value_grad_and_diag(*args, loss_args=(), key=None):
        return run(args, loss_args, key)

    return value_grad_and_diag


def _ggn_runner(name, model_fn, loss_fn, argnums, num_samples, probe, separable,
                sample_chunk_size):
    """Return `run(args, loss_args, key) -> (value, grad, diag)` of the composition."""
    for fn, role in ((model_fn, "model_fn"), (loss_fn, "loss_fn")):
        if not callable(fn):
            raise TypeError(f"{name} requires a callable {role}, got {fn!r}.")
    _checks.check_options(name, num_samples, probe)
    _checks.check_chunk_size(name, sample_chunk_size)
    single = isinstance(argnums, (int, np.integer))
    runs = {}  # normalized argnums -> runner; loss_args travel as one more argument

    def run(args, loss_args, key):
        loss_args = _check_loss_args(name, loss_args)
        nums = _checks.normalize_argnums(name, argnums, len(args))
        if nums not in runs:
            runs[nums] = _transform(name, Composition(model_fn, loss_fn),
                                    nums[0] if single else nums, False, num_samples, probe,
                                    separable, sample_chunk_size=sample_chunk_size,
                                    aux_option=False)[0]
        value, _, grads, diags = runs[nums]((*args, loss_args), key)
        if single:
            return value, grads[0], diags[0]
        return value, tuple(grads), tuple(diags)

    return run


def exact_ggn_diag(model_fn, loss_fn, argnums=0, *, chunk_size=64):
    """Return a function computing the exact Gauss-Newton diagonal, one column at a time.

    Entry `i` is `(J e_i)ᵀ ∇²ℓ (J e_i)`: a JVP of the model and a Hessian-vector product of
    the loss, batched `chunk_size` coordinates at a time with `lax.map`.

    Example:
      >>> import jax.numpy as jnp, cpjax
      >>> model = lambda w, x: x @ w
      >>> loss = lambda z: 0.5 * jnp.sum(z ** 2)
      >>> cpjax.exact_ggn_diag(model, loss)(jnp.ones(2), jnp.array([[1.0, 2.0]]))
      Array([1., 4.], dtype=float32)
    """
    name = "exact_ggn_diag"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or (
            chunk_size < 1):
        raise ValueError(f"{name} requires an integer chunk_size >= 1, got {chunk_size!r}.")
    single = isinstance(argnums, (int, np.integer))

    def ggn_fn(*args, loss_args=()):
        loss_args = _check_loss_args(name, loss_args)
        nums = _checks.normalize_argnums(name, argnums, len(args))
        _checks.check_differentiated(name, args, nums)
        # The model as a function of the raveled differentiated arguments.
        model_of, v0, unravel, _ = _flat_objective(model_fn, args, nums, has_aux=False)
        z = model_of(v0)
        _checks.check_output(name, jax.eval_shape(lambda z: loss_fn(z, *loss_args), z),
                             has_aux=False, aux_option=False)
        loss_grad = jax.grad(lambda z: loss_fn(z, *loss_args))

        def entry(i):
            jv = jax.jvp(model_of, (v0,), (jnp.zeros_like(v0).at[i].set(1),))[1]
            hjv = jax.jvp(loss_grad, (z,), (jv,))[1]
            leaves = zip(jax.tree_util.tree_leaves(jv), jax.tree_util.tree_leaves(hjv),
                         strict=True)
            return sum(jnp.vdot(a, b) for a, b in leaves)

        if v0.size == 0:
            flat = v0
        else:
            flat = jax.lax.map(entry, jnp.arange(v0.size),
                               batch_size=min(int(chunk_size), v0.size))
        parts = unravel(flat)
        return parts[0] if single else tuple(parts)

    return ggn_fn
