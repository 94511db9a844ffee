"""Per-kernel XLA compile times of CP and of value_and_grad, by kernel size and source line.

For one case of `suite.py`, compiles `jax.value_and_grad(loss)` and CP with K probes in a
child process whose XLA logs each kernel's compilation, then prints for each method:

* XLA's compile wall time (the "Compiling [module] for CPU using JIT" log line, without
  tracing and lowering) and the number of kernels;
* the thread time spent on kernels in MLIR (XLA's fusion emitters) and in LLVM (optimization
  and machine code), by kernel output size and by source line;
* the slowest kernels, with output shape and source line.

The source line of a kernel is that of its root instruction, from the stack traces JAX puts in
the HLO: a line of the model for the forward pass, a line of cpjax for what the sweep adds.
XLA compiles kernels on several threads, so the thread times add up to more than the wall time.

Run from the repository root:

    python benchmarks/compile_profile.py --model transformer --size small --probes 10

NOTE: the per-kernel times come from XLA's verbose log (`TF_CPP_VMODULE=ir_compiler=1,
fusion_compiler=1,cpu_compiler=1`, the lines "Compiled MLIR module: ... time: ..." and
"Compiled LLVM module: ..."). The format is internal to XLA and was read from jaxlib 0.10.2.
Where no such line is found, the script stops with an error instead of printing zeros.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = {"value_and_grad": "jit_value_and_grad", "CP": "jit_cp_estimate"}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_KERNEL_TIME = re.compile(r"Compiled (MLIR|LLVM) module: (\S+) time: ([\d.]+) (us|ms|s) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?stack_frame_id=(\d+)", re.M)


def compile_in_child(model: str, size: str, probes: int, dump_dir: str) -> str:
    """Compile both methods in a child process with XLA's logging on, and return its log."""
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    env["TF_CPP_VMODULE"] = "ir_compiler=1,fusion_compiler=1,cpu_compiler=1"
    modules = "|".join(MODULES.values())
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} "
                        f"--xla_dump_hlo_as_text --xla_dump_hlo_module_re=^({modules})$")
    command = [sys.executable, __file__, "--child", "--model", model, "--size", size,
               "--probes", str(probes)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"Compiling in the child process failed with exit code "
                         f"{done.returncode}:\n{done.stderr[-3000:]}")
    return done.stderr


def child_main(model: str, size: str, probes: int) -> None:
    """Compile value_and_grad and CP once each, from empty caches (run in the child)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import jax
    import suite

    import cpjax

    case = suite.build_case(model, size)
    estimator = cpjax.cp_hessian_diag(case.loss, num_samples=probes, separable=True)

    def value_and_grad(params, data, key):
        del key
        return jax.value_and_grad(case.loss)(params, *data)

    def cp_estimate(params, data, key):
        return estimator(params, *data, key=key)

    args = (case.params, case.data, jax.random.key(1))
    for fn in (value_and_grad, cp_estimate):
        jax.clear_caches()
        jax.jit(fn).lower(*args).compile()


def kernel_times(log: str, module: str) -> tuple[float, dict]:
    """Return XLA's compile wall time of `module` in ms, and kernel -> [MLIR ms, LLVM ms]."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if f"Running HLO passes on [{module}]" in line]
    ends = [i for i, line in enumerate(lines)
            if f"Compiling [{module}] for CPU using JIT time:" in line]
    if not starts or not ends:
        raise SystemExit(f"XLA's log contains no compilation of {module}. This jaxlib may log "
                         "in another format: see the NOTE at the top of this script.")
    start, end = starts[-1], ends[-1]
    wall = re.search(r"time: ([\d.]+) (us|ms|s) ", lines[end])
    times = collections.defaultdict(lambda: [0.0, 0.0])
    for line in lines[start:end + 1]:
        match = _KERNEL_TIME.search(line)
        if match:
            kind, name, value, unit = match.groups()
            # XLA names one kernel's modules "[__compute_module_]*NAME[_kernel_module]",
            # and a matrix product it emits as loops "NAME_elemental".
            while name.startswith("__compute_module_"):
                name = name.removeprefix("__compute_module_")
            name = name.removesuffix("_kernel_module").removesuffix("_elemental")
            times[name][kind == "LLVM"] += float(value) * _UNITS[unit]
    if not times:
        raise SystemExit(f"XLA's log contains no per-kernel compile times for {module}. This "
                         "jaxlib may log in another format: see the NOTE at the top of this "
                         "script.")
    return float(wall.group(1)) * _UNITS[wall.group(2)], dict(times)


def _table(hlo: str, name: str) -> list:
    match = re.search(rf"^{name}\n(.*?)(?:\n\n|\n(?=[A-Z]\w+\n))", hlo, re.S | re.M)
    return match.group(1).splitlines() if match else []


def source_lines(hlo: str) -> dict:
    """Return stack frame id -> "file:line (function)" of its innermost frame outside tracing."""
    files = {int(line.split()[0]): line.split('"')[1] for line in _table(hlo, "FileNames")}
    functions = {int(line.split()[0]): line.split('"')[1]
                 for line in _table(hlo, "FunctionNames")}
    locations, frames = {}, {}
    for line in _table(hlo, "FileLocations"):
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        locations[int(line.split()[0])] = (files[int(fields["file_name_id"])],
                                           functions[int(fields["function_name_id"])],
                                           int(fields["line"]))
    for line in _table(hlo, "StackFrames"):
        fields = dict(re.findall(r"(\w+)=(\d+)", line))
        # The printed parent id is one more than the parent's own id: 1 means no parent.
        frames[int(line.split()[0])] = (int(fields["file_location_id"]),
                                        int(fields["parent_frame_id"]) - 1)
    described = {}
    for frame_id in frames:
        chain, seen, current = [], set(), frame_id
        while current in frames and current not in seen:
            seen.add(current)
            location, current = frames[current]
            chain.append(locations[location])
        # cpjax's tracing frames enclose every equation: skip them.
        chain = [c for c in chain if not c[0].endswith("cpjax/_trace.py")] or [("?", "?", 0)]
        path, function, line = chain[0]
        parts = Path(path).parts
        short = "/".join(parts[parts.index("cpjax"):]) if "cpjax" in parts else Path(path).name
        described[frame_id] = f"{short}:{line} ({function})"
    return described


def kernel_sources(dump_dir: str, module: str) -> dict:
    """Return kernel name -> (output shape, source line), from the optimized HLO dump."""
    paths = sorted(glob.glob(f"{dump_dir}/*.{module}.cpu_after_optimizations.txt"))
    if not paths:
        return {}
    hlo = Path(paths[-1]).read_text()
    described = source_lines(hlo)
    entry = hlo[hlo.index("\nENTRY"):]
    return {m.group(1): (m.group(2), described.get(int(m.group(3)), "no source line"))
            for m in _INSTRUCTION.finditer(entry)}


def _size_class(shape: str) -> str:
    dims = re.search(r"\[([\d,]*)\]", shape)
    count = math.prod(int(d) for d in dims.group(1).split(",")) if dims and dims.group(1) else 1
    for limit in (64, 1024, 16384):
        if count <= limit:
            return f"≤ {limit:,} elements"
    return "> 16,384 elements"


def report(label: str, wall_ms: float, times: dict, sources: dict, top: int) -> str:
    mlir = sum(t[0] for t in times.values())
    llvm = sum(t[1] for t in times.values())
    out = [f"{label}: XLA compile {wall_ms / 1e3:.2f} s wall, {len(times)} kernels, "
           f"{mlir:.0f} ms MLIR + {llvm:.0f} ms LLVM thread time"]
    def size_of(name):
        return _size_class(sources.get(name, ("?", ""))[0])

    def source_of(name):
        return sources.get(name, ("", "no source line"))[1]

    for title, group_of in (("by kernel output size", size_of), ("by source line", source_of)):
        groups = collections.defaultdict(lambda: [0, 0.0])
        for name, (mlir_ms, llvm_ms) in times.items():
            groups[group_of(name)][0] += 1
            groups[group_of(name)][1] += mlir_ms + llvm_ms
        out.append(f"  {title}:")
        for group, (count, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
            out.append(f"    {ms:7.0f} ms  {count:3d} kernels  {group}")
    out.append("  slowest kernels (MLIR ms, LLVM ms):")
    for name, (mlir_ms, llvm_ms) in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]:
        shape, source = sources.get(name, ("?", "no source line"))
        out.append(f"    {mlir_ms:6.1f} {llvm_ms:6.1f}  {name:32s} {shape:28s} {source}")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="transformer", choices=("mlp", "cnn", "transformer"),
                        help="model of suite.py (default transformer)")
    parser.add_argument("--size", default="small", choices=("small", "medium", "large"),
                        help="model size of suite.py (default small)")
    parser.add_argument("--probes", type=int, default=10, help="number of CP probes K (default 10)")
    parser.add_argument("--top", type=int, default=15,
                        help="rows per group and slowest kernels to print (default 15)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probes < 1:
        parser.error(f"--probes must be at least 1, got {args.probes}")
    if args.child:
        child_main(args.model, args.size, args.probes)
        return
    with tempfile.TemporaryDirectory() as dump_dir:
        log = compile_in_child(args.model, args.size, args.probes, dump_dir)
        results = {}
        for label, module in MODULES.items():
            results[label] = (*kernel_times(log, module), kernel_sources(dump_dir, module))
    print(f"{args.model} {args.size}, CP with K={args.probes} probes, separable=True")
    for label, (wall_ms, times, sources) in results.items():
        print(report(label if label != "CP" else f"CP, K={args.probes}", wall_ms, times,
                     sources, args.top))
    base, cp = results["value_and_grad"], results["CP"]
    base_thread = sum(map(sum, base[1].values()))
    cp_thread = sum(map(sum, cp[1].values()))
    print(f"CP / value_and_grad: XLA compile wall {cp[0] / base[0]:.2f}, kernel thread time "
          f"{cp_thread / base_thread:.2f}, kernels {len(cp[1]) / len(base[1]):.2f}")


if __name__ == "__main__":
    main()
