"""Wall-time cost of CP Hessian-diagonal estimates next to a gradient and to Hutchinson.

Times, under `jax.jit` in float32, `cpjax.cp_hessian_diag` with 1 and 10 probes (with the
separable batch axis on and off) on a tanh MLP 64 -> 256 -> 256 -> 10 with softmax
cross-entropy over a batch of 512 random inputs, and divides by the time of
`jax.value_and_grad` and of one Hutchinson probe (one Hessian-vector product). Every method
is compiled once first. The methods are then called in a new random order in each
repetition, so that drifts in machine load fall on all of them alike. The ratios divide medians.

Run from the repository root:

    python benchmarks/cost.py [--repeats 50] [--batch 512] [--hidden 256]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import describe_machine, init_mlp_params, load_average
from tqdm import tqdm

import cpjax

BASELINE = "jax.value_and_grad"
HUTCHINSON_ONE = "Hutchinson, 1 probe"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50,
                        help="timed calls per method, after one compiling call (default 50)")
    parser.add_argument("--batch", type=int, default=512,
                        help="number of examples in the loss (default 512)")
    parser.add_argument("--hidden", type=int, default=256,
                        help="width of each of the two tanh hidden layers (default 256)")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args




def make_loss(trace_counts: dict):
    """Return the MLP's mean softmax cross-entropy, counting in `trace_counts` each trace."""

    def mlp_loss(params, inputs, labels):
        trace_counts["loss"] += 1  # runs only while JAX traces, never in a compiled call
        hidden = inputs
        num_layers = len(params) // 2
        for layer in range(1, num_layers):
            hidden = jnp.tanh(hidden @ params[f"w{layer}"] + params[f"b{layer}"])
        logits = hidden @ params[f"w{num_layers}"] + params[f"b{num_layers}"]
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    return mlp_loss


def make_methods(loss):
    """Return name -> jitted `fn(params, inputs, labels, key)` for every timed method."""

    def value_and_grad(params, inputs, labels, key):
        del key  # one signature for all methods
        return jax.value_and_grad(loss)(params, inputs, labels)

    methods = {BASELINE: value_and_grad}
    for num_samples in (1, 10):
        methods[f"Hutchinson, {num_samples} probe{'s' * (num_samples > 1)}"] = (
            cpjax.hutchinson_hessian_diag(loss, num_samples=num_samples))
    for separable, label in ((True, "CP, separable batch axis"),
                             (False, "CP as in the paper, pruned")):
        for num_samples in (1, 10):
            methods[f"{label}, {num_samples} probe{'s' * (num_samples > 1)}"] = (
                cpjax.cp_hessian_diag(loss, separable=separable, num_samples=num_samples))
    methods["CP value, grad and diag, separable, 1 probe"] = (
        cpjax.cp_value_grad_and_hessian_diag(loss, separable=True))
    return {name: _with_positional_key(fn) for name, fn in methods.items()}


def _with_positional_key(fn):
    return jax.jit(lambda params, inputs, labels, key: fn(params, inputs, labels, key=key))


def time_call(fn, args) -> float:
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - started


def compile_all(methods, args) -> dict:
    """Call each method once and return name -> seconds of that call (trace and compile)."""
    return {name: time_call(fn, args) for name, fn in methods.items()}


def time_interleaved(methods, args, repeats, seed=0) -> dict:
    """Return name -> array of `repeats` call times, in a new random method order per repeat."""
    names = list(methods)
    times = {name: [] for name in names}
    order_rng = np.random.default_rng(seed)
    for _ in tqdm(range(repeats), desc="repeats", file=sys.stderr):
        for index in order_rng.permutation(len(names)):
            name = names[index]
            times[name].append(time_call(methods[name], args))
    return {name: np.asarray(values) for name, values in times.items()}


def format_table(times, first_call) -> str:
    baseline = np.median(times[BASELINE])
    hutchinson = np.median(times[HUTCHINSON_ONE])
    lines = [
        "| method | median ms | min ms | IQR ms | × value_and_grad | × Hutchinson, 1 probe "
        "| first call s (trace + compile) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in times.items():
        median = np.median(values)
        spread = np.subtract(*np.percentile(values, [75, 25]))
        lines.append(f"| {name} | {1e3 * median:.2f} | {1e3 * values.min():.2f} "
                     f"| {1e3 * spread:.2f} "
                     f"| {median / baseline:.2f} | {median / hutchinson:.2f} "
                     f"| {first_call[name]:.2f} |")
    return "\n".join(lines)






def main(argv=None) -> None:
    args = parse_args(argv)
    load_at_start = load_average()
    machine = describe_machine(load_at_start)
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/cost.py", *argv])
    started = time.perf_counter()

    trace_counts = {"loss": 0}
    params_key, inputs_key, labels_key, probe_key = jax.random.split(jax.random.key(0), 4)
    sizes = (64, args.hidden, args.hidden, 10)
    params = init_mlp_params(params_key, sizes)
    inputs = jax.random.normal(inputs_key, (args.batch, sizes[0]))
    labels = jax.random.randint(labels_key, (args.batch,), 0, sizes[-1])
    call_args = (params, inputs, labels, probe_key)

    methods = make_methods(make_loss(trace_counts))
    first_call = compile_all(methods, call_args)
    traces_after_compile = trace_counts["loss"]
    times = time_interleaved(methods, call_args, args.repeats)
    retraces = trace_counts["loss"] - traces_after_compile
    wall_time = time.perf_counter() - started

    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    print(f"Command: `{command}`\n")
    print(f"Wall time per call, median of {args.repeats} interleaved repeats under jax.jit "
          f"(tanh MLP {'-'.join(map(str, sizes))}, {num_params} parameters, batch "
          f"{args.batch}, float32, softmax cross-entropy).\n")
    print(format_table(times, first_call))
    print(f"\nMachine: {machine}")
    if load_at_start >= 1.0:
        print(f"NOTE: other processes were running (load average {load_at_start:.2f} at start), "
              "so the times are noisy. Compare the ratios, and rerun on an idle machine.")
    if retraces:
        print(f"WARNING: the loss was traced {retraces} more times during the timed calls; "
              "some method recompiles on every call and its times include compilation.")
    print(f"Total wall time (after Python imports): {wall_time:.1f} s")


if __name__ == "__main__":
    main()
