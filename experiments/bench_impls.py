"""Benchmark: each loss and conv impl against the framework's own, in every framework.

    python -m experiments.bench_impls                   # CPU (and GPU where there is one)
    python -m experiments.bench_impls --frameworks torch --rounds 20 --out runs/impls.json

The first measurement of the classic hypothesis "PyTorch trains faster than Chainer because its
loss backward runs natively": forward + backward time of the DeepPose loss at batch 1..256 x 28
outputs, and of one ResNet-for-CIFAR conv layer, for every impl (ops.impls), as a ratio to
"autograd" (loss) or "framework" (conv) measured in the same interleaved round. Below 1 is
faster than the framework's own. Before timing, every impl's loss/output and input gradient is
checked against the baseline's; a wrong impl is reported, never timed.

Chainer's "native" is the same Function as its "kernel" (Chainer has no C++ op registry), so
its two rows measure the same code twice: their difference is the noise floor.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Dict, List

import numpy as np

import ops
from experiments.timing import Timer, add_threads_argument, apply_threads, interleaved, summarize
from ops.frameworks import FRAMEWORKS
from ops.impls import CONV_IMPLS, LOSS_IMPLS
from profiler.console import output_file
from profiler.report import write_json_atomic

LOSS_BATCHES = [1, 8, 32, 128, 256]
LOSS_OUTPUTS = 28  # 14 joints x (x, y)
CONV_LAYER = dict(name="3x3 16->16 @32", cin=16, cout=16, size=32, k=3, stride=1, padding=1)


# ---- per framework: build a fwd+bwd closure for one impl, returning (value, input grad) ------

class TorchCase:
    name = "torch"

    def __init__(self, device: str):
        import torch
        from ops import torch as adapter
        self.torch, self.adapter, self.device = torch, adapter, device

    def tensor(self, array, grad=False):
        return self.torch.tensor(array, device=self.device, requires_grad=grad)

    def loss_step(self, impl, x, t, v) -> Callable[[], tuple]:
        xt, tt, vt = self.tensor(x, grad=True), self.tensor(t), self.tensor(v)

        def step():
            xt.grad = None
            loss = self.adapter.deeppose_loss(xt, tt, vt, impl=impl)
            loss.backward()
            return loss, xt.grad
        return step

    def conv_step(self, impl, x, w, b, layer) -> Callable[[], tuple]:
        xt, wt, bt = self.tensor(x, grad=True), self.tensor(w, grad=True), self.tensor(b, True)

        def step():
            xt.grad = wt.grad = bt.grad = None
            y = self.adapter.conv2d(xt, wt, bt, stride=layer["stride"],
                                    padding=layer["padding"], impl=impl)
            y.backward(self.torch.ones_like(y))
            return y, xt.grad
        return step

    def to_numpy(self, value):
        return value.detach().cpu().numpy()

    def synchronize(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def impl_support(self, kind):
        return self.adapter.impl_support(kind, self.device)


class ChainerCase:
    name = "chainer"

    def __init__(self, device: str):
        from ops import chainer as adapter
        from ops.chainer.loader import load_chainer
        self.chainer, self.adapter, self.device = load_chainer(), adapter, device
        if device == "cuda":
            import cupy
            self.xp = cupy
        else:
            self.xp = np

    def array(self, array):
        return self.xp.asarray(array)

    def loss_step(self, impl, x, t, v) -> Callable[[], tuple]:
        xv = self.chainer.Variable(self.array(x))
        ta, va = self.array(t), self.array(v)

        def step():
            xv.cleargrad()
            loss = self.adapter.deeppose_loss(xv, ta, va, impl=impl)
            loss.backward()
            return loss.array, xv.grad
        return step

    def conv_step(self, impl, x, w, b, layer) -> Callable[[], tuple]:
        xv, wv, bv = (self.chainer.Variable(self.array(a)) for a in (x, w, b))

        def step():
            for var in (xv, wv, bv):
                var.cleargrad()
            y = self.adapter.conv2d(xv, wv, bv, stride=layer["stride"],
                                    padding=layer["padding"], impl=impl)
            y.grad = self.xp.ones_like(y.array)
            y.backward()
            return y.array, xv.grad
        return step

    def to_numpy(self, value):
        return value.get() if hasattr(value, "get") else np.asarray(value)

    def synchronize(self):
        if self.device == "cuda":
            self.xp.cuda.get_current_stream().synchronize()

    def impl_support(self, kind):
        return self.adapter.impl_support(kind, self.device)


class TensorFlowCase:
    name = "tensorflow"

    def __init__(self, device: str):
        import tensorflow as tf
        from ops import tensorflow as adapter
        if device == "cuda" and not tf.config.list_physical_devices("GPU"):
            raise ImportError("TensorFlow sees no GPU (tensorflow-cpu, or no driver/GPU)")
        self.tf, self.adapter, self.device = tf, adapter, device
        # Every tensor and op of a step, its gradient included, on one device: TensorFlow
        # would otherwise place unscoped ops on the GPU wherever it has one.
        self.tf_device = "/GPU:0" if device == "cuda" else "/CPU:0"

    def tensor(self, array):
        with self.tf.device(self.tf_device):
            return self.tf.constant(array)

    def loss_step(self, impl, x, t, v) -> Callable[[], tuple]:
        tf = self.tf
        xt, tt, vt = self.tensor(x), self.tensor(t), self.tensor(v)

        def step():
            with tf.device(self.tf_device):
                with tf.GradientTape() as tape:
                    tape.watch(xt)
                    loss = self.adapter.deeppose_loss(xt, tt, vt, impl=impl)
                return loss, tape.gradient(loss, xt)
        return step

    def conv_step(self, impl, x, w, b, layer) -> Callable[[], tuple]:
        tf = self.tf
        xt, wt, bt = self.tensor(x), self.tensor(w), self.tensor(b)

        def step():
            with tf.device(self.tf_device):
                with tf.GradientTape() as tape:
                    tape.watch([xt, wt, bt])
                    y = self.adapter.conv2d(xt, wt, bt, stride=layer["stride"],
                                            padding=layer["padding"], impl=impl)
                gx, _, _ = tape.gradient(y, [xt, wt, bt])  # upstream gradient: ones
                return y, gx
        return step

    def to_numpy(self, value):
        return value.numpy()

    def synchronize(self):
        if self.device == "cuda":
            self.tf.test.experimental.sync_devices()

    def impl_support(self, kind):
        return self.adapter.impl_support(kind, "gpu" if self.device == "cuda" else "cpu")


class MXNetCase:
    name = "mxnet"

    def __init__(self, device: str):
        import mxnet as mx
        from ops import mxnet as adapter
        self.mx, self.adapter, self.device = mx, adapter, device
        self.context = mx.gpu() if device == "cuda" else mx.cpu()

    def array(self, array, grad=False):
        out = self.mx.nd.array(array, ctx=self.context, dtype=array.dtype)
        if grad:
            out.attach_grad()  # grad_req 'write': each backward overwrites the gradient
        return out

    def loss_step(self, impl, x, t, v) -> Callable[[], tuple]:
        xa, ta, va = self.array(x, grad=True), self.array(t), self.array(v)

        def step():
            with self.mx.autograd.record():
                loss = self.adapter.deeppose_loss(xa, ta, va, impl=impl)
            loss.backward()
            xa.grad.wait_to_read()  # MXNet queues work: the step ends when its result exists
            return loss, xa.grad
        return step

    def conv_step(self, impl, x, w, b, layer) -> Callable[[], tuple]:
        xa, wa, ba = (self.array(a, grad=True) for a in (x, w, b))

        def step():
            with self.mx.autograd.record():
                y = self.adapter.conv2d(xa, wa, ba, stride=layer["stride"],
                                        padding=layer["padding"], impl=impl)
            y.backward(self.mx.nd.ones_like(y))
            for array in (xa, wa, ba):
                array.grad.wait_to_read()
            return y, xa.grad
        return step

    def to_numpy(self, value):
        return value.asnumpy()

    def synchronize(self):
        self.mx.nd.waitall()

    def impl_support(self, kind):
        return self.adapter.impl_support(kind, self.device)


# One case class per framework of the registry (ops.frameworks), in its order.
CASES = {"torch": TorchCase, "chainer": ChainerCase, "tensorflow": TensorFlowCase,
         "mxnet": MXNetCase}


# ---- measuring --------------------------------------------------------------------------------

def check_agreement(case, label: str, steps: Dict[str, Callable], baseline: str):
    """Every impl's (value, input grad) against the baseline's, in float32."""
    ref_value, ref_grad = (case.to_numpy(a) for a in steps[baseline]())
    for impl, step in steps.items():
        value, grad = (case.to_numpy(a) for a in step())
        for what, got, want in (("value", value, ref_value), ("grad", grad, ref_grad)):
            scale = max(float(np.abs(want).max()), 1e-30)
            err = float(np.abs(got - want).max())
            if not err <= 1e-4 * scale:
                raise SystemExit(f"{case.name} {label}: impl={impl} {what} differs from "
                                 f"impl={baseline} by {err:.3g} (scale {scale:.3g}); not timing")


def bench_group(case, label, steps, baseline, args, timer, repeat) -> dict:
    check_agreement(case, label, steps, baseline)
    samples = interleaved(steps, timer, args.rounds, args.warmup, repeat)
    stats = summarize(samples, baseline)
    row = {"framework": case.name, "device": case.device, "case": label, "baseline": baseline,
           "impls": stats}
    print_row(row)
    return row


def loss_rows(case, args, timer) -> List[dict]:
    support = case.impl_support("loss")
    impls = [i for i in LOSS_IMPLS if support[i] is None]
    rows = []
    for batch in args.loss_batches:
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, LOSS_OUTPUTS)).astype(np.float32)
        t = rng.standard_normal((batch, LOSS_OUTPUTS)).astype(np.float32)
        v = (rng.random((batch, LOSS_OUTPUTS)) < 0.8).astype(np.float32)
        steps = {impl: case.loss_step(impl, x, t, v) for impl in impls}
        rows.append(bench_group(case, f"deeppose loss {batch}x{LOSS_OUTPUTS}", steps, "autograd",
                                args, timer, args.repeat * 10))
    return rows


def conv_rows(case, args, timer) -> List[dict]:
    support = case.impl_support("conv")
    impls = [i for i in CONV_IMPLS if support[i] is None]
    layer = CONV_LAYER
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.conv_batch, layer["cin"], layer["size"], layer["size"]))
    w = rng.standard_normal((layer["cout"], layer["cin"], layer["k"], layer["k"])) * 0.1
    b = rng.standard_normal(layer["cout"])
    x, w, b = (a.astype(np.float32) for a in (x, w, b))
    steps = {impl: case.conv_step(impl, x, w, b, layer) for impl in impls}
    return [bench_group(case, f"conv {layer['name']} b{args.conv_batch}", steps, "framework",
                        args, timer, args.repeat)]


def print_row(row: dict):
    cells = []
    for impl, s in row["impls"].items():
        cells.append(f"{impl} {s['median_ms']:.3f} ms = {s['ratio']:.2f}x "
                     f"(IQR {s['ratio_iqr']:.2f})")
    print(f"{row['framework']:<8} {row['device']:<5} {row['case']:<26} " + " | ".join(cells),
          flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench_impls",
        description="Time every loss and conv impl against the framework's own (autograd / "
                    "framework) in each framework, forward + backward, in interleaved "
                    "rounds; prints medians and ratios (< 1 is faster than the framework).")
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS,
                   default=list(FRAMEWORKS), help=f"default: {' '.join(FRAMEWORKS)}")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="'all' = the CPU plus the GPU where one is usable (default)")
    p.add_argument("--loss-batches", type=int, nargs="+", default=LOSS_BATCHES,
                   help=f"loss batch sizes, each x {LOSS_OUTPUTS} outputs (default: "
                        f"{' '.join(map(str, LOSS_BATCHES))})")
    p.add_argument("--conv-batch", type=int, default=32, help="conv batch size (default: 32)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (default: 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--repeat", type=int, default=3,
                   help="calls per timed sample; loss rows use 10x this (default: 3)")
    p.add_argument("--out", type=output_file, help="also write all rows as JSON here")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 2:
        p.error(f"--rounds must be >= 2 to report a spread, got {args.rounds}")
    for name in ("repeat", "conv_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.loss_batches) < 1:
        p.error("--warmup must be >= 0 and --loss-batches >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before any framework starts work (TensorFlow sizes its pools then).
    threads = apply_threads(args.threads, args.frameworks)
    devices = ["cpu"]
    if args.device in ("cuda", "all") and ops.cuda_available():
        devices.append("cuda")
    elif args.device == "cuda":
        print("--device cuda: no usable GPU here (ops.cuda_available() is False)",
              file=sys.stderr)
        return 2
    if args.device == "cuda":
        devices = ["cuda"]
    rows, failures = [], []
    print(f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds; ratio = impl / "
          f"baseline in the same round, median (IQR)", flush=True)
    try:
        for framework in args.frameworks:
            for device in devices:
                try:
                    case = CASES[framework](device)
                except ImportError as error:
                    failures.append(f"{framework} on {device}: {error}")
                    print(f"{framework:<8} {device:<5} skipped: {error}", flush=True)
                    continue
                timer = Timer(device if framework == "torch" else "cpu",
                              synchronize=case.synchronize)
                rows += loss_rows(case, args, timer)
                rows += conv_rows(case, args, timer)
    finally:
        if args.out:  # whatever was measured is kept, even when a later row fails
            # Every value is JSON already (args as strings); write_json_atomic makes no folders.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, {"rows": rows, "failures": failures,
                                         "platform": platform.platform(), "threads": threads,
                                         "args": {k: str(v) for k, v in vars(args).items()}})
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
