"""Separable-axis CP: the static analysis and the per-example diagonal at parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from cpjax import _axes, _schedule, _separable
from cpjax._trace import trace_program
from tests.helpers import assert_unbiased, reference_diag, sample_variance, separable_sites


def residual_batchnorm(params, x, labels):
    """A residual block with batch norm in training mode, as reported against other tools."""
    h = jnp.tanh(x @ params["w_in"])
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    normed = (h - mean) / jnp.sqrt(var + 1e-5) * params["gamma"] + params["beta"]
    h = h + jnp.tanh(normed @ params["w_mid"])
    logits = h @ params["w_out"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def residual_batchnorm_args(seed=0, batch=16, d_in=6, width=5, classes=3):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {
        "w_in": jax.random.normal(k[0], (d_in, width)) / 2,
        "gamma": jnp.ones(width), "beta": jnp.zeros(width),
        "w_mid": jax.random.normal(k[1], (width, width)) / 2,
        "w_out": jax.random.normal(k[2], (width, classes)) / 2,
    }
    x = jax.random.normal(k[3], (batch, d_in))
    return params, x, jax.random.randint(k[4], (batch,), 0, classes)


def mlp_params(seed=0, d_in=6, width=5, classes=3, scale=1.0):
    k = jax.random.split(jax.random.key(seed), 2)
    return {
        "w1": scale * jax.random.normal(k[0], (d_in, width)) / np.sqrt(d_in),
        "b1": 0.1 * jnp.arange(width, dtype=jnp.float64),
        "w2": scale * jax.random.normal(k[1], (width, classes)) / np.sqrt(width),
        "b2": jnp.zeros(classes),
        "gain": jnp.linspace(0.5, 1.5, width),
    }


def mlp_data(seed=1, batch=12, d_in=6, classes=3):
    k = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(k[0], (batch, d_in)), jax.random.randint(k[1], (batch,), 0, classes)


def mlp_loss(params, x, labels):
    h = jnp.tanh(x @ params["w1"] + params["b1"]) * params["gain"]
    logits = h @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def batch_softmax_loss(params, x, labels):
    """A softmax over the batch axis: examples compete, so the batch is not separable."""
    logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return -jnp.sum(jax.nn.log_softmax(logits, axis=0)[:, 0])


def contrastive_loss(params, x, labels):
    """Similarities between examples: each example's embedding meets every other one."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    similarity = h @ h.T
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(similarity, axis=1)))


def rolled_loss(params, x, labels):
    """Neighbouring examples multiplied together: a shift along the batch axis."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.sum(jnp.tanh(h * jnp.roll(h, 1, axis=0)))


def batchnorm_loss(params, x, labels):
    """Batch statistics before a non-linearity couple every pair of examples."""
    h = x @ params["w1"]
    normed = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    logits = jnp.tanh(normed + params["b1"]) @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def per_example_norm_loss(params, x, labels):
    """Layer norm over features keeps the batch axis separable."""
    h = x @ params["w1"]
    mu = h.mean(-1, keepdims=True)
    normed = (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    return jnp.mean(jnp.tanh(normed + params["b1"]) ** 2)


def test_analysis_mlp_all_parameters():
    params = mlp_params()
    x, labels = mlp_data()
    sites = separable_sites(mlp_loss, (params, x, labels))
    assert sites == {
        "[0]['b1']": (0,), "[0]['b2']": (0,), "[0]['gain']": (0,), "[0]['w1']": (0,),
        "[0]['w2']": (0,),
    }


@pytest.mark.parametrize("loss", [batch_softmax_loss, contrastive_loss, rolled_loss],
                         ids=lambda f: f.__name__)
def test_analysis_rejects_mixed_batch(loss):
    params = mlp_params()
    x, labels = mlp_data()
    assert separable_sites(loss, (params, x, labels)) == {}


def test_analysis_batchnorm_mixes_only_upstream():
    """Batch statistics couple examples at w1, but not at the parameters used after them."""
    params = mlp_params()
    x, labels = mlp_data()
    sites = separable_sites(batchnorm_loss, (params, x, labels))
    assert sites == {"[0]['b1']": (0,), "[0]['b2']": (0,), "[0]['w2']": (0,)}


def test_analysis_layer_norm_keeps_batch():
    params = mlp_params()
    x, labels = mlp_data()
    sites = separable_sites(per_example_norm_loss, (params, x, labels))
    assert sites == {"[0]['b1']": (0,), "[0]['w1']": (0,)}


def test_analysis_shared_weight_not_used():
    params = {"w": jnp.ones((3, 3)) / 3}
    x = jnp.arange(12.0).reshape(4, 3) / 10

    def twice(params, x):
        return jnp.sum(jnp.tanh(jnp.tanh(x @ params["w"]) @ params["w"]))

    assert separable_sites(twice, (params, x)) == {}


def sequence_mix(params, x):
    h = jnp.tanh(x @ params["w"])
    return jnp.sum(jnp.tanh(jnp.sum(h, axis=1)))


def sequence_args():
    return {"w": jnp.eye(3) / 2 + 0.1}, jnp.arange(24.0).reshape(2, 4, 3) / 20


def test_analysis_sequence_axis_per_example(monkeypatch):
    """A weight that also contracts over a mixed sequence axis gets per-example cotangents
    over the batch axis, or keeps the ordinary product above the size limit."""
    args = sequence_args()
    assert separable_sites(sequence_mix, args) == {"[0]['w']": (0,)}
    monkeypatch.setattr(_separable, "PER_EXAMPLE_LIMIT", 2 * 9 - 1)
    assert separable_sites(sequence_mix, args) == {}


def test_sequence_axis_per_example_unbiased():
    args = sequence_args()
    exact = reference_diag(sequence_mix, args)
    assert_unbiased(cpjax.cp_hessian_diag(sequence_mix), args, exact)


def attention_then_mlp(params, x):
    """Tokens mix in attention. The layers after it act on each token alone."""
    q, k = x @ params["wq"], x @ params["wk"]
    scores = jnp.einsum("bsd,btd->bst", q, k)
    mixed = jax.nn.softmax(scores, axis=-1) @ x
    h = jnp.tanh(mixed @ params["wo"])
    return jnp.mean(jnp.tanh(h @ params["w1"]) @ params["w2"] ** 2)


def attention_args():
    keys = jax.random.split(jax.random.key(3), 6)
    params = {name: jax.random.normal(k, shape) / 2 for name, k, shape in zip(
        ("wq", "wk", "wo", "w1", "w2"), keys[:5],
        ((3, 3), (3, 3), (3, 4), (4, 4), (4,)), strict=True)}
    return params, jax.random.normal(keys[5], (2, 5, 3))


def test_analysis_sequence_separable_after_attention():
    params, x = attention_args()
    sites = separable_sites(attention_then_mlp, (params, x))
    # A query row meets the other positions only through its own row of scores, so the
    # query weights separate too. The softmax mixes the keys' positions, so the key weights
    # get per-example cotangents over the batch axis alone.
    assert sites == {"[0]['w1']": (0, 1), "[0]['wk']": (0,), "[0]['wo']": (0, 1),
                     "[0]['wq']": (0, 1)}


def test_attention_then_mlp_unbiased_and_lower_variance():
    args = attention_args()
    exact = reference_diag(attention_then_mlp, args)
    assert_unbiased(cpjax.cp_hessian_diag(attention_then_mlp), args, exact)
    plain = sample_variance(cpjax.cp_hessian_diag(attention_then_mlp, separable=False), args,
                            400, 5)
    separable = sample_variance(cpjax.cp_hessian_diag(attention_then_mlp), args, 400, 5)
    assert separable.sum() < plain.sum()


ALL_LOSSES = [mlp_loss, batch_softmax_loss, contrastive_loss, rolled_loss, batchnorm_loss,
              per_example_norm_loss]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda f: f.__name__)
def test_separable_estimate_unbiased(loss):
    """Mean of 2,000 single-probe estimates within 6 standard errors, seed fixed."""
    params = mlp_params(scale=2.0)
    x, labels = mlp_data()
    exact = reference_diag(loss, (params, x, labels))
    estimator = cpjax.cp_hessian_diag(loss, separable=True)
    assert_unbiased(estimator, (params, x, labels), exact)


def test_residual_batchnorm_case_unbiased():
    params, x, labels = residual_batchnorm_args()
    exact = reference_diag(residual_batchnorm, (params, x, labels))
    estimator = cpjax.cp_hessian_diag(residual_batchnorm)
    assert_unbiased(estimator, (params, x, labels), exact)


def test_separable_cuts_variance():
    params = mlp_params(scale=2.0)
    x, labels = mlp_data(batch=64)
    args = (params, x, labels)
    plain = sample_variance(cpjax.cp_hessian_diag(mlp_loss, separable=False), args, 400, 5)
    separable = sample_variance(cpjax.cp_hessian_diag(mlp_loss), args, 400, 5)
    assert separable.sum() * 5 < plain.sum()


def test_separable_with_several_probes():
    params = mlp_params()
    x, labels = mlp_data()
    exact = reference_diag(mlp_loss, (params, x, labels))
    estimator = cpjax.cp_hessian_diag(mlp_loss, num_samples=4)
    assert_unbiased(estimator, (params, x, labels), exact, n=500)


def test_separable_off_leaves_value_and_grad():
    params = mlp_params()
    x, labels = mlp_data()
    key = jax.random.key(0)
    on = cpjax.cp_value_grad_and_hessian_diag(mlp_loss)(params, x, labels, key=key)
    off = cpjax.cp_value_grad_and_hessian_diag(mlp_loss, separable=False)(
        params, x, labels, key=key)
    assert jnp.allclose(on[0], off[0], rtol=0, atol=1e-14)
    for name in params:
        assert jnp.allclose(on[1][name], off[1][name], rtol=0, atol=1e-14)


def cnn_params(seed=2):
    k = jax.random.split(jax.random.key(seed), 2)
    return {
        "w": jax.random.normal(k[0], (3, 3, 2, 3)) / 3,
        "b": jnp.full(3, 0.1),
        "v": jax.random.normal(k[1], (5 * 5 * 3, 3)) / 6,
    }


def cnn_data(seed=3, batch=6):
    k = jax.random.split(jax.random.key(seed), 2)
    return jax.random.normal(k[0], (batch, 5, 5, 2)), jax.random.randint(k[1], (batch,), 0, 3)


def cnn_loss(params, x, labels):
    conv = jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(conv + params["b"])
    logits = h.reshape(h.shape[0], -1) @ params["v"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def test_analysis_cnn_kernel_per_example():
    """The flatten mixes spatial positions, so the kernel keeps only the batch axis."""
    x, labels = cnn_data()
    sites = separable_sites(cnn_loss, (cnn_params(), x, labels))
    assert sites == {"[0]['b']": (0,), "[0]['v']": (0,), "[0]['w']": (0,)}


def test_cnn_separable_unbiased():
    params = cnn_params()
    x, labels = cnn_data()
    exact = reference_diag(cnn_loss, (params, x, labels))
    assert_unbiased(cpjax.cp_hessian_diag(cnn_loss), (params, x, labels), exact)


def test_cnn_separable_cuts_kernel_variance():
    params = cnn_params()
    x, labels = cnn_data(batch=16)
    args = (params, x, labels)

    def kernel_only(separable):
        estimator = cpjax.cp_hessian_diag(cnn_loss, separable=separable)
        return lambda *a, key: estimator(*a, key=key)["w"]

    plain = sample_variance(kernel_only(False), args, 300, 5)
    separable = sample_variance(kernel_only(True), args, 300, 5)
    assert separable.sum() * 3 < plain.sum()


_CONV_CONFIGS = [
    # (input shape, kernel shape, dimension numbers, strides, padding, lhs and rhs dilation)
    ((4, 6, 6, 2), (3, 3, 2, 3), ("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", None, None),
    ((4, 2, 7, 6), (3, 2, 3, 2), ("NCHW", "OIHW", "NCHW"), (2, 1), "VALID", None, None),
    ((3, 7, 2), (3, 2, 4), ("NWC", "WIO", "NWC"), (2,), ((2, -1),), (1,), (2,)),
    ((3, 5, 5, 2), (2, 3, 2, 3), ("NHWC", "HWIO", "NCHW"), (1, 2), ((1, 0), (2, 1)), (2, 1),
     (1, 2)),
    ((2, 4, 4, 3, 1), (2, 2, 2, 1, 2), ("NHWDC", "HWDIO", "NHWDC"), (1, 1, 1), "SAME", None,
     None),
]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("config", range(len(_CONV_CONFIGS)))
@pytest.mark.parametrize("chunked", [False, True])
def test_conv_patches_match_vjp(config, symmetric, chunked, monkeypatch):
    """The batched product of patches equals the vmapped kernel VJP for each layout."""
    if chunked:  # Run the loop over chunks, one example per chunk.
        monkeypatch.setattr(_separable, "_example_chunk", lambda batch, *sizes: 1)
    x_shape, w_shape, specs, strides, padding, lhs_dil, rhs_dil = _CONV_CONFIGS[config]
    k = jax.random.split(jax.random.key(config), 3)
    x = jax.random.normal(k[0], x_shape)
    w = jax.random.normal(k[1], w_shape)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil,
                                            dimension_numbers=specs)

    program, _ = trace_program(conv, [x, w], jax.tree_util.tree_structure((x, w)))
    (node,) = program.nodes
    out_shape = node.outvars[0].aval.shape
    rows = jax.random.normal(k[2], (4, *out_shape))
    half = 4 if symmetric else 2
    t, u = rows[:half], rows[-half:]
    got = _separable._conv_per_example_diagonal(node, [x, w], rows, symmetric)
    want = _separable._conv_per_example_by_vjp(node, [x, w], t, u)
    assert got.shape == w.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("primitive", ["add", "mul"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_broadcast_per_example_matches_loop(primitive, symmetric):
    """A bias or gain over examples and positions: sums over positions, products per example.

    The rows are summed over positions while T and U are still stacked. The result must
    equal a loop over examples of `mean_k (Σ_n d T)(Σ_n d U)`, where d is the other operand
    of a product and 1 for a sum.
    """
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (3, 4, 5, 2))
    p = jax.random.normal(k[1], (2,))
    program, _ = trace_program(
        (lambda x, p: x + p) if primitive == "add" else (lambda x, p: x * p), [x, p],
        jax.tree_util.tree_structure((x, p)))
    broadcast, node = program.nodes
    assert node.primitive.name == primitive
    rows = jax.random.normal(k[2], (4, *x.shape))
    half = 4 if symmetric else 2
    t, u = rows[:half], rows[-half:]
    d = 1.0 if primitive == "add" else x
    site = _separable._Site(1, node, 1, [broadcast], (0,), (1, 2))
    got = _separable._broadcast_diagonal(node, site, d * rows, half, symmetric)

    want = np.zeros(2)
    for b in range(x.shape[0]):
        d_b = d if primitive == "add" else d[b]
        for t_k, u_k in zip(t, u, strict=True):
            want += np.asarray((d_b * t_k[b]).sum((0, 1)) * (d_b * u_k[b]).sum((0, 1))) / half
    assert got.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(got.reshape(2), want, rtol=1e-5, atol=1e-5)


# (x shape, W shape, dimension numbers, W's operand index, separable output axis)
_DOT_CONFIGS = [
    ((3, 5, 4), (4, 6), (((2,), (0,)), ((), ())), 1, 0),
    ((3, 5, 4), (6, 4), (((1,), (2,)), ((), ())), 0, 1),
    ((2, 3, 5, 4), (2, 4, 6), (((3,), (1,)), ((0,), (0,))), 1, 1),
    ((3, 5, 2, 4), (2, 4, 6), (((2, 3), (0, 1)), ((), ())), 1, 0),
    ((3, 4, 5, 2), (6, 2, 4), (((1, 2), (3, 1)), ((), ())), 0, 1),
]


@pytest.mark.parametrize("config", range(len(_DOT_CONFIGS)))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_dot_per_example_matches_loop(config, symmetric, chunked, monkeypatch):
    """The per-example product equals a loop over examples of the weight's own VJP."""
    if chunked:  # Run the loop over chunks, one example per chunk.
        monkeypatch.setattr(_separable, "_example_chunk", lambda batch, *sizes: 1)
    x_shape, w_shape, dims, w_index, out_axis = _DOT_CONFIGS[config]
    k = jax.random.split(jax.random.key(config), 3)
    x = jax.random.normal(k[0], x_shape)
    w = jax.random.normal(k[1], w_shape)

    def product(x, w):
        operands = (w, x) if w_index == 0 else (x, w)
        return jax.lax.dot_general(*operands, dims)

    program, _ = trace_program(product, [x, w], jax.tree_util.tree_structure((x, w)))
    (node,) = program.nodes
    rows = jax.random.normal(k[2], (4, *node.outvars[0].aval.shape))
    t, u = (rows, rows) if symmetric else (rows[:2], rows[2:])
    site = _separable._Site(1, node, w_index, [], (out_axis,), ())
    vals = [w, x] if w_index == 0 else [x, w]
    got = _separable._dot_per_example_diagonal(node, site, vals, t, u)

    x_axis = next(a for a, target in enumerate(_axes.axis_map(node, 1 - w_index))
                  if target == (0, out_axis))
    want = np.zeros(w_shape)
    for b in range(x_shape[x_axis]):
        x_b = jax.lax.slice_in_dim(x, b, b + 1, axis=x_axis)
        _, vjp = jax.vjp(lambda w, x_b=x_b: product(x_b, w), w)
        for t_k, u_k in zip(t, u, strict=True):
            t_w = vjp(jax.lax.slice_in_dim(t_k, b, b + 1, axis=out_axis))[0]
            u_w = vjp(jax.lax.slice_in_dim(u_k, b, b + 1, axis=out_axis))[0]
            want += np.asarray(t_w * u_w) / len(t)
    assert got.shape == w.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("case", ["cnn", "attention"])
def test_chunked_per_example_same_estimate(case, monkeypatch):
    """Chunks of examples give the same estimate for the same key, under vmap and grad."""
    if case == "cnn":
        x, labels = cnn_data()
        loss, params, data = cnn_loss, cnn_params(), (x, labels)
    else:
        params, x = attention_args()
        loss, data = attention_then_mlp, (x,)
    keys = jax.random.split(jax.random.key(7), 3)

    def estimates():
        estimator = cpjax.cp_hessian_diag(loss, num_samples=2)
        by_key = jax.vmap(lambda k: estimator(params, *data, key=k))(keys)
        total = jax.grad(lambda x: sum(jnp.sum(d) for d in jax.tree_util.tree_leaves(
            estimator(params, x, *data[1:], key=keys[0]))))(data[0])
        return by_key, total

    whole = estimates()
    monkeypatch.setattr(_separable, "_example_chunk", lambda batch, *sizes: 1)
    chunked = estimates()
    for got, want in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_example_chunk_sizes():
    """Small products stay whole. Large ones are chunked by the larger of cotangents and rows."""
    limit = _separable.CHUNK_ABOVE
    assert _separable._example_chunk(8, limit // 8, 1) == 8
    assert _separable._example_chunk(8, 1, limit // 8) == 8
    assert _separable._example_chunk(64, limit, limit) == 1
    assert _separable._example_chunk(64, 1, _separable.CHUNK_ENTRIES // 6) == 4
    assert _separable._example_chunk(64, _separable.CHUNK_ENTRIES // 6, 1) == 4
    assert _separable._example_chunk(7, _separable.CHUNK_ENTRIES // 3, 1) == 1
    assert _separable._example_chunk(4, 4 * limit, 1) == 1


def test_chunked_per_example_bfloat16(monkeypatch):
    """Chunks of bfloat16 cotangents are summed in float32 and returned in bfloat16."""
    monkeypatch.setattr(_separable, "_example_chunk", lambda batch, *sizes: 1)
    x_shape, w_shape, dims, w_index, out_axis = _DOT_CONFIGS[0]
    k = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(k[0], (256, *x_shape[1:]))
    w = jax.random.normal(k[1], w_shape)

    def product(x, w):
        return jax.lax.dot_general(x, w, dims)

    program, _ = trace_program(product, [x, w], jax.tree_util.tree_structure((x, w)))
    (node,) = program.nodes
    rows = jnp.abs(jax.random.normal(k[2], (2, *node.outvars[0].aval.shape)))
    site = _separable._Site(1, node, w_index, [], (out_axis,), ())
    want = _separable._dot_per_example_diagonal(node, site, [x, w], rows[:1], rows[1:])

    low = jnp.bfloat16
    program, _ = trace_program(product, [x.astype(low), w.astype(low)],
                               jax.tree_util.tree_structure((x, w)))
    (node,) = program.nodes
    rows = rows.astype(low)
    got = _separable._dot_per_example_diagonal(
        node, site, [x.astype(low), w.astype(low)], rows[:1], rows[1:])
    assert got.dtype == low
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2)


@pytest.mark.parametrize("config", range(len(_CONV_CONFIGS)))
def test_conv_kernel_rows_match_vjp(config):
    """Kernel rows from input patches equal the vmapped VJP for each layout."""
    x_shape, w_shape, specs, strides, padding, lhs_dil, rhs_dil = _CONV_CONFIGS[config]
    k = jax.random.split(jax.random.key(config), 3)
    x = jax.random.normal(k[0], x_shape)
    w = jax.random.normal(k[1], w_shape)

    def conv(w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil,
                                            dimension_numbers=specs)

    program, _ = trace_program(lambda x, w: conv(w), [x, w],
                               jax.tree_util.tree_structure((x, w)))
    (node,) = program.nodes
    rows = jax.random.normal(k[2], (3, *node.outvars[0].aval.shape))
    got = _separable.conv_kernel_rows(node, [x, w], rows)
    _, vjp = jax.vjp(conv, w)
    want = jax.vmap(lambda r: vjp(r)[0])(rows)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("first", [0.0, -2.5, np.inf, -np.inf])
def test_after_leaves_values_and_gradients(first):
    """The dependence `_after` adds is zero, with a zero gradient, unless y₀ is NaN."""
    x = jnp.array([[-1.5, 0.0], [2.0, 3.0]])
    y = jnp.array([first, np.nan])  # only the first entry is read
    np.testing.assert_array_equal(_schedule.after(x, y), x)
    np.testing.assert_array_equal(_schedule.after(x.at[1, 1].set(np.inf), y)[1, 1], np.inf)
    grad_x, grad_y = jax.grad(lambda x, y: _schedule.after(x, y).sum(), (0, 1))(x, y)
    np.testing.assert_array_equal(grad_x, jnp.ones_like(x))
    np.testing.assert_array_equal(grad_y, jnp.zeros_like(y))
    assert jnp.isnan(_schedule.after(x, jnp.array([np.nan]))).all()


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int32, jnp.bfloat16, jnp.complex64])
def test_after_keeps_dtype(dtype):
    """`after` returns `x` unchanged, in its dtype, whatever the dtypes of `x` and `y`."""
    x = jnp.array([[1, 0], [0, 1]], dtype)
    for y in (jnp.array(-2.0), jnp.array([[3]], jnp.int8), jnp.array([1 - 2j])):
        got = _schedule.after(x, y)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got.astype(jnp.complex64), x.astype(jnp.complex64))
