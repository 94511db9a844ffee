"""Helpers shared by the benchmark scripts: machine and source descriptions, and models.

The models (a tanh MLP, a small CNN and a pre-layer-norm transformer) are plain functions of
a parameter dictionary and the data, which every estimator can differentiate.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax


def finite_or_none(tree):
    """Replace inf and nan by None, so that the JSON record stays standard JSON."""
    if isinstance(tree, dict):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def load_average() -> float:
    """Return the 1-minute load average (NaN where the OS has none), a sign of competing work."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def describe_machine(load: float | None = None, extra: str = "") -> str:
    """Describe JAX, the device and the CPU, with the load average (measured now if None)."""
    device = jax.devices()[0]
    load = load_average() if load is None else load
    versions = f"jax {jax.__version__}" + (f", {extra}" if extra else "")
    tunables = os.environ.get("GLIBC_TUNABLES")
    allocator = f", GLIBC_TUNABLES={tunables}" if tunables else ""
    return (f"{versions}, {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
            f"{platform.processor() or platform.machine()}, 1-minute load average {load:.2f}"
            f"{allocator}")


def describe_source() -> str:
    """Return the git commit of the checkout, marked dirty when cpjax/ has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "cpjax"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git not available)"
    return f"{commit} with uncommitted changes in cpjax/" if changes else commit


def init_mlp_params(key, sizes):
    """Draw MLP weights from N(0, 1/fan_in) (LeCun normal) and set the biases to zero."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for layer, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{layer + 1}"] = jax.random.normal(k, (fan_in, fan_out)) / math.sqrt(fan_in)
        params[f"b{layer + 1}"] = jnp.zeros(fan_out)
    return params


def mlp_logits(params, inputs):
    """Apply the MLP of `init_mlp_params`: tanh hidden layers, then a linear output layer."""
    hidden = inputs
    num_layers = len(params) // 2
    for layer in range(1, num_layers):
        hidden = jnp.tanh(hidden @ params[f"w{layer}"] + params[f"b{layer}"])
    return hidden @ params[f"w{num_layers}"] + params[f"b{num_layers}"]


def cross_entropy(logits, labels):
    """Return the mean softmax cross-entropy of integer `labels` under `logits`."""
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


def lecun_normal(key, shape, fan_in):
    return jax.random.normal(key, shape) / math.sqrt(fan_in)


def average_pool(x):
    """Average non-overlapping 2x2 windows of an NHWC array (height and width must be even)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


CNN_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def init_cnn_params(key, in_channels, channels, flat_size, hidden=None, classes=10):
    """Draw the weights of `cnn_logits` (LeCun normal, zero biases).

    `channels` are the two convolutions' output channels, `flat_size` the length of the
    flattened features after the second pooling, and `hidden` the width of an optional tanh
    dense layer before the output layer.
    """
    c1, c2 = channels
    keys = jax.random.split(key, 3 if hidden is None else 4)
    params = {"conv1": {"w": lecun_normal(keys[0], (3, 3, in_channels, c1), 9 * in_channels),
                        "b": jnp.zeros(c1)},
              "conv2": {"w": lecun_normal(keys[1], (3, 3, c1, c2), 9 * c1), "b": jnp.zeros(c2)}}
    if hidden is not None:
        params["hidden"] = {"w": lecun_normal(keys[2], (flat_size, hidden), flat_size),
                            "b": jnp.zeros(hidden)}
        flat_size = hidden
    params["dense"] = {"w": lecun_normal(keys[-1], (flat_size, classes), flat_size),
                       "b": jnp.zeros(classes)}
    return params


def cnn_logits(params, images):
    """Apply two 3x3 convolutions, each followed by tanh and 2x2 average pooling, then dense.

    `images` are NHWC. With a "hidden" entry in `params`, a tanh dense layer comes before
    the output layer.
    """
    x = images
    for name in ("conv1", "conv2"):
        x = lax.conv_general_dilated(x, params[name]["w"], (1, 1), "SAME",
                                     dimension_numbers=CNN_DIMENSION_NUMBERS)
        x = average_pool(jnp.tanh(x + params[name]["b"]))
    x = x.reshape(x.shape[0], -1)
    if "hidden" in params:
        x = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return x @ params["dense"]["w"] + params["dense"]["b"]


def layer_norm(x, gain):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(variance + 1e-5) * gain


def init_transformer_params(key, vocab_size, context, width, blocks):
    """Draw the weights of `transformer_logits`: embeddings, `blocks` blocks, unembedding."""
    keys = iter(jax.random.split(key, 3 + 6 * blocks))
    params = {"embed": 0.1 * jax.random.normal(next(keys), (vocab_size, width)),
              "position": 0.1 * jax.random.normal(next(keys), (context, width)),
              "final_gain": jnp.ones(width),
              "unembed": lecun_normal(next(keys), (width, vocab_size), width)}
    for i in range(blocks):
        params[f"block{i}"] = {
            "gain1": jnp.ones(width), "gain2": jnp.ones(width),
            **{name: lecun_normal(next(keys), (width, width), width)
               for name in ("query", "key", "value", "out")},
            "mlp_in": lecun_normal(next(keys), (width, 4 * width), width),
            "mlp_bias": jnp.zeros(4 * width),
            "mlp_out": lecun_normal(next(keys), (4 * width, width), 4 * width)}
    return params


def causal_attention(block, x, heads):
    """Apply multi-head causal softmax attention with the block's query, key, value, out."""
    batch, context, width = x.shape
    head_width = width // heads

    def split_heads(name):
        return (x @ block[name]).reshape(batch, context, heads, head_width)

    query, key, value = split_heads("query"), split_heads("key"), split_heads("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_width)
    causal = jnp.tril(jnp.ones((context, context), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, context, width)
    return mixed @ block["out"]


def transformer_logits(params, tokens, heads):
    """Return next-token logits for `tokens[:, :-1]` from pre-layer-norm blocks.

    `tokens` has shape (batch, context + 1), with the context of `params["position"]`.
    """
    x = params["embed"][tokens[:, :-1]] + params["position"]
    num_blocks = sum(name.startswith("block") for name in params)
    for i in range(num_blocks):
        block = params[f"block{i}"]
        x = x + causal_attention(block, layer_norm(x, block["gain1"]), heads)
        hidden_units = jax.nn.gelu(layer_norm(x, block["gain2"]) @ block["mlp_in"]
                                   + block["mlp_bias"])
        x = x + hidden_units @ block["mlp_out"]
    return layer_norm(x, params["final_gain"]) @ params["unembed"]
