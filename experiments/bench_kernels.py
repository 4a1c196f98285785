"""Benchmark: our hand-written kernels against PyTorch's, as ratios measured side by side.

    python -m experiments.bench_kernels                 # CPU here (and GPU where there is one)
    python -m experiments.bench_kernels --device cuda --rounds 30 --out runs/bench

Each row times our kernel and PyTorch's on the same inputs in interleaved rounds (A B, B A,
A B, ...: who goes first alternates, so drift hits both alike), after warm-up, and reports both
medians with their interquartile range (profiler.analysis.stats.iqr) and the median of the
per-round ratios (ours / PyTorch: below 1 is faster). Before timing a row, the outputs of both
are compared: a wrong kernel is reported, never timed.

  conv   forward, backward-data and backward-weight, each on its own row, against
         aten.convolution / aten.convolution_backward with that one output (oneDNN on CPU,
         cuDNN on GPU), called directly so no autograd bookkeeping is timed on either side
         (ONEDNN_MAX_CPU_ISA=AVX2 with --gemm-paths avx2 stands both sides in for an AVX2
         CPU: oneDNN then uses AVX2 too);
         the ResNet-for-CIFAR layers (stem, 3x3 at 16/32/64 channels, stride-2 and 1x1 shortcut
         convs) at --batches, and DeepPose's five AlexNet convolutions at batch 32. On the CPU
         once per GEMM path of ours that this CPU runs (--gemm-paths: avx512, avx2, baseline;
         PyTorch's side is the same oneDNN each time), each path summed up per direction in
         the geometric mean and the worst of its ratios. On the GPU in FP32 with TF32 off for
         cuDNN (the same precision as ours; issue 13's P2).
  loss   the DeepPose loss forward + backward: our fused kernel (one launch), our forward and
         backward kernels (two launches), PyTorch's masked composite with autograd, and
         F.mse_loss with autograd against our fused kernel without a mask; at batch
         1..256 x 28 outputs and at 16M elements; on the GPU also the bandwidth our kernels
         reach beside a device-to-device copy's, measured in the same run (issue 13's P1).

Timing: host wall clock (time.perf_counter) on the CPU. On the GPU, CUDA events give the
device time and the host clock, around the same calls, the host time spent issuing them
(`*_host_ms`: what a launch-bound call costs the CPU).
This is a script, not a test: it never fails on speed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import ops
from experiments.study import machine_info
from experiments.timing import Timer, add_threads_argument, apply_threads, interleaved, summarize
from ops import core
from profiler.analysis.stats import median
from profiler.console import output_file
from profiler.report import write_json_atomic

# ResNet for CIFAR-10 layers: (name, Cin, Cout, H=W, kernel, stride, padding)
CONV_LAYERS = [
    ("3x3 16->16 @32", 16, 16, 32, 3, 1, 1),
    ("3x3 32->32 @16", 32, 32, 16, 3, 1, 1),
    ("3x3 64->64 @8", 64, 64, 8, 3, 1, 1),
    ("3x3/2 16->32 @32", 16, 32, 32, 3, 2, 1),
    ("3x3/2 32->64 @16", 32, 64, 16, 3, 2, 1),
    ("1x1/2 16->32 @32", 16, 32, 32, 1, 2, 0),
    ("1x1/2 32->64 @16", 32, 64, 16, 1, 2, 0),
]
# (name, Cin, Cout, H=W, kernel, stride, padding)
RESNET_STEM = ("3x3 3->16 @32 (stem)", 3, 16, 32, 3, 1, 1)
# DeepPose's AlexNet convolutions (profiler/workloads/spec.py) at their input sizes, batch 32.
DEEPPOSE_CONV_LAYERS = [
    ("alexnet conv1 11x11/4 3->96 @220", 3, 96, 220, 11, 4, 2),
    ("alexnet conv2 5x5 96->256 @26", 96, 256, 26, 5, 1, 2),
    ("alexnet conv3 3x3 256->384 @12", 256, 384, 12, 3, 1, 1),
    ("alexnet conv4 3x3 384->384 @12", 384, 384, 12, 3, 1, 1),
    ("alexnet conv5 3x3 384->256 @12", 384, 256, 12, 3, 1, 1),
]
DEEPPOSE_BATCH = 32
LOSS_BATCHES = [1, 8, 32, 128, 256]
LOSS_OUTPUTS = 28  # 14 joints x (x, y)
LOSS_LARGE = 1 << 24


@dataclass
class Row:
    group: str
    name: str
    device: str
    ours_ms: float
    ours_iqr_ms: float
    torch_ms: float
    torch_iqr_ms: float
    ratio: float  # median over rounds of ours / torch
    ratio_iqr: float
    extra: dict = field(default_factory=dict)
    gemm_path: str = ""  # our CPU conv's GEMM path (ops.core.gemm_path) for CPU conv rows


class HostAndDeviceTimer(Timer):
    """A Timer that also keeps, per timed function, the host time spent issuing its calls.

    On the GPU the host time is the wall clock from before the first call to after the last,
    before waiting for the device: the cost of the launches. On the CPU both are the same."""

    def __init__(self, device: str):
        super().__init__(device)
        self.host_ms: Dict[Callable, List[float]] = {}

    def __call__(self, fn: Callable[[], None], repeat: int) -> float:
        if self.device != "cuda":
            ms = super().__call__(fn, repeat)
            self.host_ms.setdefault(fn, []).append(ms)
            return ms
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        began = time.perf_counter()
        for _ in range(repeat):
            fn()
        host = (time.perf_counter() - began) * 1e3 / repeat
        end.record()
        end.synchronize()
        self.host_ms.setdefault(fn, []).append(host)
        return start.elapsed_time(end) / repeat


def timed_variants(variants: Dict[str, Callable[[], None]], timer: HostAndDeviceTimer, args,
                   repeat=None) -> Dict[str, List[float]]:
    """Every variant in the same interleaved rounds; returns ms per call per round."""
    timer.host_ms.clear()
    return interleaved(variants, timer, args.rounds, args.warmup, repeat or args.repeat)


def make_row(group, name, device, samples, timer: HostAndDeviceTimer, variants, ours: str,
             baseline: str, extra=None) -> Row:
    """The row ours vs baseline from rounds in which both were timed, with host times."""
    stats = summarize({ours: samples[ours], baseline: samples[baseline]}, baseline=baseline)
    host = {k: median(timer.host_ms[variants[k]][-len(samples[k]):])
            for k in (ours, baseline)}
    extra = {**(extra or {}), "ours_host_ms": host[ours], "torch_host_ms": host[baseline]}
    return Row(group, name, device, stats[ours]["median_ms"], stats[ours]["iqr_ms"],
               stats[baseline]["median_ms"], stats[baseline]["iqr_ms"], stats[ours]["ratio"],
               stats[ours]["ratio_iqr"], extra)


def stream_of(device: str) -> Optional[int]:
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else None


# ---- conv --------------------------------------------------------------------------------------

CONV_DIRECTIONS = ("forward", "backward-data", "backward-weight")


def bench_conv(layer, batch: int, device: str, args, timer: HostAndDeviceTimer) -> List[Row]:
    """One row per direction: ours against PyTorch's (cuDNN / oneDNN) computing just that."""
    name, cin, cout, size, k, stride, padding = layer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).to(device)
    w = (torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5).to(device)
    params = dict(stride=stride, padding=padding)
    y = torch.empty(core.conv2d_output_shape(x.shape, w.shape, **params), device=device)
    gy = torch.randn(y.shape, generator=g).to(device)
    gx, gw = torch.empty_like(x), torch.empty_like(w)
    s = stream_of(device)
    conv_args = ([stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)
    out = {}
    ours = {
        "forward": lambda: core.conv2d_forward(x, w, None, y, stream=s, **params),
        "backward-data": lambda: core.conv2d_backward_data(gy, w, gx, stream=s, **params),
        "backward-weight": lambda: core.conv2d_backward_weight(x, gy, gw, stream=s, **params),
    }
    theirs = {
        "forward": lambda: out.__setitem__(
            "forward", torch.ops.aten.convolution(x, w, None, *conv_args)),
        "backward-data": lambda: out.__setitem__(
            "backward-data", torch.ops.aten.convolution_backward(
                gy, x, w, None, *conv_args, [True, False, False])[0]),
        "backward-weight": lambda: out.__setitem__(
            "backward-weight", torch.ops.aten.convolution_backward(
                gy, x, w, None, *conv_args, [False, True, False])[1]),
    }
    results = {"forward": y, "backward-data": gx, "backward-weight": gw}
    out_h, out_w = y.shape[2], y.shape[3]
    flops = 2 * batch * cout * out_h * out_w * cin * k * k  # one GEMM, each direction
    rows = []
    for direction in CONV_DIRECTIONS:
        ours[direction]()
        theirs[direction]()
        check_close(f"conv {direction} {name} b{batch}", [results[direction]], [out[direction]])
        variants = {"ours": ours[direction], "torch": theirs[direction]}
        samples = timed_variants(variants, timer, args)
        row = make_row(f"conv {direction}", f"{name} b{batch}", device, samples, timer,
                       variants, "ours", "torch")
        row.gemm_path = core.gemm_path() if device == "cpu" else ""
        row.extra.update(ours_gflops=flops / row.ours_ms / 1e6,
                         torch_gflops=flops / row.torch_ms / 1e6)
        rows.append(row)
    return rows


def check_close(what: str, ours, theirs, rtol=1e-4):
    """Refuses to time a kernel whose results disagree with PyTorch's. Both sides are float32
    sums of up to B*OH*OW terms, so the error is measured against each output's largest
    magnitude rather than elementwise (an element near zero carries the same absolute error)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a - b).abs().max().item()
        scale = b.abs().max().item()
        if not err <= rtol * scale + 1e-6:
            raise SystemExit(f"{what}: output {i} differs from PyTorch's by up to {err:.3g} "
                             f"(largest |value| {scale:.3g}); not timing a wrong kernel")


# ---- loss --------------------------------------------------------------------------------------

def bench_loss(n_rows: int, n_cols: int, device: str, args, timer: HostAndDeviceTimer,
               copy_gbps: Optional[float]) -> List[Row]:
    """Our fused kernel against PyTorch's masked composite and F.mse_loss (forward + backward
    with autograd), and our forward/backward pair against the composite, in shared rounds."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_rows, n_cols, generator=g).to(device)
    t = torch.randn(n_rows, n_cols, generator=g).to(device)
    v = (torch.rand(n_rows, n_cols, generator=g) < 0.8).float().to(device)
    loss, count = torch.empty((), device=device), torch.empty((), device=device)
    one = torch.ones((), device=device)
    gx, gx_pair, gx_plain = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    loss_plain, count_plain = torch.empty((), device=device), torch.empty((), device=device)
    s = stream_of(device)
    factor = core.DEEPPOSE_COUNT_FACTOR

    def fused():
        core.sq_error_loss_fused(x, t, v, loss, count, gx, count_factor=factor, stream=s)

    def fused_unmasked():
        core.sq_error_loss_fused(x, t, None, loss_plain, count_plain, gx_plain,
                                 count_factor=core.MSE_COUNT_FACTOR, stream=s)

    def pair():
        core.sq_error_loss_forward(x, t, v, loss, count, count_factor=factor, stream=s)
        core.sq_error_loss_backward(x, t, v, count, one, gx_pair, count_factor=factor, stream=s)

    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = {}

    def composite():
        xr.grad = None
        d = (xr - t) * v
        composed = (d * d).sum() / (v.sum() * factor)
        composed.backward()
        out["loss"] = composed.detach()

    def mse():
        xm.grad = None
        plain = F.mse_loss(xm, t)
        plain.backward()
        out["mse"] = plain.detach()

    variants = {"fused": fused, "fused_unmasked": fused_unmasked, "pair": pair,
                "composite": composite, "mse_loss": mse}
    for fn in variants.values():
        fn()
    what = f"loss {n_rows}x{n_cols}"
    check_close(what, [loss, gx], [out["loss"], xr.grad])
    check_close(what + " (pair)", [gx_pair], [xr.grad])
    check_close(what + " (unmasked)", [loss_plain, gx_plain], [out["mse"], xm.grad])
    repeat = args.repeat if n_rows * n_cols >= LOSS_LARGE else args.repeat * 20
    samples = timed_variants(variants, timer, args, repeat)
    name = f"{n_rows}x{n_cols}" if n_cols > 1 else f"{n_rows} elements"
    size = x.numel() * x.element_size()
    # Bytes each must move at least: fused reads x, t, v and writes gx (the unmasked one: x, t
    # and gx); the pair reads x, t, v twice and writes gx.
    rows = [
        make_row("loss fused vs composite", name, device, samples, timer, variants, "fused",
                 "composite", {"ours_gbps_min": 4 * size}),
        make_row("loss fused vs F.mse_loss", name, device, samples, timer, variants,
                 "fused_unmasked", "mse_loss", {"ours_gbps_min": 3 * size}),
        make_row("loss fwd+bwd vs composite", name, device, samples, timer, variants, "pair",
                 "composite", {"ours_gbps_min": 7 * size}),
    ]
    for row in rows:
        row.extra["ours_gbps"] = row.extra.pop("ours_gbps_min") / row.ours_ms / 1e6
        if copy_gbps:
            row.extra["copy_gbps"] = copy_gbps
            row.extra["fraction_of_copy"] = row.extra["ours_gbps"] / copy_gbps
    return rows


def copy_bandwidth_gbps(device: str, timer: Timer) -> float:
    """Device-to-device copy of 256 MiB: bytes read + written per second, in GB/s."""
    src = torch.empty(64 << 20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = median([timer(lambda: dst.copy_(src), 10) for _ in range(5)])
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ---- report ------------------------------------------------------------------------------------

def print_header():
    print(f"{'benchmark':<24} {'case':<22} {'dev':<12} {'ours ms (IQR)':>18} "
          f"{'torch ms (IQR)':>18} {'ours/torch (IQR)':>18}  notes", flush=True)


def print_row(row: Row):
    notes = ", ".join(f"{k}={v:.3g}" for k, v in row.extra.items())
    where = f"{row.device} {row.gemm_path}".strip()
    print(f"{row.group:<24} {row.name:<22} {where:<12} "
          f"{row.ours_ms:>9.3f} ({row.ours_iqr_ms:>6.3f}) "
          f"{row.torch_ms:>9.3f} ({row.torch_iqr_ms:>6.3f}) "
          f"{row.ratio:>9.2f}x ({row.ratio_iqr:>5.2f})  {notes}", flush=True)


def environment(devices) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "ops_build": ops.build_info(), "devices": devices,
           "machine": machine_info(),  # the CPU model and its AVX2/FMA/AVX-512 flags
           # oneDNN's ceiling on its ISA (e.g. AVX2 to stand in for an AVX2 CPU); unset: all
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}
    if "cuda" in devices:
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = {"version": torch.backends.cudnn.version(),
                        "allow_tf32": torch.backends.cudnn.allow_tf32,
                        "benchmark": torch.backends.cudnn.benchmark,
                        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_kernels",
        description="Time our conv2d and DeepPose-loss kernels against PyTorch's, side by side "
                    "in interleaved rounds, and print ratios (ours / torch; < 1 is faster).")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="where to run; 'all' = the CPU plus the GPU when one is usable "
                        "(default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128],
                   help="conv batch sizes (default: 32 128)")
    p.add_argument("--only", choices=["conv", "loss"], help="run one benchmark group only")
    p.add_argument("--deeppose-convs", action="store_true",
                   help="also time DeepPose's AlexNet convolutions on the CPU (always on the "
                        "GPU; on 2 CPU cores they take seconds per call)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN pick its fastest algorithm per shape (default: its "
                        "heuristics, as in training without that setting)")
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved timing rounds per row (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--repeat", type=int, default=3,
                   help="calls per timed round (small loss rows use 20x this; default: 3)")
    p.add_argument("--gemm-paths", nargs="+", default=None, metavar="PATH",
                   help="our CPU GEMM paths to time the CPU conv rows on, each in turn "
                        f"(default: every one this CPU runs, here {' '.join(core.gemm_paths())})")
    p.add_argument("--out", type=output_file, default=None,
                   help="also write the rows as JSON to this file")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("rounds", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.rounds < 2:
        p.error("--rounds must be >= 2 to report a spread")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if any(b < 1 for b in args.batches):
        p.error(f"--batches must be >= 1, got {args.batches}")
    if args.gemm_paths is None:
        args.gemm_paths = list(core.gemm_paths())
    refused = [path for path in args.gemm_paths if path not in core.gemm_paths()]
    if refused:
        p.error(f"--gemm-paths: expected paths this CPU runs ({', '.join(core.gemm_paths())}), "
                f"got {', '.join(refused)}")
    return args


def geometric_mean(values: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def conv_summary(rows: List[Row]) -> List[dict]:
    """Per device, GEMM path and direction (and over the three directions): how many conv
    rows, the geometric mean and the median of their ratios, the worst and its case."""
    out = []
    keys = sorted({(r.device, r.gemm_path) for r in rows if r.group.startswith("conv ")})
    for device, path in keys:
        for direction in CONV_DIRECTIONS + ("all",):
            chosen = [r for r in rows if r.device == device and r.gemm_path == path
                      and r.group.startswith("conv ")
                      and (direction == "all" or r.group == f"conv {direction}")]
            if not chosen:
                continue
            worst = max(chosen, key=lambda r: r.ratio)
            out.append({"device": device, "gemm_path": path, "direction": direction,
                        "rows": len(chosen),
                        "geomean": geometric_mean([r.ratio for r in chosen]),
                        "median": median([r.ratio for r in chosen]),
                        "worst": worst.ratio, "worst_case": f"{worst.group} {worst.name}"})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = apply_threads(args.threads, ["torch"])
    devices = ["cpu"]
    if args.device in ("cuda", "all"):
        if ops.cuda_available() and torch.cuda.is_available():
            devices.append("cuda")
        elif args.device == "cuda":
            print("--device cuda: no usable GPU here (ops.cuda_available() is False or PyTorch "
                  "sees no GPU)", file=sys.stderr)
            return 2
    if args.device == "cuda":
        devices = ["cuda"]
    if "cuda" in devices:
        # FP32 against FP32: cuDNN and cuBLAS would otherwise round through TF32 (P2 compares
        # at the same precision).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = environment(devices)
    env["threads"] = threads["torch"]
    print(f"ops build: {env['ops_build']}; torch {env['torch']} with {env['torch_threads']} "
          f"threads; {env['cpu_count']} CPUs" + (f"; GPU {env['gpu']}" if 'gpu' in env else ""))
    m = env["machine"]
    flags = (["avx2"] if m["avx2"] else []) + (["fma"] if m["fma"] else []) + m["avx512"]
    print(f"CPU: {m['cpu_model']}; flags {' '.join(flags) or 'none read'}; our GEMM paths timed: "
          f"{' '.join(args.gemm_paths)}; oneDNN's ISA ceiling (ONEDNN_MAX_CPU_ISA): "
          f"{env['onednn_max_cpu_isa'] or 'none (its best)'}")
    print(f"{args.rounds} interleaved rounds x {args.repeat} calls after {args.warmup} warm-up "
          f"rounds; medians with interquartile range", flush=True)
    rows: List[Row] = []
    payload = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows}
    print_header()
    try:
        for device in devices:
            timer = HostAndDeviceTimer(device)
            if args.only in (None, "loss"):
                # Measured in this run, beside the loss rows that are judged against it.
                copy_gbps = copy_bandwidth_gbps(device, timer) if device == "cuda" else None
                if copy_gbps:
                    payload["copy_gbps"] = copy_gbps
                    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + written)")
                for rows_, cols in [(b, LOSS_OUTPUTS) for b in LOSS_BATCHES] + [(LOSS_LARGE, 1)]:
                    for row in bench_loss(rows_, cols, device, args, timer, copy_gbps):
                        rows.append(row)
                        print_row(row)
            if args.only in (None, "conv"):
                layers = [(RESNET_STEM, b) for b in args.batches] + \
                    [(layer, b) for b in args.batches for layer in CONV_LAYERS] + \
                    [(layer, DEEPPOSE_BATCH) for layer in DEEPPOSE_CONV_LAYERS
                     if device == "cuda" or args.deeppose_convs]
                # Our CPU conv on each GEMM path in turn (ops._C's setting, restored after).
                paths = args.gemm_paths if device == "cpu" else [None]
                before = core.gemm_path()
                try:
                    for path in paths:
                        if path is not None:
                            core.set_gemm_path(path)
                        for layer, batch in layers:
                            for row in bench_conv(layer, batch, device, args, timer):
                                rows.append(row)
                                print_row(row)
                finally:
                    core.set_gemm_path(before)
    finally:
        # Whatever was measured is kept, even when a later row fails.
        if args.out:
            payload["rows"] = [asdict(r) for r in rows]
            payload["conv_summary"] = conv_summary(rows)
            # Every value is JSON already (args as strings); write_json_atomic makes no folders.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, payload)
            print(f"wrote {args.out}")
    for line in conv_summary(rows):
        where = f"{line['device']} {line['gemm_path']}".strip()
        print(f"{where} conv {line['direction']}: ours/torch over {line['rows']} rows: "
              f"geomean {line['geomean']:.2f}x, median {line['median']:.2f}x, worst "
              f"{line['worst']:.2f}x ({line['worst_case']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
