"""Score matching: the stochastic objectives and their θ-gradients are unbiased.

Unbiasedness checks use `assert_unbiased`: 20000 single-probe estimates from fixed seeds, and
every coordinate within z = 6 standard errors of the exact value.
"""

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax import score_matching as sm
from tests.helpers import assert_unbiased, run_notebook_small

DIM = 4
BATCH = 1.3 * jax.random.normal(jax.random.key(11), (3, DIM))
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "score_matching.ipynb"


def _perturb(params, seed):
    """Add noise to every leaf, so that zero biases and unit weights do not hide terms."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + 0.3 * jax.random.normal(k, jnp.shape(leaf))
             for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)


MODELS = {
    "student_t": (sm.student_t_experts_energy,
                  _perturb(sm.init_student_t_experts(jax.random.key(1), DIM, 6), 21)),
    "gaussian_rbm": (sm.gaussian_rbm_energy,
                     _perturb(sm.init_gaussian_rbm(jax.random.key(2), DIM, 5), 22)),
    "mlp": (sm.mlp_energy, _perturb(sm.init_mlp_energy(jax.random.key(3), DIM, (6, 5)), 23)),
}
# CP on the product of experts and on the MLP, the HVP-based estimators on the MLP. The
# RBM's softplus experts take the same CP path as the MLP's softplus layers.
STOCHASTIC_CASES = [("cp", "student_t"), ("cp", "mlp"), ("hutchinson", "mlp"),
                    ("sliced", "mlp")]


def dense_hessian_objective(energy, params, x):
    """Return ½‖∇ₓE‖² − tr ∇²ₓE from the dense `jax.hessian`."""
    grad = jax.grad(energy, argnums=1)(params, x)
    hessian = jax.hessian(energy, argnums=1)(params, x)
    return 0.5 * jnp.sum(grad**2) - jnp.trace(hessian)


def values_and_gradient(loss_of_points):
    """Return `fn(params, batch, **kwargs)`: per-point objectives, θ-gradient of their mean."""

    def fn(params, batch, **kwargs):
        def mean_and_values(params):
            values = loss_of_points(params, batch, **kwargs)
            return jnp.mean(values), values

        (_, values), grads = jax.value_and_grad(mean_and_values, has_aux=True)(params)
        return values, grads

    return fn


def pointwise_estimator(energy, estimator):
    """Return `fn(params, batch, *, key)`: one objective estimate per point."""
    objective = sm.score_matching_objective(energy, estimator)

    def fn(params, batch, *, key):
        keys = jax.random.split(key, batch.shape[0])
        return jax.vmap(objective, in_axes=(None, 0, 0))(params, batch, keys)

    return fn


@functools.cache
def exact_references():
    """Return model -> (exact values, exact θ-gradient, dense-Hessian values), one compile."""

    @jax.jit
    def compute(all_params):
        out = {}
        for name, (energy, _) in MODELS.items():
            exact = jax.vmap(sm.score_matching_objective(energy, "exact"), (None, 0))
            values, grads = values_and_gradient(exact)(all_params[name], BATCH)
            dense = jax.vmap(dense_hessian_objective, (None, None, 0))(
                energy, all_params[name], BATCH)
            out[name] = (values, grads, dense)
        return out

    return compute({name: params for name, (_, params) in MODELS.items()})


@pytest.mark.parametrize("model", sorted(MODELS))
def test_exact_objective_matches_dense_hessian(model):
    values, _, dense = exact_references()[model]
    np.testing.assert_allclose(values, dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("estimator", "model"), STOCHASTIC_CASES)
def test_objective_and_gradient_unbiased(estimator, model):
    """Per-point objectives and the θ-gradient of their mean, both with the probes fixed."""
    energy, params = MODELS[model]
    exact_values, exact_grads, _ = exact_references()[model]
    estimate = values_and_gradient(pointwise_estimator(energy, estimator))
    assert_unbiased(estimate, (params, BATCH), (exact_values, exact_grads), n=20_000, z=6.0,
                    seed=101)


def test_cp_num_samples_averages_probes():
    """With K probes the estimate's variance over keys shrinks about K-fold."""
    energy, params = MODELS["student_t"]
    keys = jax.random.split(jax.random.key(7), 1000)

    @jax.jit
    def estimates(keys):
        out = []
        for num_samples in (1, 8):
            objective = sm.score_matching_objective(energy, "cp", num_samples=num_samples)
            out.append(jax.vmap(lambda k, f=objective: f(params, BATCH[0], key=k))(keys))
        return out

    single, averaged = estimates(keys)
    ratio = np.var(single) / np.var(averaged)
    assert 5 < ratio < 12, ratio  # 8 up to sampling error of the two variances


def test_cp_finite_far_from_data():
    far = jnp.stack([jnp.full(DIM, 300.0), jnp.full(DIM, -300.0), jnp.zeros(DIM)])

    # The MLP's softplus layers take the same CP path as the RBM's softplus experts.
    @jax.jit
    def compute(key):
        out = {}
        for model in ("student_t", "gaussian_rbm"):
            energy, params = MODELS[model]
            loss = sm.score_matching_loss(energy, "cp")
            out[model] = jax.value_and_grad(loss)(params, far, key=key)
        return out

    for name, (value, grads) in compute(jax.random.key(8)).items():
        assert np.isfinite(value), name
        for leaf in jax.tree_util.tree_leaves(grads):
            assert np.all(np.isfinite(leaf)), name


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="unknown score-matching estimator 'laplace'"):
        sm.score_matching_loss(sm.mlp_energy, "laplace")


def test_missing_key_raises():
    energy, params = MODELS["mlp"]
    with pytest.raises(TypeError, match="requires a PRNG key"):
        sm.score_matching_loss(energy, "cp")(params, BATCH)


def test_exact_rejects_num_samples():
    with pytest.raises(ValueError, match="num_samples must be 1"):
        sm.score_matching_objective(sm.mlp_energy, "exact", num_samples=4)


def test_unknown_probe_raises():
    with pytest.raises(ValueError, match="unknown probe 'uniform'"):
        sm.score_matching_objective(sm.mlp_energy, "sliced", probe="uniform")


def _quadratic_energy(params, x):
    return 0.5 * params * jnp.sum(x**2)


@pytest.mark.parametrize("estimator", sm.ESTIMATORS)
def test_integer_data_raises(estimator):
    objective = sm.score_matching_objective(_quadratic_energy, estimator)
    with pytest.raises(TypeError, match="must be real floating-point; got dtype int"):
        objective(2.0, jnp.array([1, 2]), key=jax.random.key(0))


@pytest.mark.parametrize("estimator", sm.ESTIMATORS)
def test_non_scalar_energy_raises(estimator):
    objective = sm.score_matching_objective(lambda p, x: p * x**2, estimator)
    with pytest.raises(TypeError, match=r"return a scalar .* returned shape \(2,\)"):
        objective(2.0, jnp.array([1.0, 2.0]), key=jax.random.key(0))


@pytest.mark.parametrize("batch", [jnp.zeros((0, 2)), jnp.array(1.0)])
def test_empty_or_scalar_batch_raises(batch):
    loss = sm.score_matching_loss(_quadratic_energy, "cp")
    with pytest.raises(ValueError, match="batch of data points stacked along axis 0"):
        loss(2.0, batch, key=jax.random.key(0))


def test_whitened_patches():
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    data = sm.load_whitened_patches(8, 3000, 300, seed=3)
    assert data.train.shape == (3000, 64)
    assert data.test.shape == (300, 64)
    assert data.train.dtype == np.float32
    covariance = np.cov(data.train.astype(np.float64), rowvar=False)
    eigenvalues = np.linalg.eigvalsh(covariance)
    assert eigenvalues.min() > 0.9, eigenvalues.min()
    assert eigenvalues.max() < 1.01, eigenvalues.max()
    np.testing.assert_allclose(data.whitening, data.whitening.T, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(data.test))


def test_notebook_runs_small(tmp_path, monkeypatch):
    """Execute the notebook's code cells in order, with its small-size switch on."""
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")

    monkeypatch.chdir(tmp_path)
    run_notebook_small(NOTEBOOK, tmp_path)
    figures = sorted(os.listdir(tmp_path))
    assert "objective_vs_time.png" in figures, figures
    assert "filters.png" in figures, figures
