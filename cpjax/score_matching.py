"""Score matching with the Laplacian term from exact HVPs, Curvature Propagation or Hutchinson.

Hyvärinen's score-matching objective (Hyvärinen, "Estimation of Non-Normalized Statistical
Models by Score Matching", JMLR 2005) for a model density `p(x) ∝ exp(-E_θ(x))` is, per
data point and up to a constant that does not depend on θ,

    J(θ; x) = Σ_j [½ (∂_j E_θ(x))² − ∂²_jj E_θ(x)] = ½ ‖∇ₓE‖² − ΔₓE.

The gradient term costs one backward pass. The Laplacian `ΔₓE`, the trace of the input
Hessian, costs one Hessian-vector product (HVP) per input dimension when computed exactly.
Martens, Sutskever and Swersky ("Estimating the Hessian by Back-propagating Curvature",
ICML 2012) proposed estimating it by Curvature Propagation (CP) at the cost of about two
gradients. This module offers four estimators of `J`, named by `ESTIMATORS`:

* "exact": `ΔₓE` from d HVPs, one per input dimension (forward-over-reverse).
* "cp": `ΔₓE` as the sum of `cpjax.cp_value_grad_and_hessian_diag`'s diagonal, which comes
  from the same sweep as `∇ₓE`.
* "hutchinson": `ΔₓE` as the mean of `vᵀ (∇²ₓE) v` over probes `v`, one HVP each.
* "sliced": sliced score matching (Song, Garg, Shi and Ermon, "Sliced Score Matching",
  UAI 2019), `½ (vᵀ∇ₓE)² − vᵀ (∇²ₓE) v` averaged over probes, which projects the
  gradient term too. Song et al.'s variance-reduced form, which keeps `½ ‖∇ₓE‖²` exact,
  is "hutchinson" here.

The stochastic estimators draw their probes from a PRNG key that does not depend on θ,
so `jax.grad` with respect to θ differentiates the estimate with the probes held fixed.
The estimate of `J` and its θ-gradient are then both unbiased.

The module also contains three energies whose densities are normalizable for every parameter
value (each has a Gaussian term that dominates at large ‖x‖) and a loader for whitened
natural-image patches from scikit-learn's sample photographs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import cpjax

ESTIMATORS = ("exact", "cp", "hutchinson", "sliced")
PROBES = ("rademacher", "gaussian")


def _check_options(estimator, num_samples, probe) -> None:
    if estimator not in ESTIMATORS:
        expected = ", ".join(map(repr, ESTIMATORS))
        raise ValueError(f"unknown score-matching estimator {estimator!r}; expected one of "
                         f"{expected}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be an integer, got {num_samples!r}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
    if estimator == "exact" and num_samples != 1:
        raise ValueError(f"the exact estimator draws no probes, so num_samples must be 1, got "
                         f"{num_samples}.")
    if probe not in PROBES:
        expected = ", ".join(map(repr, PROBES))
        raise ValueError(f"unknown probe {probe!r}; expected one of {expected}.")


def _check_data(x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"score matching differentiates the energy with respect to the data, which must "
            f"be real floating-point; got dtype {x.dtype}. Cast it: x.astype(jnp.float32).")


def _scalar_energy(energy):
    """Return `energy`, checked at trace time to give one scalar per data point."""

    def checked(params, x):
        out = energy(params, x)
        if jnp.shape(out) != ():
            raise TypeError(
                f"score matching requires energy(params, x) to return a scalar for one data "
                f"point x of shape {jnp.shape(x)}, but it returned shape {jnp.shape(out)}. "
                "For a batch, use score_matching_loss, which maps the energy over axis 0.")
        return out

    return checked


def _check_key(estimator, key) -> None:
    if estimator != "exact" and key is None:
        raise TypeError(f"the {estimator!r} score-matching estimator draws random probes and "
                        "requires a PRNG key: pass key=jax.random.key(seed), and a fresh key "
                        "(jax.random.split) for every training step.")


def _draw_probes(key, shape, dtype, probe):
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    return jax.random.normal(key, shape, dtype=dtype)


def _gradient_and_hvp(energy, params, x):
    """Return `∇ₓE` and a function `v ↦ (∇²ₓE) v`, sharing one linearization."""
    return jax.linearize(lambda y: jax.grad(energy, argnums=1)(params, y), x)


def _exact_objective(energy):
    def objective(params, x, key):
        del key
        grad, hvp = _gradient_and_hvp(energy, params, x)
        size = x.size
        basis = jnp.eye(size, dtype=x.dtype).reshape(size, *x.shape)
        columns = jax.vmap(hvp)(basis).reshape(size, size)
        return 0.5 * jnp.sum(grad**2) - jnp.trace(columns)

    return objective


def _cp_objective(energy, num_samples, probe):
    value_grad_and_diag = cpjax.cp_value_grad_and_hessian_diag(
        energy, argnums=1, num_samples=num_samples, probe=probe)

    def objective(params, x, key):
        _, grad, diag = value_grad_and_diag(params, x, key=key)
        return 0.5 * jnp.sum(grad**2) - jnp.sum(diag)

    return objective


def _hutchinson_objective(energy, num_samples, probe, sliced):
    def objective(params, x, key):
        grad, hvp = _gradient_and_hvp(energy, params, x)
        probes = _draw_probes(key, (num_samples, *x.shape), x.dtype, probe)
        flat_probes = probes.reshape(num_samples, -1)
        curvatures = jnp.sum(flat_probes * jax.vmap(hvp)(probes).reshape(num_samples, -1),
                             axis=1)
        if sliced:
            projections = flat_probes @ grad.reshape(-1)
            return jnp.mean(0.5 * projections**2 - curvatures)
        return 0.5 * jnp.sum(grad**2) - jnp.mean(curvatures)

    return objective


def score_matching_objective(energy, estimator="cp", *, num_samples=1, probe="rademacher"):
    """Return a function estimating one data point's score-matching objective.

    The objective is Hyvärinen's `J(θ; x) = ½ ‖∇ₓE_θ(x)‖² − ΔₓE_θ(x)` for the density
    `p(x) ∝ exp(-E_θ(x))`: the score is `-∇ₓE`, so Hyvärinen's `Σ_j ∂_j ψ_j + ½ ψ_j²` with
    `ψ = ∇ₓ log p` becomes this expression. Every estimator is unbiased for `J`, and so is
    its gradient with respect to `params`, because the probes depend only on the key.

    Departures from the sources:

    * Hyvärinen (2005) writes `J` for the log-density `log p = -E`. Here it is written for
      the energy, and the additive constant `½ E‖∇ₓ log p_data‖²` is left out, as there.
    * Martens et al. (2012) estimate each `∂²_jj E` by CP. Only their sum enters `J`, so the
      "cp" estimator sums the diagonal of `cpjax.cp_value_grad_and_hessian_diag`, which
      also returns `∇ₓE` from the same sweep. That diagonal carries this library's
      variance-lowering departures from the paper (see `cpjax.cp_hessian_diag`).
    * Song et al. (2019) differentiate `vᵀ∇ₓE` by reverse mode for the curvature term.
      Here it is a forward-over-reverse HVP, which gives the same number. Rademacher
      probes are the default for every stochastic estimator.

    Args:
      energy: `energy(params, x) -> scalar`, the energy `E_θ(x)` of one data point. `x` may
        have any shape. `params` may be any pytree.
      estimator: one of `ESTIMATORS`: "exact", "cp", "hutchinson" or "sliced".
      num_samples: number of probes averaged per data point by the stochastic estimators.
        CP carries them in one sweep, while "hutchinson" and "sliced" do one HVP each. Must
        be 1 for "exact".
      probe: "rademacher" or "gaussian", the distribution of the probe entries.

    Returns:
      `objective(params, x, key=None) -> scalar`. `key` is a PRNG key, required for every
      estimator except "exact", which ignores it.

    Raises:
      ValueError: for an unknown estimator or probe, or `num_samples` below 1 (or other than
        1 for "exact").
      TypeError: at call time, when a stochastic estimator gets no key.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from cpjax import score_matching as sm
      >>> energy = lambda params, x: 0.5 * params * jnp.sum(x ** 2)
      >>> x = jnp.array([1.0, 2.0])
      >>> float(sm.score_matching_objective(energy, "exact")(2.0, x))
      6.0
      >>> float(sm.score_matching_objective(energy, "cp")(2.0, x, key=jax.random.key(0)))
      6.0
    """
    _check_options(estimator, num_samples, probe)
    energy = _scalar_energy(energy)
    if estimator == "exact":
        objective = _exact_objective(energy)
    elif estimator == "cp":
        objective = _cp_objective(energy, num_samples, probe)
    else:
        objective = _hutchinson_objective(energy, num_samples, probe,
                                          sliced=estimator == "sliced")

    def checked_objective(params, x, key=None):
        _check_key(estimator, key)
        x = jnp.asarray(x)
        _check_data(x)
        return objective(params, x, key)

    return checked_objective


def score_matching_loss(energy, estimator="cp", *, num_samples=1, probe="rademacher"):
    """Return a function estimating the mean score-matching objective over a batch.

    The per-point objective of `score_matching_objective` is mapped over the leading axis
    of the batch with `jax.vmap`. Each data point gets its own probes from
    `jax.random.split(key, batch_size)`, so the estimates of different points are
    independent and the batch mean is unbiased for the mean of the exact objectives.

    Args:
      energy: `energy(params, x) -> scalar` for one data point `x`.
      estimator: one of `ESTIMATORS`.
      num_samples: probes per data point (see `score_matching_objective`).
      probe: "rademacher" or "gaussian".

    Returns:
      `loss(params, batch, key=None) -> scalar`, where `batch` stacks data points along
      axis 0. `key` is required unless the estimator is "exact".

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from cpjax import score_matching as sm
      >>> energy = lambda params, x: 0.5 * params * jnp.sum(x ** 2)
      >>> batch = jnp.array([[1.0, 2.0], [0.0, 1.0]])
      >>> loss = sm.score_matching_loss(energy, "hutchinson")
      >>> float(loss(2.0, batch, key=jax.random.key(0)))
      2.0
      >>> jax.grad(loss)(2.0, batch, key=jax.random.key(1)).shape
      ()
    """
    objective = score_matching_objective(energy, estimator, num_samples=num_samples,
                                         probe=probe)

    def loss(params, batch, key=None):
        batch = jnp.asarray(batch)
        if batch.ndim == 0 or batch.shape[0] == 0:
            raise ValueError(
                f"score_matching_loss requires a batch of data points stacked along axis 0, "
                f"got shape {batch.shape}. For one point x, pass x[None].")
        if estimator == "exact":
            values = jax.vmap(objective, in_axes=(None, 0))(params, batch)
        else:
            _check_key(estimator, key)
            keys = jax.random.split(key, batch.shape[0])
            values = jax.vmap(objective, in_axes=(None, 0, 0))(params, batch, keys)
        return jnp.mean(values)

    return loss


# Energies. Each takes `(params, x)` for one flat data point `x` of shape (d,).


def _lecun_normal(key, fan_in, fan_out):
    return jax.random.normal(key, (fan_in, fan_out)) / math.sqrt(fan_in)


def init_student_t_experts(key, dim, num_experts):
    """Draw parameters for `student_t_experts_energy`.

    Filters are columns of `filters` with entries from N(0, 1/dim). Expert weights start at
    `exp(0) = 1` and the Gaussian precision at `exp(0) = 1`.

    Args:
      key: PRNG key.
      dim: input dimension d.
      num_experts: number of experts K (K > d gives an overcomplete model).

    Returns:
      A dict with "filters" (d, K), "log_weights" (K,) and "log_precision" ().

    Example:
      >>> import jax
      >>> from cpjax import score_matching as sm
      >>> params = sm.init_student_t_experts(jax.random.key(0), 64, 128)
      >>> params["filters"].shape
      (64, 128)
    """
    return {
        "filters": _lecun_normal(key, dim, num_experts),
        "log_weights": jnp.zeros(num_experts),
        "log_precision": jnp.zeros(()),
    }


@jax.jit
def _log_student_t(responses):
    # One jitted elementwise call, which CP keeps whole: each expert injects its exact second
    # derivative once, not once at the square and again at log1p with independent probes.
    # In benchmarks/score_matching.py at initialization, it lowered the standard deviation of
    # one CP estimate of the objective from 16.1 to 11.7 (d = 64) and 30.6 to 21.7 (d = 256).
    return jnp.log1p(0.5 * responses**2)


def student_t_experts_energy(params, x):
    """Compute the energy of a product of Student-t experts with a Gaussian term.

    `E(x) = Σ_k α_k log(1 + ½ (w_kᵀx)²) + ½ λ ‖x‖²`, with `α_k = exp(log_weights[k])`,
    `w_k` the k-th column of `filters` and `λ = exp(log_precision)`. Without the Gaussian
    term this is the product of Student-t distributions of Welling, Osindero and Hinton
    ("Learning Sparse Topographic Representations with Products of Student-t
    Distributions", NIPS 2002). The term makes the density normalizable for every
    parameter value, because the experts grow only logarithmically in ‖x‖.

    Args:
      params: dict from `init_student_t_experts`.
      x: one data point of shape (d,).

    Returns:
      The scalar energy.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from cpjax import score_matching as sm
      >>> params = sm.init_student_t_experts(jax.random.key(0), 4, 8)
      >>> float(sm.student_t_experts_energy(params, jnp.zeros(4)))
      0.0
    """
    responses = x @ params["filters"]
    experts = jnp.exp(params["log_weights"]) * _log_student_t(responses)
    return jnp.sum(experts) + 0.5 * jnp.exp(params["log_precision"]) * jnp.sum(x**2)


def init_gaussian_rbm(key, dim, num_hidden):
    """Draw parameters for `gaussian_rbm_energy`.

    Filters have entries from N(0, 1/dim). Both biases start at zero and the visible
    precision at `exp(0) = 1`.

    Args:
      key: PRNG key.
      dim: number of visible units d.
      num_hidden: number of binary hidden units K.

    Returns:
      A dict with "filters" (d, K), "hidden_bias" (K,), "visible_bias" (d,) and
      "log_precision" ().

    Example:
      >>> import jax
      >>> from cpjax import score_matching as sm
      >>> sm.init_gaussian_rbm(jax.random.key(0), 64, 32)["hidden_bias"].shape
      (32,)
    """
    return {
        "filters": _lecun_normal(key, dim, num_hidden),
        "hidden_bias": jnp.zeros(num_hidden),
        "visible_bias": jnp.zeros(dim),
        "log_precision": jnp.zeros(()),
    }


def gaussian_rbm_energy(params, x):
    """Compute the free energy of a Gaussian-Bernoulli RBM, a product of experts.

    Summing out the binary hidden units gives
    `E(x) = ½ λ ‖x − b‖² − Σ_k softplus(√λ w_kᵀx + c_k)`, with `λ = exp(log_precision)`,
    `b` the visible bias, `c` the hidden bias and `w_k` the k-th column of `filters`. This
    is the RBM with one shared visible variance `1/λ`, and each softplus term is one expert.
    The softplus terms grow only linearly, so the Gaussian term keeps the density
    normalizable.

    Args:
      params: dict from `init_gaussian_rbm`.
      x: one data point of shape (d,).

    Returns:
      The scalar free energy.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from cpjax import score_matching as sm
      >>> params = sm.init_gaussian_rbm(jax.random.key(0), 4, 3)
      >>> round(float(sm.gaussian_rbm_energy(params, jnp.zeros(4))), 4)  # -3 log 2
      -2.0794
    """
    precision = jnp.exp(params["log_precision"])
    pre_activations = jnp.sqrt(precision) * (x @ params["filters"]) + params["hidden_bias"]
    quadratic = 0.5 * precision * jnp.sum((x - params["visible_bias"]) ** 2)
    return quadratic - jnp.sum(jax.nn.softplus(pre_activations))


def init_mlp_energy(key, dim, hidden_sizes=(64, 64)):
    """Draw parameters for `mlp_energy`.

    Weights are LeCun-normal (N(0, 1/fan_in)), biases zero, and the Gaussian precision
    starts at `exp(0) = 1`.

    Args:
      key: PRNG key.
      dim: input dimension d.
      hidden_sizes: widths of the softplus hidden layers, first layer first.

    Returns:
      A dict with "weights" and "biases" (lists, one entry per layer, the last layer
      mapping to one output) and "log_precision" ().

    Example:
      >>> import jax
      >>> from cpjax import score_matching as sm
      >>> params = sm.init_mlp_energy(jax.random.key(0), 64, (32, 16))
      >>> [w.shape for w in params["weights"]]
      [(64, 32), (32, 16), (16, 1)]
    """
    sizes = (dim, *hidden_sizes, 1)
    keys = jax.random.split(key, len(sizes) - 1)
    weights = [_lecun_normal(k, fan_in, fan_out)
               for k, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:], strict=True)]
    return {
        "weights": weights,
        "biases": [jnp.zeros(fan_out) for fan_out in sizes[1:]],
        "log_precision": jnp.zeros(()),
    }


def mlp_energy(params, x):
    """Compute the energy of a softplus MLP plus a Gaussian term.

    `E(x) = f(x) + ½ λ ‖x‖²`, where `f` is an MLP with softplus hidden layers and a linear
    scalar output, and `λ = exp(log_precision)`. The network grows at most linearly in ‖x‖,
    so the density is normalizable for every parameter value. Softplus rather than ReLU:
    a piecewise-linear network has zero second derivatives almost everywhere, which makes
    the Laplacian term of score matching vanish.

    Args:
      params: dict from `init_mlp_energy`.
      x: one data point of shape (d,).

    Returns:
      The scalar energy.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from cpjax import score_matching as sm
      >>> params = sm.init_mlp_energy(jax.random.key(0), 4, (8,))
      >>> sm.mlp_energy(params, jnp.ones(4)).shape
      ()
    """
    hidden = x
    layers = list(zip(params["weights"], params["biases"], strict=True))
    for weight, bias in layers[:-1]:
        hidden = jax.nn.softplus(hidden @ weight + bias)
    weight, bias = layers[-1]
    network = jnp.sum(hidden @ weight + bias)
    return network + 0.5 * jnp.exp(params["log_precision"]) * jnp.sum(x**2)


def first_layer_filters(params):
    """Return the first-layer filters of any energy above, one filter per column.

    Example:
      >>> import jax
      >>> from cpjax import score_matching as sm
      >>> sm.first_layer_filters(sm.init_mlp_energy(jax.random.key(0), 16, (8,))).shape
      (16, 8)
    """
    if "filters" in params:
        return params["filters"]
    return params["weights"][0]


# Data: whitened patches of natural images.


@dataclasses.dataclass(frozen=True)
class WhitenedPatches:
    """Training and held-out image patches after ZCA whitening, flattened to rows.

    Attributes:
      train: (num_train, patch_size²) whitened training patches.
      test: (num_test, patch_size²) whitened held-out patches.
      mean: (patch_size²,) mean training patch, subtracted before whitening.
      whitening: (patch_size², patch_size²) symmetric ZCA matrix, applied as
        `(patch - mean) @ whitening`.
      patch_size: side of the square patches in pixels.
    """

    train: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    whitening: np.ndarray
    patch_size: int


def _grayscale_images():
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError("load_whitened_patches requires scikit-learn and Pillow; install "
                          "them with `pip install scikit-learn pillow`.") from error
    images = load_sample_images().images  # uint8 RGB photographs shipped with scikit-learn
    luma = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights
    return [image.astype(np.float64) @ luma / 255.0 for image in images]


def _cut_patches(image, patch_size, count, min_contrast, rng):
    """Cut `count` patches at uniform positions, keeping those with enough contrast."""
    accepted, total = [], 0
    offsets = np.arange(patch_size)
    for _ in range(100):
        rows = rng.integers(0, image.shape[0] - patch_size + 1, 2 * count + 16)
        cols = rng.integers(0, image.shape[1] - patch_size + 1, 2 * count + 16)
        index = (rows[:, None, None] + offsets[None, :, None],
                 cols[:, None, None] + offsets[None, None, :])
        patches = image[index].reshape(rows.size, patch_size * patch_size)
        patches = patches[patches.std(axis=1) >= min_contrast]
        accepted.append(patches)
        total += patches.shape[0]
        if total >= count:
            return np.concatenate(accepted)[:count]
    raise ValueError(f"fewer than {count} patches of {patch_size}x{patch_size} pixels have a "
                     f"pixel standard deviation of at least min_contrast={min_contrast}; "
                     "lower min_contrast.")


def load_whitened_patches(patch_size, num_train, num_test, *, seed=0, test_fraction=0.25,
                          min_contrast=0.02, noise=1 / 255, regularization=1e-4,
                          dtype=np.float32):
    """Cut grayscale patches from scikit-learn's sample photographs and ZCA-whiten them.

    Both photographs (`sklearn.datasets.load_sample_images`: "china.jpg" and "flower.jpg",
    427 × 640 pixels) are converted to gray levels in [0, 1]. The bottom `test_fraction`
    of each photograph's rows is kept for held-out patches and the rest for training
    patches, so no held-out patch overlaps a training patch. Patch positions are uniform
    within each region and split evenly between the photographs.

    Two steps keep score matching well posed on these 8-bit JPEG photographs. Patches whose
    pixel standard deviation is below `min_contrast` are dropped: about a quarter of the
    8 × 8 patches are flatter than one gray level (sky, blurred background). Without the
    filter, a product of Student-t experts trained on 8 × 8 patches sharpened around that
    dense cluster: its held-out objective had a median of about +2500 but a mean of about
    −1000, set by the flat patches. Gaussian
    noise of standard deviation `noise` is then added to every pixel, which removes the
    8-bit quantization (its lattice has no density).

    The whitening is fitted on the training patches: with the covariance `C = V diag(s) Vᵀ`,
    the ZCA matrix is `V diag(1/√(s + ε)) Vᵀ` with `ε = regularization · mean(s)`, so the
    whitened training covariance is close to the identity and the filters stay local.

    Args:
      patch_size: side of the square patches in pixels (8 gives d = 64, 16 gives d = 256).
      num_train: number of training patches.
      num_test: number of held-out patches.
      seed: seed of the patch positions and the added noise.
      test_fraction: fraction of each photograph's rows, from the bottom, reserved for
        held-out patches.
      min_contrast: smallest pixel standard deviation of a kept patch, in gray levels of
        [0, 1] (the default 0.02 is about 5 of 255 levels).
      noise: standard deviation of the Gaussian noise added to each pixel, in gray levels
        of [0, 1] (the default is one of 255 levels).
      regularization: ε relative to the mean eigenvalue of the training covariance.
      dtype: NumPy dtype of the returned patches.

    Returns:
      A `WhitenedPatches`.

    Raises:
      ImportError: when scikit-learn or Pillow (needed to decode the JPEG files) is missing.
      ValueError: when a region is too small for the patch size, or has too few patches
        with `min_contrast`.

    Example:
      >>> from cpjax import score_matching as sm
      >>> data = sm.load_whitened_patches(8, 1000, 200)  # doctest: +SKIP
      >>> data.train.shape, data.test.shape  # doctest: +SKIP
      ((1000, 64), (200, 64))
    """
    images = _grayscale_images()
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    train_counts = np.array_split(np.arange(num_train), len(images))
    test_counts = np.array_split(np.arange(num_test), len(images))
    for image, train_index, test_index in zip(images, train_counts, test_counts, strict=True):
        split_row = int(round(image.shape[0] * (1 - test_fraction)))
        top, bottom = image[:split_row], image[split_row:]
        if min(top.shape[0], bottom.shape[0]) < patch_size:
            raise ValueError(f"test_fraction={test_fraction} leaves a region of fewer than "
                             f"patch_size={patch_size} rows; choose a fraction nearer 0.5.")
        train_parts.append(_cut_patches(top, patch_size, train_index.size, min_contrast, rng))
        test_parts.append(_cut_patches(bottom, patch_size, test_index.size, min_contrast, rng))
    train = np.concatenate(train_parts)
    test = np.concatenate(test_parts)
    train = train + noise * rng.standard_normal(train.shape)
    test = test + noise * rng.standard_normal(test.shape)
    train = train[rng.permutation(train.shape[0])]

    mean = train.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(train - mean, rowvar=False))
    epsilon = regularization * eigenvalues.mean()
    whitening = (eigenvectors / np.sqrt(np.maximum(eigenvalues, 0) + epsilon)) @ eigenvectors.T
    return WhitenedPatches(
        train=((train - mean) @ whitening).astype(dtype),
        test=((test - mean) @ whitening).astype(dtype),
        mean=mean.astype(dtype),
        whitening=whitening.astype(dtype),
        patch_size=patch_size,
    )
