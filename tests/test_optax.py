"""Conformance suite of the CP optax transformations.

Optax conventions (extra keyword arguments, one compilation, dtypes), convergence on a
parabola and on Rosenbrock, and the averaged diagonal on a quadratic with a known Hessian.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpjax import optax as cp_optax

# The Hessian of `quadratic` is A, so the averaged diagonal must approach diag(A) = [3, 2, 1].
QUADRATIC_A = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
PARABOLA_SCALES = jnp.array([1.0, 10.0, 100.0])
PARABOLA_MINIMUM = jnp.array([1.0, -2.0, 0.5])
ROSENBROCK_START = jnp.array([-1.2, 1.0])
Z_SCORE = 5.0  # two-sided, about 6e-7 per coordinate under a normal approximation


def parabola(x):
    return jnp.sum(PARABOLA_SCALES.astype(x.dtype) * (x - PARABOLA_MINIMUM.astype(x.dtype)) ** 2)


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def quadratic(x):
    return 0.5 * x @ QUADRATIC_A.astype(x.dtype) @ x


# name -> (optimizer factory taking the learning rate, how the diagonal reaches `update`)
OPTIMIZERS = {
    "cp_sophia/obj_fn": (lambda lr: cp_optax.cp_sophia(lr, weight_decay=0.0), "obj_fn"),
    "cp_sophia/hessian_diag": (lambda lr: cp_optax.cp_sophia(lr, weight_decay=0.0),
                               "hessian_diag"),
    "cp_adahessian/obj_fn": (lambda lr: cp_optax.cp_adahessian(lr, b2=0.99), "obj_fn"),
    "cp_adahessian/hessian_diag": (lambda lr: cp_optax.cp_adahessian(lr, b2=0.99),
                                   "hessian_diag"),
    "optax_sophia/cp_estimator": (
        lambda lr: optax.contrib.sophia(
            lr, weight_decay=0.0, hessian_diagonal_fn=cp_optax.cp_hessian_diag_estimator(key=1)),
        "obj_fn"),
}
# Learning rates and step counts picked from a few tried by hand; with the keys fixed in
# the optimizers, every run is deterministic.
PARABOLA_RUNS = {"cp_sophia": (0.1, 500), "cp_adahessian": (0.1, 500), "optax_sophia": (0.01, 1000)}
ROSENBROCK_RUNS = {"cp_sophia": (0.1, 1000), "cp_adahessian": (2.0, 3000),
                   "optax_sophia": (0.03, 1000)}


def make_update(opt, loss, mode, **extra_args):
    """Return `update(params, state) -> (params, state, grads)`: one step of `opt` on `loss`."""
    value_grad_and_diag = cp_optax.cp_value_grad_and_hessian_diag_from_state(loss)

    def update(params, state):
        if mode == "obj_fn":
            grads = jax.grad(loss)(params)
            updates, state = opt.update(grads, state, params, obj_fn=loss, **extra_args)
        else:
            _, grads, diag = value_grad_and_diag(params, state=state)
            updates, state = opt.update(grads, state, params, hessian_diag=diag, **extra_args)
        return optax.apply_updates(params, updates), state, grads

    return update


def make_step(opt, loss, mode, trace_counter=None, **extra_args):
    """Return the jitted update; `trace_counter` gets one entry each time JAX traces it."""
    update = make_update(opt, loss, mode, **extra_args)

    @jax.jit
    def step(params, state):
        if trace_counter is not None:
            trace_counter.append(1)  # runs only while JAX traces `step`
        return update(params, state)

    return step


def run(opt, loss, mode, params, num_steps):
    """Run `num_steps` updates in one compiled `lax.scan`; return params, state, all grads."""
    update = make_update(opt, loss, mode)

    @jax.jit
    def scan(params, state):
        def body(carry, _):
            params, state, grads = update(*carry)
            return (params, state), grads

        (params, state), grads = jax.lax.scan(body, (params, state), None, length=num_steps)
        return params, state, grads

    return scan(params, opt.init(params))


def tree_signature(tree):
    return jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)


# ---------------------------------------------------------------------------------------
# optax conventions


@functools.cache
def chained_step(name):
    """Return `(opt, jitted step, trace list)`: the optimizer after a clip, fed an extra kwarg."""
    factory, mode = OPTIMIZERS[name]
    opt, traces = optax.chain(optax.clip_by_global_norm(10.0), factory(0.01)), []
    return opt, make_step(opt, parabola, mode, traces, unrelated_extra_arg=jnp.ones(3)), traces


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update_accepts_extra_kwargs(name):
    opt, step, _ = chained_step(name)
    params = jnp.zeros(3)
    params, _, _ = step(params, opt.init(params))
    assert np.all(np.isfinite(params))
    assert not np.allclose(params, 0.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_second_step_no_recompilation(name):
    opt, step, traces = chained_step(name)
    params = jnp.zeros(3)
    state = opt.init(params)
    new_params, new_state, _ = step(params, state)
    step(*step(new_params, new_state)[:2])
    assert len(traces) == 1  # whichever test called `step` first traced it
    assert tree_signature(new_state) == tree_signature(state)


@pytest.mark.parametrize("alias", [cp_optax.cp_sophia, cp_optax.cp_adahessian])
def test_alias_wraps_in_inject_hyperparams(alias):
    opt = optax.inject_hyperparams(alias)(learning_rate=0.1)
    params = jnp.zeros(3)
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    update = jax.jit(functools.partial(opt.update, obj_fn=parabola))
    updates, state = update(jax.grad(parabola)(params), state, params)
    np.testing.assert_array_equal(updates, jnp.zeros(3))
    assert int(state.inner_state[0].hessian_count) == 1


def mixed_dtype_problem():
    """Return params with a float32 and a bfloat16 leaf, and a loss over both."""
    params = {"single": jnp.zeros(3, jnp.float32), "half": jnp.ones(2, jnp.bfloat16)}

    def loss(p):
        return parabola(p["single"]) + jnp.sum(jnp.cosh(p["half"])).astype(jnp.float32)

    return params, loss


# Both code paths: CP run inside `update` and the diagonal passed in.
@pytest.mark.parametrize("name", ["cp_sophia/hessian_diag", "cp_adahessian/obj_fn"])
def test_dtype_kept(name):
    factory, mode = OPTIMIZERS[name]
    opt = factory(0.01)
    params, loss = mixed_dtype_problem()
    state = opt.init(params)
    # strict promotion: any silent widening to float64 (x64 is on) raises here
    with jax.numpy_dtype_promotion("strict"):
        new_params, new_state, _ = make_step(opt, loss, mode)(params, state)
    assert tree_signature(new_params) == tree_signature(params)
    assert tree_signature(new_state) == tree_signature(state)


def test_estimator_dtype_kept():
    estimator = cp_optax.cp_hessian_diag_estimator()
    params, loss = mixed_dtype_problem()
    state = estimator.init(params)
    with jax.numpy_dtype_promotion("strict"):
        diag, new_state = jax.jit(
            lambda p, s: estimator.update(None, s, p, obj_fn=loss))(params, state)
    assert tree_signature(diag) == tree_signature(params)
    assert tree_signature(new_state) == tree_signature(state)
    np.testing.assert_allclose(diag["single"], 2 * PARABOLA_SCALES, rtol=1e-6)
    np.testing.assert_allclose(diag["half"].astype(jnp.float32), jnp.cosh(1.0), rtol=1e-2)


# One way of feeding the diagonal per optimizer: test_hessian_diag_path_matches_obj_fn
# shows that both give the same trajectory.
CONVERGENCE_CASES = ["cp_sophia/hessian_diag", "cp_adahessian/obj_fn", "optax_sophia/cp_estimator"]


@pytest.mark.parametrize("name", CONVERGENCE_CASES)
def test_converges_on_parabola(name):
    factory, mode = OPTIMIZERS[name]
    learning_rate, num_steps = PARABOLA_RUNS[name.split("/")[0]]
    params, _, _ = run(factory(learning_rate), parabola, mode, jnp.zeros(3), num_steps)
    np.testing.assert_allclose(params, PARABOLA_MINIMUM, atol=1e-3)


@pytest.mark.parametrize("name", CONVERGENCE_CASES)
def test_converges_on_rosenbrock(name):
    factory, mode = OPTIMIZERS[name]
    learning_rate, num_steps = ROSENBROCK_RUNS[name.split("/")[0]]
    params, _, _ = run(factory(learning_rate), rosenbrock, mode, ROSENBROCK_START, num_steps)
    np.testing.assert_allclose(params, jnp.ones(2), atol=1e-2)
    assert rosenbrock(params) < 1e-4


# ---------------------------------------------------------------------------------------
# The averaged diagonal on a quadratic: diag(A), not the squared gradient


def single_probe_estimates(num_draws=2000, seed=20120626):
    """Return `(num_draws, 3)` CP estimates of diag(A), each from its own key."""
    keys = jax.random.split(jax.random.key(seed), num_draws)
    estimate = cp_optax.cp_hessian_diag_estimator().update

    def one(key):
        state = cp_optax.CPHessianDiagEstimatorState(key=key)
        return estimate(None, state, jnp.ones(3), obj_fn=quadratic)[0]

    return np.asarray(jax.vmap(one)(keys))


@functools.cache
def estimate_moments():
    samples = single_probe_estimates()
    return {"std": samples.std(0), "square_mean": (samples**2).mean(0),
            "square_std": (samples**2).std(0), "num_draws": len(samples)}


def ema_weights(decay, count):
    """Weights of the bias-corrected EMA over `count` values, oldest first."""
    weights = (1 - decay) * decay ** np.arange(count - 1, -1, -1)
    return weights / (1 - decay**count)


def run_quadratic(opt, mode, num_steps, decay):
    """Run on `quadratic` from far away; return the final state and the EMA of g²."""
    _, state, grads = run(opt, quadratic, mode, jnp.array([4.0, -3.0, 2.0]), num_steps)
    squared_grad_ema = ema_weights(decay, num_steps) @ np.asarray(grads) ** 2
    return state, squared_grad_ema


def test_sophia_averages_to_diag_a():
    num_steps, decay = 400, 0.99
    opt = cp_optax.cp_sophia(0.01, b2=decay, update_interval=1, weight_decay=0.0)
    state, squared_grad_ema = run_quadratic(opt, "hessian_diag", num_steps, decay)
    sophia_state = state[0]
    averaged = sophia_state.nu / (1 - decay ** int(sophia_state.hessian_count))
    exact = np.diag(QUADRATIC_A)
    # Independent estimates with one variance: SE of the weighted mean = std * ||w||.
    standard_error = estimate_moments()["std"] * np.linalg.norm(ema_weights(decay, num_steps))
    assert int(sophia_state.hessian_count) == num_steps
    assert np.all(standard_error > 0)
    assert np.all(np.abs(averaged - exact) <= Z_SCORE * standard_error)
    # The same test rejects the EMA of the squared gradient along the same path.
    assert np.any(np.abs(squared_grad_ema - exact) > Z_SCORE * standard_error)


def test_adahessian_averages_squared_estimates():
    num_steps, decay = 400, 0.99
    opt = cp_optax.cp_adahessian(0.05, b2=decay)
    state, _ = run_quadratic(opt, "hessian_diag", num_steps, decay)
    mean_square = state[0].nu / (1 - decay**num_steps)
    moments = estimate_moments()
    # E[ĥ²] = diag(A)² + Var[ĥ], itself estimated from independent draws, so the standard
    # error combines the spread of the EMA and that of the reference.
    expected = moments["square_mean"]
    standard_error = moments["square_std"] * np.hypot(
        np.linalg.norm(ema_weights(decay, num_steps)), 1 / np.sqrt(moments["num_draws"]))
    assert np.all(np.abs(mean_square - expected) <= Z_SCORE * standard_error)
    assert np.all(mean_square >= np.diag(QUADRATIC_A) ** 2 - Z_SCORE * standard_error)


def test_optax_sophia_with_estimator_averages_to_diag_a():
    num_steps, decay = 400, 0.99
    opt = optax.contrib.sophia(0.01, b2=decay, update_interval=1, weight_decay=0.0,
                               hessian_diagonal_fn=cp_optax.cp_hessian_diag_estimator(key=3))
    state, _ = run_quadratic(opt, "obj_fn", num_steps, decay)
    averaged = state[0].nu / (1 - decay**num_steps)  # optax does not debias nu
    standard_error = estimate_moments()["std"] * np.linalg.norm(ema_weights(decay, num_steps))
    assert np.all(np.abs(averaged - np.diag(QUADRATIC_A)) <= Z_SCORE * standard_error)


# ---------------------------------------------------------------------------------------
# Both ways of feeding the diagonal, keys and schedule


def small_problem():
    """Return `(loss, params, inputs, targets)`: a pytree loss whose leaves interact."""
    params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([0.3, -0.4])}
    inputs, targets = jnp.array([1.0, 2.0]), jnp.array([0.5, -0.5])

    def loss(p, x, y):
        return (quadratic(p["a"]) * (1 + jnp.sum(p["b"] ** 2))
                + jnp.sum((jnp.tanh(p["b"] * x) - y) ** 2))

    return loss, params, inputs, targets


@pytest.mark.parametrize(("factory", "expected_due"), [
    (lambda: cp_optax.cp_sophia(0.05, update_interval=3), [1, 0, 0, 1, 0]),
    (lambda: cp_optax.cp_adahessian(0.05), [1, 1, 1, 1, 1]),
], ids=["cp_sophia", "cp_adahessian"])
def test_hessian_diag_path_matches_obj_fn(factory, expected_due):
    loss, params, inputs, targets = small_problem()
    value_grad_and_diag = cp_optax.cp_value_grad_and_hessian_diag_from_state(loss)
    opt = factory()

    @jax.jit
    def step_with_obj_fn(p, state):
        value, grads = jax.value_and_grad(loss)(p, inputs, targets)
        updates, state = opt.update(grads, state, p, obj_fn=lambda q: loss(q, inputs, targets))
        return optax.apply_updates(p, updates), state, (value, grads, None)

    @jax.jit
    def step_with_hessian_diag(p, state):
        value, grads, diag = value_grad_and_diag(p, inputs, targets, state=state)
        updates, state = opt.update(grads, state, p, hessian_diag=diag)
        return optax.apply_updates(p, updates), state, (value, grads, diag)

    outputs, final_params = {}, {}
    for step in (step_with_obj_fn, step_with_hessian_diag):
        p, state, outputs[step] = params, opt.init(params), []
        for _ in range(len(expected_due)):
            p, state, output = step(p, state)
            outputs[step].append(output)
        final_params[step] = p
        assert int(state[0].hessian_count) == sum(expected_due)

    for (value, grads, _), (fused_value, fused_grads, _) in zip(
            outputs[step_with_obj_fn], outputs[step_with_hessian_diag], strict=True):
        np.testing.assert_allclose(fused_value, value, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # the diagonal is returned exactly on the updates that take an estimate
    due = [int(any(np.any(leaf != 0) for leaf in jax.tree.leaves(diag)))
           for _, _, diag in outputs[step_with_hessian_diag]]
    assert due == expected_due
    for a, b in zip(jax.tree.leaves(final_params[step_with_obj_fn]),
                    jax.tree.leaves(final_params[step_with_hessian_diag]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_from_state_with_aux():
    loss, params, inputs, targets = small_problem()
    fn = cp_optax.cp_value_grad_and_hessian_diag_from_state(
        lambda p, x, y: (loss(p, x, y), {"inputs_sum": jnp.sum(x)}), has_aux=True)
    state = cp_optax.cp_adahessian().init(params)
    (value, aux), grads, diag = jax.jit(fn)(params, inputs, targets, state=state)
    np.testing.assert_allclose(value, loss(params, inputs, targets), rtol=1e-12)
    np.testing.assert_allclose(aux["inputs_sum"], jnp.sum(inputs))
    assert jax.tree.structure(diag) == jax.tree.structure(params)


def jit_update(opt, obj_fn):
    return jax.jit(functools.partial(opt.update, obj_fn=obj_fn))


def test_key_advances_and_seeds_differ():
    opt = cp_optax.scale_by_cp_sophia(update_interval=1, key=0)
    update = jit_update(opt, quadratic)
    params = jnp.ones(3)
    diagonals = []
    for key in (jax.random.key(0), jax.random.key(1)):
        state = opt.init(params)._replace(key=key)
        _, new_state = update(jnp.ones(3), state, params)
        key_data = jax.random.key_data
        assert not np.array_equal(key_data(new_state.key), key_data(state.key))
        diagonals.append(new_state.nu)
    assert not np.allclose(diagonals[0], diagonals[1])


def test_raw_uint32_key_accepted():
    opt = cp_optax.scale_by_cp_adahessian(key=jax.random.PRNGKey(4))
    state = opt.init(jnp.ones(3))
    updates, state = jit_update(opt, quadratic)(jnp.ones(3), state, jnp.ones(3))
    assert state.key.dtype == jnp.uint32
    assert np.all(np.isfinite(updates))


def test_seeded_state_saves_as_numpy():
    """An int seed is stored as a raw key: the state converts to NumPy and back."""
    opt = cp_optax.cp_sophia(0.1, update_interval=1)
    params = jnp.ones(3)
    state = opt.init(params)
    update = jit_update(opt, quadratic)
    _, state = update(jax.grad(quadratic)(params), state, params)
    restored = jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, state))
    expected, _ = update(jax.grad(quadratic)(params), state, params)
    again, _ = update(jax.grad(quadratic)(params), restored, params)
    np.testing.assert_array_equal(again, expected)


def test_seed_under_rbg_default_impl():
    """An int seed under another default PRNG implementation gives a raw key cpjax accepts."""
    default = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        opt = cp_optax.cp_sophia(0.1, update_interval=1)
        params = jnp.ones(3)
        updates, state = opt.update(jax.grad(quadratic)(params), opt.init(params), params,
                                    obj_fn=quadratic)
        assert np.all(np.isfinite(updates))
    finally:
        jax.config.update("jax_default_prng_impl", default)


# ---------------------------------------------------------------------------------------
# Negative and tiny estimates


def test_sophia_negative_and_zero_curvature_take_sign_steps():
    def concave_then_linear(x):
        return -0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x[:2] ** 2) - 3.0 * x[2]

    opt = cp_optax.scale_by_cp_sophia(clip_threshold=1.0, update_interval=1)
    params = jnp.array([0.3, -0.2, 0.0])
    grads = jax.grad(concave_then_linear)(params)
    updates, state = jit_update(opt, concave_then_linear)(grads, opt.init(params), params)
    np.testing.assert_allclose(state.nu, [-0.01, -0.04, 0.0], rtol=1e-12)  # (1 - b2) ĥ, signed
    np.testing.assert_allclose(updates, jnp.sign(grads))  # clip(m̂ / eps) = sign(m̂)


def test_adahessian_negative_curvature_uses_magnitude():
    def concave(x):
        return -0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)

    opt = cp_optax.scale_by_cp_adahessian(eps=0.0)
    params = jnp.array([0.3, -0.2])
    grads = jax.grad(concave)(params)
    updates, _ = jit_update(opt, concave)(grads, opt.init(params), params)
    np.testing.assert_allclose(updates, grads / jnp.array([1.0, 4.0]), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("factory", [cp_optax.scale_by_cp_sophia, cp_optax.scale_by_cp_adahessian])
def test_update_without_diag_source_raises(factory):
    opt = factory()
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="obj_fn .* or hessian_diag"):
        opt.update(jnp.ones(3), opt.init(params), params)


@pytest.mark.parametrize("factory", [cp_optax.scale_by_cp_sophia, cp_optax.scale_by_cp_adahessian,
                                     cp_optax.cp_hessian_diag_estimator])
def test_update_without_params_raises(factory):
    opt = factory()
    with pytest.raises(ValueError, match="requires params"):
        opt.update(jnp.ones(3), opt.init(jnp.ones(3)), obj_fn=quadratic)


def test_estimator_without_obj_fn_raises():
    estimator = cp_optax.cp_hessian_diag_estimator()
    with pytest.raises(ValueError, match="requires obj_fn"):
        estimator.update(None, estimator.init(jnp.ones(3)), jnp.ones(3))


def test_hessian_diag_structure_mismatch_raises():
    opt = cp_optax.scale_by_cp_sophia()
    params = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match="tree structure of params"):
        opt.update(params, opt.init(params), params, hessian_diag=jnp.ones(3))


def test_hessian_diag_shape_mismatch_raises():
    opt = cp_optax.scale_by_cp_sophia()
    params = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"shapes of params.*\['a'\].*\(8,\) against \(3,\)"):
        opt.update(params, opt.init(params), params, hessian_diag={"a": jnp.ones(8)})


@pytest.mark.parametrize("factory", [cp_optax.scale_by_cp_sophia, cp_optax.scale_by_cp_adahessian])
def test_both_diag_sources_raise(factory):
    opt = factory()
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="both obj_fn and hessian_diag"):
        opt.update(params, opt.init(params), params, obj_fn=quadratic, hessian_diag=params)


@pytest.mark.parametrize("factory", [cp_optax.scale_by_cp_sophia, cp_optax.scale_by_cp_adahessian,
                                     cp_optax.cp_hessian_diag_estimator])
def test_obj_fn_with_aux_raises(factory):
    opt = factory()
    params = jnp.ones(3)
    with pytest.raises(TypeError, match=r"obj_fn to return the loss alone.*f\(p\)\[0\]"):
        opt.update(params, opt.init(params), params,
                   obj_fn=lambda p: (quadratic(p), {"norm": jnp.sum(p)}))


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"update_interval": 0}, ValueError),
    ({"update_interval": 2.0}, TypeError),
    ({"b2": 1.0}, ValueError),
    ({"b1": -0.1}, ValueError),
    ({"eps": 0.0}, ValueError),
    ({"gamma": -1.0}, ValueError),
    ({"clip_threshold": 0.0}, ValueError),
    ({"num_samples": 0}, ValueError),
    ({"probe": "uniform"}, ValueError),
    ({"key": "seed"}, TypeError),
])
def test_sophia_invalid_hyperparameters_raise(kwargs, error):
    with pytest.raises(error):
        cp_optax.scale_by_cp_sophia(**kwargs)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"eps": -1.0}, ValueError),
    ({"hessian_power": -0.5}, ValueError),
    ({"b2": 1.5}, ValueError),
    ({"update_interval": 0}, ValueError),
])
def test_adahessian_invalid_hyperparameters_raise(kwargs, error):
    with pytest.raises(error):
        cp_optax.scale_by_cp_adahessian(**kwargs)


def test_from_state_without_cp_state_raises():
    fn = cp_optax.cp_value_grad_and_hessian_diag_from_state(quadratic)
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="found 0"):
        fn(params, state=optax.adam(0.1).init(params))
    two = optax.chain(cp_optax.scale_by_cp_sophia(), cp_optax.scale_by_cp_adahessian())
    with pytest.raises(ValueError, match="found 2"):
        fn(params, state=two.init(params))


def test_injected_num_samples_needs_static_args():
    opt = optax.inject_hyperparams(cp_optax.cp_sophia)(learning_rate=0.1, num_samples=2)
    params = jnp.zeros(3)
    state = opt.init(params)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(functools.partial(opt.update, obj_fn=parabola))(params, state, params)


def test_ggn_from_state_due_and_exact_gradient():
    """The GGN variant estimates on due updates only, with the loss's exact gradient."""
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.3], [-0.4, 0.1]]), "b": jnp.array([0.2, 0.0])}
    inputs = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    targets = jnp.linspace(-0.5, 0.5, 8).reshape(4, 2)

    def model(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    def squared_error(z, y):
        return 0.5 * jnp.mean((z - y) ** 2)

    opt = cp_optax.cp_sophia(0.05, update_interval=2)
    fn = jax.jit(cp_optax.cp_value_grad_and_ggn_diag_from_state(model, squared_error))
    state = opt.init(params)
    ref_value, ref_grad = jax.value_and_grad(
        lambda p: squared_error(model(p, inputs), targets))(params)
    due = []
    for _ in range(4):
        value, grads, diag = fn(params, inputs, loss_args=(targets,), state=state)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        leaves = jax.tree.leaves(diag)
        due.append(int(any(np.any(leaf != 0) for leaf in leaves)))
        assert all(np.all(np.asarray(leaf) >= 0) for leaf in leaves)
        _, state = opt.update(grads, state, params, hessian_diag=diag)
    assert due == [1, 0, 1, 0]
