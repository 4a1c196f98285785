"""Chainer's instrument (profiler.instrument.chainer) beyond the cross-framework checks: removal
leaves no hooks anywhere, instrumentation changes no output or gradient, the output marker is
an identity that fires once after the loss's backward, the first layer's backward range holds
its weight-gradient computation, layers whose backward nodes interleave get nested segments,
and a forward that raised leaves no hook behind."""

import time

import numpy as np
import pytest

from profiler.analysis.nesting import check_nesting
from profiler.recorder import Recorder
from profiler.engine import profile
from profiler.targets import WorkloadTarget
from profiler.workloads import build_workload

chainer_loader = pytest.importorskip("ops.chainer.loader")
chainer = chainer_loader.load_chainer()
instrument_module = pytest.importorskip("profiler.instrument.chainer")
Instrument = instrument_module.Instrument
F, L = chainer.functions, chainer.links

TINY = dict(batch_size=4, train_size=16, test_size=4)


class TinyWorkload:
    """The slice of the workload interface an Instrument reads, around any Chain."""

    framework = "chainer"
    on_gpu = False

    def __init__(self, net, names):
        self.net = net
        self._layers = [(name, getattr(net, name)) for name in names]

    def named_layers(self):
        return list(self._layers)


class TwoPaths(chainer.Link):
    """y_long = x W1 W2 W3 (three nodes deep), y_short = x W4 (one): a layer whose backward
    nodes another layer's node can run between (see test_interleaved_backward_nests)."""

    def __init__(self, n):
        super().__init__()
        with self.init_scope():
            for i in range(1, 5):
                setattr(self, f"W{i}", chainer.Parameter(np.eye(n, dtype=np.float32) * i))

    def forward(self, x):
        long = F.matmul(F.matmul(F.matmul(x, self.W1), self.W2), self.W3)
        return long, F.matmul(x, self.W4)


class Interleaving(chainer.Chain):
    def __init__(self, n=3):
        super().__init__()
        with self.init_scope():
            self.a = TwoPaths(n)
            self.b = L.Linear(n, n, initialW=np.eye(n, dtype=np.float32))

    def forward(self, x):
        long, short = self.a(x)
        return long + self.b(short)


class OneLinear(chainer.Chain):
    def __init__(self, n_in, n_out):
        super().__init__()
        with self.init_scope():
            self.fc = L.Linear(n_in, n_out)

    def forward(self, x):
        return self.fc(x)


def layer_ranges(timeline, direction):
    return sorted((r for r in timeline.ranges if r.kind == "layer" and r.direction == direction),
                  key=lambda r: r.start_ns)


def graph_nodes(variable):
    """Every FunctionNode behind ``variable``."""
    seen, todo = set(), [variable.creator_node]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(x.creator_node for x in node.inputs)
    return seen


def test_remove_leaves_no_hooks_and_install_is_idempotent():
    workload = build_workload("chainer", model="resnet20", **TINY)
    recorder = Recorder()
    instrument = Instrument(workload, recorder)
    instrument.install()
    instrument.install()
    assert all(len(link.local_link_hooks) == 1 for _, link in workload.named_layers())
    instrument.remove()
    instrument.remove()
    # Link.__call__'s hook-free path: no local link hooks, no thread-local link or function
    # hooks.
    assert all(link._n_local_link_hooks == 0 for _, link in workload.named_layers())
    assert not chainer.get_function_hooks() and not chainer._get_link_hooks()
    batch = next(iter(workload.make_loader("train")))
    loss = workload.loss_forward(workload.forward(batch), batch)
    assert all(node._n_local_function_hooks == 0 for node in graph_nodes(loss))
    workload.backward(loss)
    assert recorder.timeline.ranges == []


def test_hooks_live_only_on_layer_nodes_and_during_forward():
    workload = build_workload("chainer", model="resnet20", **TINY)
    instrument = Instrument(workload, Recorder())
    instrument.install()
    batch = next(iter(workload.make_loader("train")))
    output = workload.forward(batch)
    # The tagger is in the thread's function hooks only while a named link runs.
    assert not chainer.get_function_hooks()
    hooked = [n for n in graph_nodes(output) if n._n_local_function_hooks]
    assert len(hooked) == len(workload.named_layers())   # one node per link here
    assert {type(n).__name__ for n in hooked} == {"Convolution2DFunction",
                                                  "BatchNormalization", "LinearFunction"}
    instrument.remove()


@pytest.mark.parametrize("model", ["resnet20", "deeppose"])
def test_instrumentation_changes_no_output_or_gradient(model):
    # Batch 2: AlexNet's step is slow on the CPU, and the point is equality, not speed.
    workload = build_workload("chainer", model=model, **dict(TINY, batch_size=2))
    weights = workload.export_weights()
    batch = next(iter(workload.make_loader("train")))

    def forward_backward():
        workload.import_weights(weights)
        np.random.seed(0)            # Chainer's CPU dropout masks come from NumPy's RNG
        output = workload.forward(batch)
        workload.backward(workload.loss_forward(output, batch))
        return output.array.copy(), {path: p.grad.copy()
                                     for path, p in workload.net.namedparams()}

    plain_output, plain_grads = forward_backward()
    instrument = Instrument(workload, Recorder())
    instrument.install()
    marked = []
    instrument.on_output_grad = lambda: marked.append(True)
    original_forward = workload.forward
    workload.forward = lambda b: instrument.mark_output(original_forward(b))
    output, grads = forward_backward()
    instrument.finish_backward()
    instrument.remove()
    assert marked == [True]
    np.testing.assert_array_equal(output, plain_output)
    assert grads.keys() == plain_grads.keys()
    for path in grads:
        np.testing.assert_array_equal(grads[path], plain_grads[path], err_msg=path)


def test_output_marker_is_an_identity_called_after_the_loss_backward():
    net = OneLinear(3, 2)
    instrument = Instrument(TinyWorkload(net, ["fc"]), Recorder())
    instrument.install()
    calls = []
    instrument.on_output_grad = lambda: calls.append(time.perf_counter_ns())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = net(x)
    marked = instrument.mark_output(y)
    np.testing.assert_array_equal(marked.array, y.array)
    gy = np.array([[1, -2], [3, 0.5]], np.float32)
    loss = F.sum(marked * gy)
    loss.backward(retain_grad=True)
    instrument.finish_backward()
    assert len(calls) == 1
    np.testing.assert_array_equal(y.grad, gy)         # the marker passed it on untouched
    (fc_backward,) = layer_ranges(instrument.recorder.timeline, "backward")
    assert calls[0] <= fc_backward.start_ns
    # An output that needs no gradient has nothing to mark.
    with chainer.no_backprop_mode():
        plain = net(x)
    assert instrument.mark_output(plain) is plain
    instrument.remove()


def test_first_layer_backward_holds_its_weight_gradient(monkeypatch):
    """conv0's input needs no gradient; its range must contain the computation of its W's
    gradient (Convolution2DGradW), not end before it."""
    grad_w_class = chainer.functions.connection.convolution_2d.Convolution2DGradW
    original = grad_w_class.forward_cpu
    spans = []

    def timed(self, inputs):
        start = time.perf_counter_ns()
        out = original(self, inputs)
        spans.append((start, time.perf_counter_ns()))
        return out

    monkeypatch.setattr(grad_w_class, "forward_cpu", timed)
    workload = build_workload("chainer", model="resnet20", **TINY)
    result = profile(WorkloadTarget(workload), warmup=0, steps=1, overhead_steps=0)
    assert result.doc["errors"] == []
    check_nesting(result.timeline)
    backward = {r.name: r for r in layer_ranges(result.timeline, "backward")}
    convs = [name for name, link in workload.named_layers()
             if isinstance(link, chainer.links.Convolution2D)]
    assert len(spans) == len(convs)
    for name in convs:
        r = backward[name]
        inside = [s for s in spans if r.start_ns <= s[0] and s[1] <= r.end_ns]
        assert len(inside) == 1, name
    first = backward[convs[0]]
    assert first.name == workload.named_layers()[0][0]
    inside = next(s for s in spans if first.start_ns <= s[0] and s[1] <= first.end_ns)
    assert inside[1] - inside[0] > 0.5 * first.duration_ns


def test_interleaved_backward_nests():
    """Backprop order here: a's deepest node, then b's node, then a's other nodes: a gets two
    backward ranges around b's, and the ranges nest."""
    net = Interleaving()
    instrument = Instrument(TinyWorkload(net, ["a", "b"]), Recorder())
    instrument.install()
    x = np.ones((2, 3), np.float32)
    loss = F.sum(instrument.mark_output(net(x)))
    loss.backward()
    instrument.finish_backward()
    timeline = instrument.recorder.timeline
    check_nesting(timeline)
    assert [r.name for r in layer_ranges(timeline, "forward")] == ["a", "b"]
    backward = layer_ranges(timeline, "backward")
    assert [r.name for r in backward] == ["a", "b", "a"]
    assert [r.layer_type for r in backward] == ["TwoPaths", "Linear", "TwoPaths"]
    assert backward[0].end_ns <= backward[1].start_ns and \
        backward[1].end_ns <= backward[2].start_ns
    assert net.a.W4.grad is not None and net.a.W1.grad is not None
    assert instrument._open_backward is None and instrument._pending == {}
    instrument.remove()


def test_forward_that_raised_leaves_no_hook_behind():
    net = OneLinear(3, 3)
    instrument = Instrument(TinyWorkload(net, ["fc"]), Recorder())
    instrument.install()
    x = np.ones((2, 3), np.float32)
    with pytest.raises(chainer.utils.type_check.InvalidType):
        net(np.ones((2, 4), np.float32))        # a shape error inside the named link
    assert chainer.get_function_hooks()          # the tagger stays until the forward is over
    marked = instrument.mark_output(net(x))
    assert not chainer.get_function_hooks()
    F.sum(marked).backward()
    instrument.finish_backward()
    check_nesting(instrument.recorder.timeline)
    assert [r.name for r in layer_ranges(instrument.recorder.timeline, "forward")] == ["fc"]
    assert [r.name for r in layer_ranges(instrument.recorder.timeline, "backward")] == ["fc"]
    instrument.remove()
    assert not chainer.get_function_hooks()
