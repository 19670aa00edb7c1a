"""NF4 codec speed, ours vs bitsandbytes' CPU functions, and the memory of the 4-bit layer's backward.

Codec: for each shape, quantize time (fp32 input, blocksize 64, double quantization) and
dequantisation throughput in GB/s of output written (fp32 and bf16 output). Each library runs
in its own child process, as a user of either library alone would run it (in this install
bitsandbytes' libgomp resolves to the copy torch ships, one OpenMP runtime; a build with a second
runtime would have two pools spin-waiting on the same cores, up to 10x slower). The children alternate for ``--rounds`` rounds of ``--repeats`` timed calls, so
machine noise hits both alike; figures are medians over all timed calls. The bitsandbytes child
also checks that the packed bytes and statistics are identical to ours.

Memory: a stack of Linear4bit layers, one forward and backward to the input, with the
memory-lean autograd Function (saves only the 4-bit state, dequantises again in backward)
against a naive ``F.linear(x, dequantize(W))`` (autograd keeps every dequantised W until
backward). Reported: the bytes autograd saved for backward (exact, via saved-tensor hooks), and
the peak RSS above the post-build RSS, each variant alone in a fresh child process (Linux /proc).

    python benchmarks/nf4_codec.py
    python benchmarks/nf4_codec.py --shapes 4096x4096 --repeats 9 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from peftlab.quant import Linear4bit, dequantize_nf4, quantize_nf4

OUT_DTYPES = (torch.float32, torch.bfloat16)


def _times(fn, repeats: int) -> list[float]:
    fn()  # warm-up: lookup tables, allocator
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _codec_child(library: str, shape: tuple[int, int], repeats: int) -> dict:
    """Runs in a fresh process with one library: its quantize and dequantize timings."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    result = {}
    if library == "ours":
        state = quantize_nf4(w)
        result["quantize"] = _times(lambda: quantize_nf4(w), repeats)
        for dtype in OUT_DTYPES:
            result[str(dtype)] = _times(lambda dtype=dtype: dequantize_nf4(state, dtype), repeats)
        result["bits_per_parameter"] = state.bits_per_parameter
        return result
    import bitsandbytes.functional as bnb

    packed, qs = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    result["identical"] = (torch.equal(packed, ours.packed) and torch.equal(qs.absmax, ours.absmax_q)
                           and torch.equal(qs.state2.absmax, ours.absmax_scale)
                           and torch.equal(qs.offset, ours.absmax_offset) and torch.equal(qs.state2.code, ours.code2))
    result["quantize"] = _times(
        lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), repeats)
    for dtype in OUT_DTYPES:
        qs_out = copy.copy(qs)  # bitsandbytes dequantises to the state's dtype
        qs_out.dtype = dtype
        result[str(dtype)] = _times(lambda qs_out=qs_out: bnb.dequantize_4bit(packed, qs_out), repeats)
    return result


def _child(call: str, threads: int | None = None) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {sys.path[0]!r}); import nf4_codec as b; "
            f"print(json.dumps(b.{call}))")
    # OMP_NUM_THREADS sizes both OpenMP pools: torch's and bitsandbytes' C kernels'.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_codec(shape: tuple[int, int], repeats: int, rounds: int, with_bnb: bool, threads: int | None) -> None:
    libraries = ("ours", "bnb") if with_bnb else ("ours",)
    runs = {lib: [] for lib in libraries}
    for _ in range(rounds):
        for lib in libraries:
            runs[lib].append(_child(f"_codec_child({lib!r}, {shape!r}, {repeats})", threads))

    def median(lib: str, key: str) -> float:
        return statistics.median(t for run in runs[lib] for t in run[key])

    n = shape[0] * shape[1]
    same = f", bytes identical to bitsandbytes: {runs['bnb'][0]['identical']}" if with_bnb else ""
    print(f"\n{shape[0]}x{shape[1]} ({n / 1e6:.2f}M params, {runs['ours'][0]['bits_per_parameter']:.3f} bits/param)"
          + same)
    row = "  {:<22}{:>14}{:>14}"
    print(row.format("", "ours", "bitsandbytes"))
    cells = [f"{median(lib, 'quantize') * 1e3:.1f} ms" for lib in libraries]
    print(row.format("quantize", *cells, *(["-"] * (2 - len(cells)))))
    for dtype in OUT_DTYPES:
        out_bytes = n * torch.finfo(dtype).bits // 8
        cells = [f"{out_bytes / median(lib, str(dtype)) / 1e9:.2f} GB/s" for lib in libraries]
        print(row.format(f"dequantize -> {str(dtype)[6:]}", *cells, *(["-"] * (2 - len(cells)))))


def _memory_child(variant: str, layers: int, width: int, batch: int) -> dict:
    """Runs in a fresh process: build, reset the RSS high-water mark, one forward and backward."""
    torch.manual_seed(0)
    stack = [Linear4bit.from_module(torch.nn.Linear(width, width)) for _ in range(layers)]
    x = torch.randn(batch, width, requires_grad=True)

    def forward(h):
        for layer in stack:
            h = layer(h) if variant == "function" else F.linear(h, layer.dequantize(h.dtype), layer.bias)
        return h

    with torch.no_grad():
        forward(x)  # warm-up: lookup tables
    saved = []
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = forward(x)
    out.square().sum().backward()
    return {"saved_bytes": sum(saved), "peak_rss_bytes": _rss("VmHWM") - base}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_memory(layers: int, width: int, batch: int) -> None:
    weight_mib = width * width * 4 / 2**20
    print(f"\nbackward memory: {layers} Linear4bit layers {width}x{width}, batch {batch} "
          f"(one fp32 dequantised weight = {weight_mib:.0f} MiB, all {layers} = {layers * weight_mib:.0f} MiB)")
    for variant, label in (("function", "autograd.Function (ours)"), ("naive", "naive F.linear(dequant)")):
        r = _child(f"_memory_child({variant!r}, {layers}, {width}, {batch})")
        print(f"  {label:<26} saved for backward {r['saved_bytes'] / 2**20:8.1f} MiB   "
              f"peak RSS +{r['peak_rss_bytes'] / 2**20:7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="768x768,3072x768,4096x4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, help="threads per library (default: torch's default)")
    args = parser.parse_args()
    with_bnb = importlib.util.find_spec("bitsandbytes") is not None
    versions = f", bitsandbytes {importlib.metadata.version('bitsandbytes')}" if with_bnb else \
        " (bitsandbytes not installed: ours only)"
    print(f"torch {torch.__version__}{versions}, {args.threads or torch.get_num_threads()} threads")
    for spec in args.shapes.split(","):
        rows, cols = (int(v) for v in spec.lower().split("x"))
        bench_codec((rows, cols), args.repeats, args.rounds, with_bnb, args.threads)
    bench_memory(args.layers, args.width, args.batch)


if __name__ == "__main__":
    main()
