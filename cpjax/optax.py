"""Optax transformations fed by Curvature Propagation estimates of the Hessian diagonal.

Three ways to use Curvature Propagation (CP) in an optax training loop:

* `cp_hessian_diag_estimator`: a drop-in `hessian_diagonal_fn` for `optax.contrib.sophia`,
  in place of its Hutchinson estimator. It takes the same extra argument, `obj_fn`.
* `scale_by_cp_sophia` and its alias `cp_sophia`: Sophia's clipped step, preconditioned
  by an exponential moving average (EMA) of the diagonal.
* `scale_by_cp_adahessian` and its alias `cp_adahessian`: AdaHessian's step, preconditioned
  by the root mean square of the diagonal.

The two preconditioners take a new estimate every `update_interval` updates. Each `update`
call needs one of two extra keyword arguments:

* `obj_fn`: the loss as a function of the parameters alone. The transformation then runs
  CP itself: one forward pass and one fused backward sweep, on top of the gradient that
  the caller already paid for.
* `hessian_diag`: a diagonal the caller already has. On updates that take an estimate,
  `cp_value_grad_and_hessian_diag_from_state` computes the loss, the gradient and the
  diagonal in one forward pass and one fused backward sweep, so the gradient is not paid
  twice. On the other updates it computes the loss and the gradient only.
  `cp_value_grad_and_ggn_diag_from_state` does the same with the Gauss-Newton diagonal,
  for a loss split into a model and a loss of its output.

Probe keys are carried in the optimizer state. Every update splits the state's key, and
the estimate of that update (when one is due) uses the second half, so both ways of
feeding the diagonal see the same probes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cpjax import _checks
from cpjax._api import cp_hessian_diag, cp_value_grad_and_hessian_diag
from cpjax.ggn import cp_value_grad_and_ggn_diag

__all__ = [
    "CPHessianDiagEstimatorState",
    "ScaleByCPAdaHessianState",
    "ScaleByCPSophiaState",
    "cp_adahessian",
    "cp_hessian_diag_estimator",
    "cp_sophia",
    "cp_value_grad_and_ggn_diag_from_state",
    "cp_value_grad_and_hessian_diag_from_state",
    "scale_by_cp_adahessian",
    "scale_by_cp_sophia",
]


class CPHessianDiagEstimatorState(NamedTuple):
    """State of `cp_hessian_diag_estimator`."""

    key: jax.Array  # PRNG key split at every update: typed key of shape (), or uint32[2]


class ScaleByCPSophiaState(NamedTuple):
    """State of `scale_by_cp_sophia`."""

    count: jax.Array  # shape (), int32: updates applied so far
    hessian_count: jax.Array  # shape (), int32: diagonal estimates folded into `nu` so far
    steps_until_hessian: jax.Array  # shape (), int32: 0 when this update takes an estimate
    mu: optax.Updates  # EMA of the gradient: leaves shaped like params, dtype mu_dtype or params'
    nu: optax.Updates  # EMA of the raw (signed) diagonal estimates: shape and dtype of params
    key: jax.Array  # PRNG key split at every update: typed key of shape (), or uint32[2]


class ScaleByCPAdaHessianState(NamedTuple):
    """State of `scale_by_cp_adahessian`."""

    count: jax.Array  # shape (), int32: updates applied so far
    hessian_count: jax.Array  # shape (), int32: diagonal estimates folded into `nu` so far
    steps_until_hessian: jax.Array  # shape (), int32: 0 when this update takes an estimate
    mu: optax.Updates  # EMA of the gradient: leaves shaped like params, dtype mu_dtype or params'
    nu: optax.Updates  # EMA of the squared diagonal estimates: shape and dtype of params
    key: jax.Array  # PRNG key split at every update: typed key of shape (), or uint32[2]


_PRECONDITIONER_STATES = (ScaleByCPSophiaState, ScaleByCPAdaHessianState)


# ---------------------------------------------------------------------------------------
# Argument checks


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _check_decay(name: str, option: str, value) -> None:
    if _is_number(value) and not 0 <= value < 1:
        raise ValueError(f"{name} requires 0 <= {option} < 1, got {option}={value!r}.")


def _check_positive(name: str, option: str, value) -> None:
    if _is_number(value) and not value > 0:
        raise ValueError(f"{name} requires {option} > 0, got {option}={value!r}.")


def _check_update_interval(name: str, update_interval) -> None:
    if isinstance(update_interval, jax.Array):
        return  # an injected hyperparameter (optax.inject_hyperparams), possibly traced
    if isinstance(update_interval, bool) or not isinstance(update_interval, (int, np.integer)):
        raise TypeError(
            f"{name} requires an int update_interval (the number of updates between two "
            f"Hessian-diagonal estimates), got {update_interval!r}."
        )
    if update_interval < 1:
        raise ValueError(f"{name} requires update_interval >= 1, got {update_interval}.")


def _is_integer_seed(key) -> bool:
    if isinstance(key, bool):
        return False
    if isinstance(key, (int, np.integer)):
        return True
    # optax.inject_hyperparams turns an int seed into a scalar integer array
    return (isinstance(key, jax.Array) and key.shape == ()
            and jnp.issubdtype(key.dtype, jnp.integer))


def _check_key(name: str, key) -> None:
    if not _is_integer_seed(key):
        _checks.check_key(name, key)


def _as_key(key) -> jax.Array:
    """Return `jax.random.PRNGKey(key)` for an integer seed, else the PRNG key unchanged.

    A seed becomes a raw uint32 key, not a typed one, so that the optimizer state contains
    plain arrays only: `jax.tree.map(np.asarray, state)` fails on a typed key. The draws are
    the same as from `jax.random.key(key)`.
    """
    if _is_integer_seed(key):
        return jax.random.PRNGKey(key)
    return key


def _num_samples(name: str, num_samples) -> int:
    """Return the number of probes as a Python int, with None meaning 1.

    The default is None, not 1, so that `optax.inject_hyperparams` leaves it alone. That
    wrapper turns every numeric argument into an array, but a probe count must be static.
    """
    if num_samples is None:
        return 1
    if isinstance(num_samples, jax.Array) and num_samples.shape == ():
        try:
            return int(num_samples)
        except jax.errors.ConcretizationTypeError as err:
            raise TypeError(
                f"{name} requires a static num_samples, but got a traced value. Under "
                "optax.inject_hyperparams, pass static_args=('num_samples',)."
            ) from err
    return num_samples


def _cp_options(name: str, key, num_samples, probe, separable) -> dict:
    """Check the CP options and return those `cpjax.cp_hessian_diag` takes."""
    _check_key(name, key)
    num_samples = _num_samples(name, num_samples)
    _checks.check_options(name, num_samples, probe)
    _checks.check_separable(name, separable)
    return {"num_samples": num_samples, "probe": probe, "separable": separable}


# ---------------------------------------------------------------------------------------
# The diagonal estimate of one update


def _cast_like(tree, like):
    return jax.tree.map(lambda x, y: jnp.asarray(x).astype(y.dtype), tree, like)


def _fresh_diagonal(name, params, due, probe_key, obj_fn, hessian_diag, cp_options):
    """Return this update's diagonal estimate: the caller's, CP's on `obj_fn`, or zeros.

    CP runs under `lax.cond`, so its sweep is executed only on updates where `due` is true.
    """
    if hessian_diag is not None:
        if obj_fn is not None:
            raise ValueError(
                f"{name} got both obj_fn and hessian_diag in update(); pass one: hessian_diag "
                "to use your own estimate, or obj_fn to have CP estimate it."
            )
        _check_hessian_diag(name, hessian_diag, params)
        return _cast_like(hessian_diag, params)
    if obj_fn is None:
        raise ValueError(
            f"{name} requires obj_fn (the loss as a function of params alone) or "
            "hessian_diag (a Hessian-diagonal estimate at params) as a keyword argument of "
            "update(), got neither. For example: update(grads, state, params, "
            "obj_fn=lambda p: loss(p, batch))."
        )
    estimate = cp_hessian_diag(_loss_alone(name, obj_fn), **cp_options)

    def run_cp(p):
        return _cast_like(estimate(p, key=probe_key), p)

    return lax.cond(due, run_cp, lambda p: jax.tree.map(jnp.zeros_like, p), params)


def _check_hessian_diag(name: str, hessian_diag, params) -> None:
    """Raise unless `hessian_diag` has the tree structure and leaf shapes of `params`."""
    if jax.tree.structure(hessian_diag) != jax.tree.structure(params):
        raise ValueError(
            f"{name}: hessian_diag must have the tree structure of params, got "
            f"{jax.tree.structure(hessian_diag)} for params of structure "
            f"{jax.tree.structure(params)}."
        )
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), d in zip(paths, jax.tree.leaves(hessian_diag), strict=True):
        if jnp.shape(d) != jnp.shape(p):
            raise ValueError(
                f"{name}: hessian_diag must have the shapes of params, but at "
                f"params{jax.tree_util.keystr(path)} it has shape {jnp.shape(d)} against "
                f"{jnp.shape(p)}."
            )


def _loss_alone(name: str, obj_fn):
    """Return `obj_fn`, checked at trace time to return the loss alone (no aux)."""

    def loss(params):
        out = obj_fn(params)
        if isinstance(out, (tuple, list)):
            raise TypeError(
                f"{name} requires obj_fn to return the loss alone, a scalar, but it returned "
                f"a {type(out).__name__} of length {len(out)}. If it returns (loss, aux), "
                "pass obj_fn=lambda p: f(p)[0]."
            )
        return out

    return loss


def _check_params(name: str, params) -> None:
    if params is None:
        raise ValueError(
            f"{name} requires params in update(updates, state, params): the Hessian "
            "diagonal is estimated at the current parameters."
        )


def _update_ema(moment, value, decay):
    """Return `decay * moment + (1 - decay) * value`, in the dtype of `moment`."""
    return jax.tree.map(
        lambda m, v: (decay * m + (1 - decay) * v.astype(m.dtype)).astype(m.dtype),
        moment, value)


def _debias(moment, decay, count):
    """Divide each leaf by `1 - decay ** count` (Adam's bias correction), keeping its dtype."""

    def one(m):
        # at least float32, because in bfloat16 1 - 0.999 ** count is off by percents
        dtype = m.dtype if jnp.finfo(m.dtype).bits >= 32 else jnp.float32
        power = jnp.asarray(decay, dtype) ** jnp.asarray(count, dtype)
        return m / (1 - power).astype(m.dtype)

    return jax.tree.map(one, moment)


class _Schedule(NamedTuple):
    """The bookkeeping shared by both preconditioners for one update."""

    due: jax.Array  # shape (), bool: this update takes a diagonal estimate
    probe_key: jax.Array  # key of this update's CP probes
    next_key: jax.Array  # key stored in the new state
    count: jax.Array  # shape (), int32: updates applied, this one included
    hessian_count: jax.Array  # shape (), int32: estimates folded in, this one included
    steps_until_hessian: jax.Array  # shape (), int32, for the new state


def _schedule(state, update_interval: int) -> _Schedule:
    due = state.steps_until_hessian == 0
    next_key, probe_key = jax.random.split(state.key)
    interval = jnp.asarray(update_interval).astype(jnp.int32)
    steps_until_hessian = jnp.where(due, interval - 1, state.steps_until_hessian - 1)
    hessian_count = jnp.where(due, optax.safe_int32_increment(state.hessian_count),
                              state.hessian_count)
    return _Schedule(due, probe_key, next_key, optax.safe_int32_increment(state.count),
                     hessian_count, steps_until_hessian)


def _init_counters(key) -> dict:
    zero = jnp.zeros([], jnp.int32)
    return {"count": zero, "hessian_count": zero, "steps_until_hessian": zero,
            "key": _as_key(key)}


# ---------------------------------------------------------------------------------------
# Public transformations


def cp_hessian_diag_estimator(
    key: jax.Array | int = 0,
    *,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Estimate the Hessian diagonal with Curvature Propagation, for `optax.contrib.sophia`.

    The returned transformation has the interface `optax.contrib.sophia` expects of its
    `hessian_diagonal_fn` argument: `update(updates, state, params, obj_fn=...)` ignores
    `updates` and returns `(diag, new_state)`, where `diag` is a CP estimate (Martens,
    Sutskever and Swersky, ICML 2012) of the diagonal of the Hessian of `obj_fn` at
    `params`. `obj_fn(params)` must return the scalar loss. Other keyword arguments are
    accepted and ignored.

    The estimate is unbiased and is not clipped, so where the curvature is negative, or
    small next to the estimate's noise, entries can be negative. Sophia's update handles
    that itself: it divides by `max(gamma * h, eps)`, so such coordinates take a clipped,
    sign-like step.

    Each update costs one forward pass and one backward sweep carrying the cotangent and
    the CP vectors. With one probe, `benchmarks/optim.py` measured that sweep at about 2.8
    gradient evaluations on its digits MLP and CNN, but at 7 to 10 on its one-block
    transformer (2-core x86 CPU, float32). A gradient plus a Hessian-vector product cost
    1.8 to 3.1 gradient evaluations on all three. Run inside Sophia, the sweep comes on top
    of the gradient passed as `updates`. `cp_sophia` with
    `cp_value_grad_and_hessian_diag_from_state` gets both from one sweep instead.

    Args:
      key: PRNG key (`jax.random.key`) or int seed of the probes. It is split at every
        update and carried in the state.
      num_samples: number of probes averaged in one sweep; None means 1.
      probe: "rademacher" or "gaussian".
      separable: use CP's separable-axis form where the loss sums over independent
        examples (see `cpjax.cp_hessian_diag`).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a
      `CPHessianDiagEstimatorState`.

    Raises:
      ValueError: from `update`, when `params` or `obj_fn` is missing.

    Example:
      >>> import jax.numpy as jnp, optax, cpjax.optax
      >>> estimator = cpjax.optax.cp_hessian_diag_estimator(key=0)
      >>> opt = optax.contrib.sophia(1e-2, hessian_diagonal_fn=estimator)
      >>> loss = lambda p: jnp.sum(p ** 4)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([4.0, -32.0]), state, params, obj_fn=loss)
      >>> updates.shape
      (2,)
    """
    name = "cp_hessian_diag_estimator"
    cp_options = _cp_options(name, key, num_samples, probe, separable)

    def init_fn(params):
        del params
        return CPHessianDiagEstimatorState(key=_as_key(key))

    def update_fn(updates, state, params=None, *, obj_fn=None, **extra_args):
        del updates, extra_args
        _check_params(name, params)
        if obj_fn is None:
            raise ValueError(
                f"{name} requires obj_fn, the loss as a function of params alone, as a "
                "keyword argument of update(); optax.contrib.sophia passes it on from its "
                "own update(..., obj_fn=...)."
            )
        next_key, probe_key = jax.random.split(state.key)
        diag = cp_hessian_diag(_loss_alone(name, obj_fn), **cp_options)(params, key=probe_key)
        return _cast_like(diag, params), CPHessianDiagEstimatorState(key=next_key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_cp_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: float = 0.01,
    clip_threshold: float | None = 1.0,
    update_interval: int = 10,
    *,
    key: jax.Array | int = 0,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates with Sophia's clipped step, preconditioned by a CP Hessian diagonal.

    With `g` the incoming update (the gradient), `t` the update number and `n` the number
    of diagonal estimates taken so far, each leaf becomes

        m = b1 m + (1 - b1) g,                    m̂ = m / (1 - b1^t)
        h = b2 h + (1 - b2) ĥ  (every update_interval updates, the first one included)
        ĥ_avg = h / (1 - b2^n)
        update = clip(m̂ / max(gamma ĥ_avg, eps), -clip_threshold, clip_threshold)

    where `ĥ` is a fresh estimate of the Hessian diagonal at the current parameters. The
    estimate comes from the `hessian_diag` keyword argument of `update` when given (on
    updates where none is due it is ignored), else from CP run on `obj_fn`. Exactly one of
    the two is required.

    Negative and tiny estimates: `h` averages the raw, signed estimates, so it stays an
    unbiased average of the diagonal (clamping each estimate at zero would bias it
    upwards). Where `gamma * ĥ_avg < eps` (negative curvature, or noise around zero), the
    denominator is `eps`, the ratio is large and the clip turns the step into
    `clip_threshold * sign(m̂)`, as in `optax.contrib.sophia`, which uses the same
    denominator. With `clip_threshold=None` such steps are unbounded, so keep the clip
    unless the loss is convex.

    Departures from Sophia (Liu, Li, Hall, Liang and Ma, 2023) and from
    `optax.contrib.sophia` (optax 0.2.8):

    * The Hessian EMA is bias-corrected (divided by `1 - b2^n`), so the first updates use
      the estimates themselves, not `(1 - b2)` times them. The paper has no such
      correction, and `optax.contrib.sophia` only corrects the momentum.
    * An update that takes an estimate uses it at once, as in the paper's algorithm.
      `optax.contrib.sophia` uses the EMA from before the estimate.
    * The estimator is CP, not Hutchinson's `v ⊙ Hv` (Sophia-H) or the Gauss-Newton-Bartlett
      estimator (Sophia-G).

    Args:
      b1: decay rate of the gradient EMA.
      b2: decay rate of the Hessian-diagonal EMA, applied once per estimate (so once
        every `update_interval` updates).
      eps: floor of the denominator `gamma * ĥ_avg`.
      gamma: scale of the diagonal in the denominator.
      clip_threshold: bound on each coordinate of the step, or None for no clipping.
      update_interval: number of updates between two diagonal estimates.
      key: PRNG key (`jax.random.key`) or int seed of the CP probes, carried in the state.
      num_samples: number of CP probes per estimate (used with `obj_fn`); None means 1.
      probe: "rademacher" or "gaussian" (used with `obj_fn`).
      separable: CP's separable-axis form (used with `obj_fn`; see `cpjax.cp_hessian_diag`).
      mu_dtype: dtype of the gradient EMA; None keeps the dtype of the parameters.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByCPSophiaState`.

    Raises:
      TypeError, ValueError: for invalid hyperparameters; from `update`, when `params` is
        missing, or when neither or both of `obj_fn` and `hessian_diag` are given.

    Example:
      >>> import jax.numpy as jnp, cpjax.optax
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * p ** 2)
      >>> tx = cpjax.optax.scale_by_cp_sophia(gamma=1.0, update_interval=1)
      >>> params = jnp.array([0.5, 0.5])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.5, 5.0]), state, params, obj_fn=loss)
      >>> jnp.round(updates, 4)  # m̂ / ĥ_avg = g / diag(H): a Newton step
      Array([0.5, 0.5], dtype=float32)
    """
    name = "scale_by_cp_sophia"
    _check_decay(name, "b1", b1)
    _check_decay(name, "b2", b2)
    _check_positive(name, "eps", eps)
    _check_positive(name, "gamma", gamma)
    if clip_threshold is not None:
        _check_positive(name, "clip_threshold", clip_threshold)
    _check_update_interval(name, update_interval)
    cp_options = _cp_options(name, key, num_samples, probe, separable)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_moment_dtype(mu_dtype, p)), params)
        return ScaleByCPSophiaState(mu=mu, nu=jax.tree.map(jnp.zeros_like, params),
                                    **_init_counters(key))

    def update_fn(updates, state, params=None, *, obj_fn=None, hessian_diag=None,
                  **extra_args):
        del extra_args
        _check_params(name, params)
        step = _schedule(state, update_interval)
        diag = _fresh_diagonal(name, params, step.due, step.probe_key, obj_fn, hessian_diag,
                               cp_options)
        nu = jax.tree.map(lambda new, old: jnp.where(step.due, new, old),
                          _update_ema(state.nu, diag, b2), state.nu)
        mu = _update_ema(state.mu, updates, b1)
        mu_hat = _debias(mu, b1, step.count)
        nu_hat = _debias(nu, b2, step.hessian_count)

        def sophia_step(m, h, g):
            ratio = m.astype(h.dtype) / jnp.maximum(gamma * h, eps)
            if clip_threshold is not None:
                ratio = jnp.clip(ratio, -clip_threshold, clip_threshold)
            return ratio.astype(g.dtype)

        new_updates = jax.tree.map(sophia_step, mu_hat, nu_hat, updates)
        new_state = ScaleByCPSophiaState(
            count=step.count, hessian_count=step.hessian_count,
            steps_until_hessian=step.steps_until_hessian, mu=mu, nu=nu, key=step.next_key)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _moment_dtype(mu_dtype, param):
    return param.dtype if mu_dtype is None else mu_dtype


def cp_sophia(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    gamma: float = 0.01,
    clip_threshold: float | None = 1.0,
    update_interval: int = 10,
    *,
    key: jax.Array | int = 0,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Build Sophia with a Curvature Propagation estimate of the Hessian diagonal.

    The chain `scale_by_cp_sophia`, `optax.add_decayed_weights` (decoupled weight decay, as
    in AdamW and in Sophia) and `optax.scale_by_learning_rate`. The defaults are those of
    `optax.contrib.sophia` (optax 0.2.8). See `scale_by_cp_sophia` for the update, the
    handling of negative estimates and the departures from the paper.

    Pass the loss as `obj_fn` to `update` and the optimizer runs CP itself, every
    `update_interval` updates. To pay for the gradient only once, compute the loss, the
    gradient and the diagonal together with `cp_value_grad_and_hessian_diag_from_state`
    and pass the diagonal as `hessian_diag`. Whether an estimate step then costs less than
    optax's gradient plus Hessian-vector product depends on the model: see the costs
    measured in `cp_hessian_diag_estimator`.

    Args:
      learning_rate: a scalar or an optax schedule.
      b1: decay rate of the gradient EMA.
      b2: decay rate of the Hessian-diagonal EMA, applied once per estimate.
      eps: floor of the denominator `gamma * ĥ_avg`.
      weight_decay: rate of the decoupled weight decay.
      weight_decay_mask: tree of booleans or a function of the params returning one:
        where the weight decay applies (see `optax.add_decayed_weights`).
      gamma: scale of the diagonal in the denominator.
      clip_threshold: bound on each coordinate of the step before the learning rate, or
        None for no clipping.
      update_interval: number of updates between two diagonal estimates.
      key: PRNG key or int seed of the CP probes, carried in the state.
      num_samples: number of CP probes per estimate (used with `obj_fn`); None means 1.
      probe: "rademacher" or "gaussian" (used with `obj_fn`).
      separable: CP's separable-axis form (used with `obj_fn`).
      mu_dtype: dtype of the gradient EMA; None keeps the dtype of the parameters.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    References:
      Liu, Li, Hall, Liang and Ma, "Sophia: A Scalable Stochastic Second-order Optimizer
      for Language Model Pre-training", 2023 (arXiv:2305.14342).

    Example:
      >>> import jax, jax.numpy as jnp, optax, cpjax.optax
      >>> def loss(params, x, y):
      ...     return jnp.mean((jnp.tanh(x @ params["w"]) - y) ** 2)
      >>> x, y = jnp.ones((8, 3)), jnp.zeros(8)
      >>> params = {"w": jnp.full(3, 0.5)}
      >>> opt = cpjax.optax.cp_sophia(learning_rate=0.05)
      >>> state = opt.init(params)
      >>> value_grad_diag = cpjax.optax.cp_value_grad_and_hessian_diag_from_state(loss)
      >>> for _ in range(3):
      ...     value, grads, diag = value_grad_diag(params, x, y, state=state)
      ...     updates, state = opt.update(grads, state, params, hessian_diag=diag)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params, x, y) < value)
      True
    """
    return optax.chain(
        scale_by_cp_sophia(b1=b1, b2=b2, eps=eps, gamma=gamma, clip_threshold=clip_threshold,
                           update_interval=update_interval, key=key, num_samples=num_samples,
                           probe=probe, separable=separable, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def scale_by_cp_adahessian(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    update_interval: int = 1,
    *,
    key: jax.Array | int = 0,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates with AdaHessian's step, preconditioned by a CP Hessian diagonal.

    With `g` the incoming update (the gradient), `t` the update number, `n` the number of
    diagonal estimates taken so far and `ĥ` a fresh estimate of the Hessian diagonal, each
    leaf becomes

        m = b1 m + (1 - b1) g,                   m̂ = m / (1 - b1^t)
        v = b2 v + (1 - b2) ĥ²  (every update_interval updates, the first one included)
        v̂ = v / (1 - b2^n)
        update = m̂ / (v̂^(hessian_power / 2) + eps)

    so the step is Adam's with the root mean square of the diagonal in place of the root
    mean square of the gradient. `ĥ` comes from the `hessian_diag` keyword argument of
    `update` when given (on updates where none is due it is ignored), else from CP run
    on `obj_fn`. Exactly one of the two is required.

    Negative and tiny estimates: squaring makes the sign irrelevant, as in AdaHessian, so
    `v̂` tracks `E[ĥ²] = diag² + Var[ĥ]`, never below the squared diagonal. `eps` bounds
    the step where the diagonal is near zero: there the step is about `m̂ / eps`, so keep
    `eps` at the scale of the curvature you expect.

    Departures from AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney, AAAI
    2021):

    * The estimator is CP, not Hutchinson's `v ⊙ Hv`.
    * No spatial averaging. The paper averages the estimate over the spatial positions of
      each convolution kernel to lower its variance. Here each coordinate keeps its own
      estimate, and CP's separable-axis form is what lowers the variance.
    * With `update_interval > 1` (the paper's delayed Hessian update), `v` is
      bias-corrected by the number of estimates `n`, not by the update number `t`.

    Args:
      b1: decay rate of the gradient EMA.
      b2: decay rate of the EMA of the squared diagonal, applied once per estimate.
      eps: added to the denominator.
      hessian_power: exponent `k` of the denominator `v̂^(k/2)`; 1 is AdaHessian, 0 gives
        momentum SGD.
      update_interval: number of updates between two diagonal estimates.
      key: PRNG key or int seed of the CP probes, carried in the state.
      num_samples: number of CP probes per estimate (used with `obj_fn`); None means 1.
      probe: "rademacher" or "gaussian" (used with `obj_fn`).
      separable: CP's separable-axis form (used with `obj_fn`; see `cpjax.cp_hessian_diag`).
      mu_dtype: dtype of the gradient EMA; None keeps the dtype of the parameters.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a
      `ScaleByCPAdaHessianState`.

    Raises:
      TypeError, ValueError: for invalid hyperparameters; from `update`, when `params` is
        missing, or when neither or both of `obj_fn` and `hessian_diag` are given.

    Example:
      >>> import jax.numpy as jnp, cpjax.optax
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * p ** 2)
      >>> tx = cpjax.optax.scale_by_cp_adahessian(eps=0.0)
      >>> params = jnp.array([0.5, 0.5])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.5, 5.0]), state, params, obj_fn=loss)
      >>> jnp.round(updates, 4)  # m̂ / |ĥ| = g / diag(H) on the first update
      Array([0.5, 0.5], dtype=float32)
    """
    name = "scale_by_cp_adahessian"
    _check_decay(name, "b1", b1)
    _check_decay(name, "b2", b2)
    if _is_number(eps) and eps < 0:
        raise ValueError(f"{name} requires eps >= 0, got eps={eps!r}.")
    if _is_number(hessian_power) and hessian_power < 0:
        raise ValueError(f"{name} requires hessian_power >= 0, got {hessian_power!r}.")
    _check_update_interval(name, update_interval)
    cp_options = _cp_options(name, key, num_samples, probe, separable)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=_moment_dtype(mu_dtype, p)), params)
        return ScaleByCPAdaHessianState(mu=mu, nu=jax.tree.map(jnp.zeros_like, params),
                                        **_init_counters(key))

    def update_fn(updates, state, params=None, *, obj_fn=None, hessian_diag=None,
                  **extra_args):
        del extra_args
        _check_params(name, params)
        step = _schedule(state, update_interval)
        diag = _fresh_diagonal(name, params, step.due, step.probe_key, obj_fn, hessian_diag,
                               cp_options)
        squared = jax.tree.map(jnp.square, diag)
        nu = jax.tree.map(lambda new, old: jnp.where(step.due, new, old),
                          _update_ema(state.nu, squared, b2), state.nu)
        mu = _update_ema(state.mu, updates, b1)
        mu_hat = _debias(mu, b1, step.count)
        nu_hat = _debias(nu, b2, step.hessian_count)

        def adahessian_step(m, v, g):
            if _is_number(hessian_power) and hessian_power == 1:
                scale = jnp.sqrt(v)
            else:
                scale = v ** (0.5 * hessian_power)
            return (m.astype(v.dtype) / (scale + eps)).astype(g.dtype)

        new_updates = jax.tree.map(adahessian_step, mu_hat, nu_hat, updates)
        new_state = ScaleByCPAdaHessianState(
            count=step.count, hessian_count=step.hessian_count,
            steps_until_hessian=step.steps_until_hessian, mu=mu, nu=nu, key=step.next_key)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cp_adahessian(
    learning_rate: optax.ScalarOrSchedule = 0.15,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    update_interval: int = 1,
    *,
    key: jax.Array | int = 0,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Build AdaHessian with a Curvature Propagation estimate of the Hessian diagonal.

    The chain `scale_by_cp_adahessian`, `optax.add_decayed_weights` (decoupled weight
    decay) and `optax.scale_by_learning_rate`. See `scale_by_cp_adahessian` for the
    update, the handling of negative estimates and the departures from the paper.

    Pass the loss as `obj_fn` to `update` and the optimizer runs CP itself. To pay for the
    gradient only once, compute the loss, the gradient and the diagonal in one sweep with
    `cp_value_grad_and_hessian_diag_from_state` and pass the diagonal as `hessian_diag`.
    With the default `update_interval=1` every update takes an estimate, so the fused
    sweep replaces the gradient computation at every step.

    Args:
      learning_rate: a scalar or an optax schedule.
      b1: decay rate of the gradient EMA.
      b2: decay rate of the EMA of the squared diagonal, applied once per estimate.
      eps: added to the denominator.
      hessian_power: exponent `k` of the denominator `v̂^(k/2)`.
      weight_decay: rate of the decoupled weight decay.
      weight_decay_mask: tree of booleans or a function of the params returning one:
        where the weight decay applies (see `optax.add_decayed_weights`).
      update_interval: number of updates between two diagonal estimates.
      key: PRNG key or int seed of the CP probes, carried in the state.
      num_samples: number of CP probes per estimate (used with `obj_fn`); None means 1.
      probe: "rademacher" or "gaussian" (used with `obj_fn`).
      separable: CP's separable-axis form (used with `obj_fn`).
      mu_dtype: dtype of the gradient EMA; None keeps the dtype of the parameters.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    References:
      Yao, Gholami, Shen, Mustafa, Keutzer and Mahoney, "ADAHESSIAN: An Adaptive Second
      Order Optimizer for Machine Learning", AAAI 2021 (arXiv:2006.00719).

    Example:
      >>> import jax, jax.numpy as jnp, optax, cpjax.optax
      >>> loss = lambda p: jnp.sum(jnp.cosh(p))
      >>> params = jnp.array([1.0, -2.0])
      >>> opt = cpjax.optax.cp_adahessian(learning_rate=0.5)
      >>> state = opt.init(params)
      >>> for _ in range(20):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = opt.update(grads, state, params, obj_fn=loss)
      ...     params = optax.apply_updates(params, updates)
      >>> float(loss(params)) < 2.05  # from cosh(1) + cosh(2) = 5.3 to near the minimum, 2
      True
    """
    return optax.chain(
        scale_by_cp_adahessian(b1=b1, b2=b2, eps=eps, hessian_power=hessian_power,
                               update_interval=update_interval, key=key,
                               num_samples=num_samples, probe=probe, separable=separable,
                               mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# ---------------------------------------------------------------------------------------
# Loss, gradient and diagonal in one sweep


def _find_preconditioner_state(name: str, opt_state):
    found = [
        node for node in jax.tree.leaves(
            opt_state, is_leaf=lambda node: isinstance(node, _PRECONDITIONER_STATES))
        if isinstance(node, _PRECONDITIONER_STATES)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{name} requires an optimizer state with exactly one ScaleByCPSophiaState or "
            f"ScaleByCPAdaHessianState in it (from cp_sophia, cp_adahessian or their "
            f"scale_by_* blocks), found {len(found)}."
        )
    return found[0]


def cp_value_grad_and_hessian_diag_from_state(
    fun: Callable[..., Any],
    has_aux: bool = False,
    *,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
) -> Callable[..., tuple]:
    """Return a function giving the loss, the gradient and, when due, the CP diagonal.

    `fn(params, *args, state)` reads the CP preconditioner state inside `state` (the
    state of `cp_sophia`, `cp_adahessian` or a chain containing one of their `scale_by_*`
    blocks). When the next update takes a diagonal estimate, `fn` runs
    `cpjax.cp_value_grad_and_hessian_diag` (one forward pass and one fused backward
    sweep) with the probe key that the update would use. Otherwise it runs
    `jax.value_and_grad` and returns zeros for the diagonal. `lax.cond` makes the choice,
    so the function can be jitted whole and only the taken branch runs.

    Pass the diagonal to the optimizer's `update` as `hessian_diag`. The optimizer then
    gets the same estimate as from `obj_fn=lambda p: fun(p, *args)` with the same state,
    without a second pass over the data.

    Args:
      fun: loss function `fun(params, *args)` returning a scalar, or `(scalar, aux)` with
        `has_aux=True`.
      has_aux: whether `fun` returns a pair `(loss, aux)`.
      num_samples: number of CP probes per estimate; None means 1.
      probe: "rademacher" or "gaussian".
      separable: CP's separable-axis form (see `cpjax.cp_hessian_diag`).

    Returns:
      `fn(params, *args, state)` returning `(value, grad, diag)`, with `value` replaced
      by `(value, aux)` when `has_aux=True`; `grad` and `diag` have the structure of
      `params`.

    Raises:
      ValueError: from `fn`, when `state` contains no CP preconditioner state or more than
        one.

    Example:
      >>> import jax, jax.numpy as jnp, optax, cpjax.optax
      >>> loss = lambda p, x: jnp.sum((p * x) ** 2)
      >>> opt = cpjax.optax.cp_sophia(learning_rate=0.1, update_interval=2)
      >>> params, x = jnp.array([1.0, 2.0]), jnp.array([1.0, 3.0])
      >>> state = opt.init(params)
      >>> fn = jax.jit(cpjax.optax.cp_value_grad_and_hessian_diag_from_state(loss))
      >>> value, grad, diag = fn(params, x, state=state)
      >>> jnp.round(diag, 4)  # due on the first update: 2 x²
      Array([ 2., 18.], dtype=float32)
      >>> _, state = opt.update(grad, state, params, hessian_diag=diag)
      >>> fn(params, x, state=state)[2]  # not due on the second
      Array([0., 0.], dtype=float32)
    """
    name = "cp_value_grad_and_hessian_diag_from_state"
    num_samples = _num_samples(name, num_samples)
    _checks.check_options(name, num_samples, probe)
    fused = cp_value_grad_and_hessian_diag(fun, 0, has_aux, num_samples=num_samples,
                                           probe=probe, separable=separable)
    return _when_due(name, fused, jax.value_and_grad(fun, has_aux=has_aux))


def cp_value_grad_and_ggn_diag_from_state(
    model_fn: Callable[..., Any],
    loss_fn: Callable[..., Any],
    *,
    num_samples: int | None = None,
    probe: str = "rademacher",
    separable: bool = True,
) -> Callable[..., tuple]:
    """Return a function giving the loss, the gradient and, when due, the CP GGN diagonal.

    The Gauss-Newton counterpart of `cp_value_grad_and_hessian_diag_from_state`, for a loss
    written as `loss_fn(model_fn(params, *args), *loss_args)`: when the next update takes
    an estimate, it runs `cpjax.cp_value_grad_and_ggn_diag`, which injects curvature only
    in the loss. This is Sophia's Gauss-Newton variant with CP's probes in place of sampled
    labels. The sweep carries linear rows only (one per probe for a convex loss), so an
    estimate step costs little more than a gradient.

    Args:
      model_fn: the model, `model_fn(params, *args) -> z`.
      loss_fn: the loss, `loss_fn(z, *loss_args) -> scalar`.
      num_samples: number of CP probes per estimate; None means 1.
      probe: "rademacher" or "gaussian".
      separable: CP's separable-axis form (see `cpjax.cp_hessian_diag`).

    Returns:
      `fn(params, *args, loss_args=(), state)` returning `(value, grad, diag)`; `grad` and
      `diag` have the structure of `params`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, cpjax.optax
      >>> model = lambda p, x: x @ p
      >>> loss = lambda z, y: 0.5 * jnp.sum((z - y) ** 2)
      >>> opt = cpjax.optax.cp_sophia(learning_rate=0.1)
      >>> params, x, y = jnp.array([1.0, 2.0]), jnp.array([[1.0, 3.0]]), jnp.zeros(1)
      >>> state = opt.init(params)
      >>> fn = cpjax.optax.cp_value_grad_and_ggn_diag_from_state(model, loss)
      >>> value, grad, diag = fn(params, x, loss_args=(y,), state=state)
      >>> diag  # x², exact for a single output
      Array([1., 9.], dtype=float32)
    """
    name = "cp_value_grad_and_ggn_diag_from_state"
    num_samples = _num_samples(name, num_samples)
    _checks.check_options(name, num_samples, probe)
    fused = cp_value_grad_and_ggn_diag(model_fn, loss_fn, num_samples=num_samples,
                                       probe=probe, separable=separable)

    def value_and_grad(params, *args, loss_args=()):
        return jax.value_and_grad(lambda p: loss_fn(model_fn(p, *args), *loss_args))(params)

    return _when_due(name, fused, value_and_grad)


def _when_due(name, fused, value_and_grad):
    """Return `fn(params, *args, state, **kwargs)`: `fused` when an estimate is due.

    Otherwise `value_and_grad` runs and the diagonal is zeros; `lax.cond` makes the choice.
    """

    def value_grad_and_diag(params, *args, state, **kwargs):
        inner = _find_preconditioner_state(name, state)
        _, probe_key = jax.random.split(inner.key)  # the same half as in `_schedule`

        def with_diag():
            value, grad, diag = fused(params, *args, key=probe_key, **kwargs)
            return value, grad, _cast_like(diag, params)

        def without_diag():
            value, grad = value_and_grad(params, *args, **kwargs)
            return value, grad, jax.tree.map(jnp.zeros_like, params)

        return lax.cond(inner.steps_until_hessian == 0, with_diag, without_diag)

    return value_grad_and_diag
