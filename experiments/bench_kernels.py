"""Benchmark: our hand-written kernels against PyTorch's, as ratios measured side by side.

    python -m experiments.bench_kernels                 # CPU here (and GPU where there is one)
    python -m experiments.bench_kernels --device cuda --rounds 30 --out runs/bench

Each row times our kernel and PyTorch's on the same inputs in interleaved rounds (A B A B ...,
so drift hits both alike), after warm-up, and reports both medians with their interquartile
range and the median of the per-round ratios (ours / PyTorch: below 1 is faster). Before timing
a row, the outputs of both are compared: a wrong kernel is reported, never timed.

  conv   forward + backward-data + backward-weight + backward-bias, against
         aten.convolution + aten.convolution_backward (oneDNN on CPU, cuDNN on GPU), called
         directly so no autograd bookkeeping is timed on either side; ResNet-for-CIFAR layers.
  loss   the DeepPose loss forward + backward (ours: one fused kernel each way) against the same
         loss composed from PyTorch ops with autograd, at batch 1..256 x 28 outputs and at 16M
         elements; on the GPU also the achieved bandwidth beside a device-to-device copy's.

Timing: host wall clock (time.perf_counter) on the CPU; CUDA events on the GPU.
This is a script, not a test: it never fails on speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

import ops
from experiments.timing import (Timer, add_threads_argument, apply_threads, interleaved,
                                summarize, write_json)
from ops import core

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


def measure(group, name, device, ours, theirs, timer: Timer, args, repeat=None,
            extra=None) -> Row:
    """Times ours against theirs in interleaved rounds and makes the row."""
    samples = interleaved({"ours": ours, "torch": theirs}, timer, args.rounds, args.warmup,
                          repeat or args.repeat)
    stats = summarize(samples, baseline="torch")
    row = Row(group, name, device, stats["ours"]["median_ms"], stats["ours"]["iqr_ms"],
              stats["torch"]["median_ms"], stats["torch"]["iqr_ms"], stats["ours"]["ratio"],
              stats["ours"]["ratio_iqr"], extra or {})
    return row


def stream_of(device: str) -> Optional[int]:
    return torch.cuda.current_stream().cuda_stream if device == "cuda" else None


# ---- conv --------------------------------------------------------------------------------------

def bench_conv(layer, batch: int, device: str, args, timer: Timer) -> Row:
    name, cin, cout, size, k, stride, padding = layer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=g).to(device)
    w = (torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5).to(device)
    b = torch.randn(cout, generator=g).to(device)
    params = dict(stride=stride, padding=padding)
    y = torch.empty(core.conv2d_output_shape(x.shape, w.shape, **params), device=device)
    gy = torch.randn(y.shape, generator=g).to(device)
    gx, gw, gb = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
    s = stream_of(device)

    def ours():
        core.conv2d_forward(x, w, b, y, stream=s, **params)
        core.conv2d_backward_data(gy, w, gx, stream=s, **params)
        core.conv2d_backward_weight(x, gy, gw, stream=s, **params)
        core.conv2d_backward_bias(gy, gb, stream=s)

    conv_args = ([stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)
    out = {}

    def theirs():
        out["y"] = torch.ops.aten.convolution(x, w, b, *conv_args)
        out["g"] = torch.ops.aten.convolution_backward(gy, x, w, [cout], *conv_args,
                                                       [True, True, True])

    ours()
    theirs()
    check_close(f"conv {name} b{batch}", [y, gx, gw, gb], [out["y"], *out["g"]])
    flops = 2 * 3 * batch * cout * y.shape[2] * y.shape[3] * cin * k * k  # fwd + 2 bwd GEMMs
    row = measure("conv fwd+bwd", f"{name} b{batch}", device, ours, theirs, timer, args)
    row.extra = {"ours_gflops": flops / row.ours_ms / 1e6,
                 "torch_gflops": flops / row.torch_ms / 1e6}
    return row


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

def bench_loss(n_rows: int, n_cols: int, device: str, args, timer: Timer,
               copy_gbps: Optional[float]) -> Row:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_rows, n_cols, generator=g).to(device)
    t = torch.randn(n_rows, n_cols, generator=g).to(device)
    v = (torch.rand(n_rows, n_cols, generator=g) < 0.8).float().to(device)
    loss, count = torch.empty((), device=device), torch.empty((), device=device)
    one = torch.ones((), device=device)
    gx = torch.empty_like(x)
    s = stream_of(device)
    factor = core.DEEPPOSE_COUNT_FACTOR

    def ours():
        core.sq_error_loss_forward(x, t, v, loss, count, count_factor=factor, stream=s)
        core.sq_error_loss_backward(x, t, v, count, one, gx, count_factor=factor, stream=s)

    xr = x.clone().requires_grad_()
    out = {}

    def theirs():
        xr.grad = None
        d = (xr - t) * v
        composed = (d * d).sum() / (v.sum() * factor)
        composed.backward()
        out["loss"] = composed.detach()

    ours()
    theirs()
    check_close(f"loss {n_rows}x{n_cols}", [loss, gx], [out["loss"], xr.grad])
    repeat = args.repeat if n_rows * n_cols >= LOSS_LARGE else args.repeat * 20
    name = f"{n_rows}x{n_cols}" if n_cols > 1 else f"{n_rows} elements"
    row = measure("deeppose loss fwd+bwd", name, device, ours, theirs, timer, args, repeat)
    # Bytes our two kernels must move: forward reads x, t, v; backward reads x, t, v, writes gx.
    moved = 7 * x.numel() * x.element_size()
    row.extra["ours_gbps"] = moved / row.ours_ms / 1e6
    if copy_gbps:
        row.extra["copy_gbps"] = copy_gbps
    return row


def copy_bandwidth_gbps(device: str, timer: Timer) -> float:
    """Device-to-device copy of 256 MiB: bytes read + written per second, in GB/s."""
    src = torch.empty(64 << 20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(timer(lambda: dst.copy_(src), 10) for _ in range(5))
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ---- report ------------------------------------------------------------------------------------

def print_header():
    print(f"{'benchmark':<24} {'case':<22} {'dev':<5} {'ours ms (IQR)':>18} "
          f"{'torch ms (IQR)':>18} {'ours/torch (IQR)':>18}  notes", flush=True)


def print_row(row: Row):
    notes = ", ".join(f"{k}={v:.1f}" for k, v in row.extra.items())
    print(f"{row.group:<24} {row.name:<22} {row.device:<5} "
          f"{row.ours_ms:>9.3f} ({row.ours_iqr_ms:>6.3f}) "
          f"{row.torch_ms:>9.3f} ({row.torch_iqr_ms:>6.3f}) "
          f"{row.ratio:>9.2f}x ({row.ratio_iqr:>5.2f})  {notes}", flush=True)


def environment(devices) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "ops_build": ops.build_info(), "devices": devices}
    if "cuda" in devices:
        env["gpu"] = torch.cuda.get_device_name()
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
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved timing rounds per row (default: 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--repeat", type=int, default=3,
                   help="calls per timed round (small loss rows use 20x this; default: 3)")
    p.add_argument("--out", type=Path, default=None,
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
    return args


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
    env = environment(devices)
    env["threads"] = threads["torch"]
    print(f"ops build: {env['ops_build']}; torch {env['torch']} with {env['torch_threads']} "
          f"threads; {env['cpu_count']} CPUs" + (f"; GPU {env['gpu']}" if 'gpu' in env else ""))
    print(f"{args.rounds} interleaved rounds x {args.repeat} calls after {args.warmup} warm-up "
          f"rounds; medians with interquartile range", flush=True)
    rows: List[Row] = []
    payload = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows}
    print_header()
    try:
        for device in devices:
            timer = Timer(device)
            if args.only in (None, "conv"):
                for batch in args.batches:
                    for layer in CONV_LAYERS:
                        rows.append(bench_conv(layer, batch, device, args, timer))
                        print_row(rows[-1])
            if args.only in (None, "loss"):
                copy_gbps = copy_bandwidth_gbps(device, timer) if device == "cuda" else None
                for batch in LOSS_BATCHES:
                    rows.append(bench_loss(batch, LOSS_OUTPUTS, device, args, timer, copy_gbps))
                    print_row(rows[-1])
                rows.append(bench_loss(LOSS_LARGE, 1, device, args, timer, copy_gbps))
                print_row(rows[-1])
    finally:
        # Whatever was measured is kept, even when a later row fails.
        if args.out:
            payload["rows"] = [asdict(r) for r in rows]
            write_json(args.out, payload)
            print(f"wrote {args.out}")
    conv = [r.ratio for r in rows if r.group.startswith("conv")]
    if conv:
        print(f"conv fwd+bwd, ours/torch over {len(conv)} rows: median "
              f"{statistics.median(conv):.2f}x, worst {max(conv):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
