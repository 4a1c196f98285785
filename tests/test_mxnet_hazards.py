"""MXNet 1.9.1 hazards that ops.mxnet handles for whoever uses it (documented in
ops/mxnet/loader.py's defect list), shown here with ops.mxnet alone, no workload: the kernel
impl's backward and a Trainer's queued update waiting on each other, oneDNN's in-place reorder
of a convolution's weight in inference, queued Python work at interpreter exit; and the probe
of whether oneDNN is active at all. A hang must fail a test, not stall the suite: the hazards
that hang run in a child process with a timeout."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

import ops.mxnet as om  # noqa: E402
from ops import reference  # noqa: E402
from ops.mxnet import loader  # noqa: E402
from tests.kernel_calls import pairs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 120


def run_child(script: str, **env) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter from the repository root; a hang fails the test."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    except subprocess.TimeoutExpired as expired:
        shown = [(out or b"").decode(errors="replace")[-2000:]
                 for out in (expired.stdout, expired.stderr)]
        pytest.fail(f"the child hung (killed after {CHILD_TIMEOUT_S} s); its output so far: "
                    f"{shown[0]!r}, {shown[1]!r}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


# ---- defect 4: the kernel impl's backward and the optimizer's queued update ---------------

_TRAINING_LOOP = """
    import mxnet as mx
    import numpy as np
    import ops.mxnet as om

    def train(wait_after_backward):
        net = mx.gluon.nn.HybridSequential()
        net.add(om.Conv2D(8, 3, padding=1, in_channels=3, impl="kernel"),
                mx.gluon.nn.Activation("relu"),
                om.Conv2D(8, 3, padding=1, in_channels=8, impl="kernel"),
                mx.gluon.nn.Dense(4, in_units=8 * 16 * 16))
        net.initialize()
        rng = np.random.default_rng(0)
        for name, param in sorted(net.collect_params().items()):
            param.set_data(mx.nd.array(rng.standard_normal(param.shape) * 0.1))
        trainer = mx.gluon.Trainer(net.collect_params(), "sgd",
                                   {"learning_rate": 0.1, "momentum": 0.9}, kvstore=None)
        x = mx.nd.array(rng.random((4, 3, 16, 16)))
        t = mx.nd.array(rng.random((4, 4)))
        losses = []
        for _ in range(4):
            with mx.autograd.record():
                loss = om.mse_loss(net(x), t, impl="kernel")
            loss.backward()
            if wait_after_backward:
                mx.nd.waitall()
            trainer.step(1)
            losses.append(loss)  # read at the end: nothing in the loop waits
        return ([float(l.asscalar()) for l in losses],
                [p.data().asnumpy() for _, p in sorted(net.collect_params().items())])

    queued_losses, queued_weights = train(wait_after_backward=False)
    print("queued", queued_losses, flush=True)
    waited_losses, waited_weights = train(wait_after_backward=True)
    assert queued_losses == waited_losses, (queued_losses, waited_losses)
    assert all(np.array_equal(a, b) for a, b in zip(queued_weights, waited_weights))
    print("same", flush=True)
"""


def test_kernel_impl_trains_with_queued_updates_without_deadlock():
    """A plain Gluon training loop over the kernel impls (imperative Functions), nothing waiting
    for MXNet's engine: the update Trainer.step queues for a weight waits for the gradient the
    Function's backward writes; a backward waiting for that weight's pending writes would never
    run (before the adapter avoided it, this hung at the second step's forward). The losses and
    weights are bit-identical to the same loop waiting after every backward, where the update
    cannot be queued early: reading the saved arrays without waiting reads the same data."""
    done = run_child(_TRAINING_LOOP)
    assert done.stdout.split()[-1] == "same", done.stdout


# ---- defect 5: oneDNN's in-place reorder of a convolution weight in inference -------------

class _TwoConvs(mx.gluon.HybridBlock):
    def __init__(self, impl):
        super().__init__()
        with self.name_scope():
            self.first = om.Conv2D(16, 3, padding=1, in_channels=16, impl=impl)
            self.second = om.Conv2D(16, 3, padding=1, in_channels=16, impl=impl)

    def hybrid_forward(self, F, x):
        return self.second(F.relu(self.first(x)))


def _blocked(array) -> bool:
    """Whether MXNet refuses to export ``array`` for its oneDNN layout (waits for it)."""
    mx.nd.waitall()  # oneDNN queues its weight reorder while the convolution runs
    return loader._in_onednn_layout(array)


def test_conv_weights_stay_plain_and_correct_after_inference():
    """MXNet's inference-mode convolution (impl='framework') reorders the weight in place into
    oneDNN's blocked layout where oneDNN is active (shown on Gluon's own Conv2D). An
    ops.mxnet.Conv2D called imperatively puts it back: the weight exports, takes NumPy and
    feeds the kernel impl; in a hybridized parent, whose graph runs the convolution without
    calling the layer, the weight stays blocked until the impl switches to our kernels, which
    puts it back too, so the kernel impl in that graph (a CustomOp, which reads a blocked
    weight as garbage) computes the same outputs."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 8, 8)).astype(np.float32)
    active = loader.onednn_active()

    gluon_conv = mx.gluon.nn.Conv2D(16, 3, padding=1, in_channels=16)
    gluon_conv.initialize()
    gluon_conv(mx.nd.array(x)).asnumpy()
    assert _blocked(gluon_conv.weight.data()) == active  # the hazard itself, where it exists

    for hybridize in (False, True):
        net = _TwoConvs("framework")
        net.initialize()
        weights = [rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1 for _ in "ab"]
        for layer, w in zip((net.first, net.second), weights):
            layer.weight.set_data(mx.nd.array(w))
        if hybridize:
            net.hybridize()
        framework = net(mx.nd.array(x)).asnumpy()  # inference: not recording, not training
        layers = (net.first, net.second)
        blocked = [_blocked(layer.weight.data()) for layer in layers]
        assert blocked == [active and hybridize] * 2, (hybridize, blocked)
        for layer in layers:
            layer.impl = "kernel"
            assert not _blocked(layer.weight.data())
            layer.weight.set_data(layer.weight.data().asnumpy())  # NumPy into the weight
        net._clear_cached_op()
        kernel = net(mx.nd.array(x)).asnumpy()
        # Each output against the float64 reference, within the float32 rounding bound of each
        # convolution (the second's input error propagated through its weights).
        hidden = np.maximum(reference.conv2d(x, weights[0], None, **pairs(dict(padding=1))), 0)
        want = reference.conv2d(hidden, weights[1], None, **pairs(dict(padding=1)))
        bound_first = reference.conv2d_error_bound(x, weights[0], padding=(1, 1))[0]
        bound = (reference.conv2d_error_bound(hidden, weights[1], padding=(1, 1))[0]
                 + reference.conv2d(bound_first, np.abs(weights[1]), None,
                                    **pairs(dict(padding=1))))
        for name, got in (("framework", framework), ("kernel", kernel)):
            excess = np.abs(got - want) - bound
            assert excess.max() <= 0, (hybridize, name, float(excess.max()))


# ---- defect 6: queued Python work at interpreter exit -------------------------------------

_EXIT_WITH_QUEUED_WORK = """
    import mxnet as mx
    import ops.mxnet as om

    layer = om.Conv2D(8, 3, padding=1, in_channels=8, impl="kernel")
    layer.initialize()
    layer.hybridize()  # the kernel impl as a CustomOp: Python run on MXNet's custom-op thread
    x = mx.nd.ones((2, 8, 16, 16))
    x.attach_grad()
    slow = mx.nd.ones((300, 300))
    for _ in range(10):
        slow = mx.nd.dot(slow, slow) / 300
    with mx.autograd.record():
        y = layer(x + slow.sum() * 0)  # runs only after the slow chain
    y.backward()
    print("queued", flush=True)
    # no wait: the CustomOp's forward and backward are still queued as the interpreter exits
"""


def test_queued_kernel_work_does_not_hang_the_exit():
    """Importing ops.mxnet registers a drain of MXNet's queue at exit; without it the
    interpreter finalizes while the kernel impl's CustomOp is still queued, its Python code can
    no longer take the GIL and MXNet's shutdown waits for it forever (this child then hangs
    every time)."""
    done = run_child(_EXIT_WITH_QUEUED_WORK)
    assert done.stdout.split() == ["queued"], done.stdout


# ---- whether oneDNN is active: probed, not assumed ------------------------------------------

@pytest.mark.parametrize("enabled", ["0", "1"])
def test_onednn_active_follows_what_mxnet_does(enabled):
    """``MXNET_MKLDNN_ENABLED=0`` switches a oneDNN build's oneDNN off at run time, which
    ``mx.runtime.Features`` (compiled-in features) does not see; loader.onednn_active does."""
    done = run_child("""
        import mxnet as mx
        from ops.mxnet import loader
        print(mx.runtime.Features().is_enabled("MKLDNN"), loader.onednn_active())
    """, MXNET_MKLDNN_ENABLED=enabled)
    compiled, active = done.stdout.split()[-2:]
    assert active == str(compiled == "True" and enabled == "1"), done.stdout


def test_mxnet_after_tensorflow_is_an_import_error_not_a_crash():
    # Defect 8: `import tensorflow; import mxnet` kills the interpreter inside libmxnet.so.
    pytest.importorskip("tensorflow")
    proc = subprocess.run([sys.executable, "-c", "import tensorflow; import ops.mxnet"],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ImportError: ops.mxnet: TensorFlow is already imported" in proc.stderr
