"""TensorFlow's instrument (profiler.instrument.tensorflow) beyond the cross-framework checks:
removal leaves the layers' own ``call`` and records nothing, the markers are identities (outputs
bit for bit, gradients unchanged), the output marker fires once before any layer's backward,
the first layer's backward holds its weight-gradient work, parallel branches (which TensorFlow's
tape would interleave) get one disjoint range each, shared layers get one range per call, and
tf.function traces the instrumented model unchanged."""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from profiler.analysis.nesting import check_nesting
from profiler.recorder import Recorder
from profiler.engine import profile
from profiler.targets import WorkloadTarget
from profiler.workloads import build_workload

instrument_module = pytest.importorskip("profiler.instrument.tensorflow")
Instrument = instrument_module.Instrument

TINY = dict(batch_size=4, train_size=16, test_size=4)


class TinyWorkload:
    """The slice of the workload interface an Instrument reads, around any Keras layers."""

    framework = "tensorflow"
    device = "cpu"

    def __init__(self, named_layers):
        self._layers = list(named_layers)

    def named_layers(self):
        return list(self._layers)


class SlowScale(keras.layers.Layer):
    """y = x * w, whose gradient sleeps ``seconds`` first: a layer whose backward work is known
    (the sleep stands for its weight-gradient computation)."""

    def __init__(self, seconds, **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer="ones", name="w")

    def call(self, x):
        seconds = self.seconds

        @tf.custom_gradient
        def scale(x, w):
            def grad(dy):
                time.sleep(seconds)
                return dy * w, tf.reduce_sum(dy * x)
            return x * w, grad
        return scale(x, tf.convert_to_tensor(self.w))


def layer_ranges(timeline, direction):
    return sorted((r for r in timeline.ranges if r.kind == "layer" and r.direction == direction),
                  key=lambda r: r.start_ns)


def backward_step(instrument, forward, x, variables):
    """One forward on a fresh tape (x not watched, as an image batch), a sum loss, the
    gradients, finish_backward; returns (output, gradients)."""
    with tf.GradientTape() as tape:
        output = instrument.mark_output(forward(x))
        loss = tf.reduce_sum(output * tf.range(1, output.shape[-1] + 1, dtype=output.dtype))
    grads = tape.gradient(loss, variables)
    instrument.finish_backward()
    return output, grads


def test_remove_restores_the_layers_call_and_install_is_idempotent():
    workload = build_workload("tensorflow", model="resnet20", **TINY)
    recorder = Recorder()
    instrument = Instrument(workload, recorder)
    instrument.install()
    wrappers = [vars(layer)["call"] for _, layer in workload.named_layers()]
    instrument.install()
    assert [vars(layer)["call"] for _, layer in workload.named_layers()] == wrappers
    instrument.remove()
    instrument.remove()
    for _, layer in workload.named_layers():
        assert "call" not in vars(layer)
        assert layer.call.__func__ is type(layer).call
    fired = []
    instrument.on_output_grad = lambda: fired.append(True)
    batch = next(iter(workload.make_loader("train")))
    workload.backward(workload.loss_forward(workload.forward(batch), batch))
    instrument.finish_backward()
    assert recorder.timeline.ranges == [] and fired == []


@pytest.mark.parametrize("model", ["resnet20", "deeppose"])
def test_instrumentation_changes_no_output_and_no_gradient_beyond_rounding(model):
    # dropout 0: Keras' dropout masks come from a seed generator that moves on every call.
    workload = build_workload("tensorflow", model=model, dropout=0.0,
                              **dict(TINY, batch_size=2))
    batch = next(iter(workload.make_loader("train")))

    def forward_backward():
        output = workload.forward(batch)
        workload.backward(workload.loss_forward(output, batch))
        return output.numpy(), [g.numpy() for g in workload._grads]

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
    names = [name for name, _ in workload._trainable]
    for name, grad, plain in zip(names, grads, plain_grads):
        if model == "deeppose":
            # Every layer input feeds one op: no sum of gradients is regrouped.
            np.testing.assert_array_equal(grad, plain, err_msg=name)
        else:
            # Batch norm's input feeds several ops: TensorFlow sums their gradients at the
            # input marker first (see the module docstring), a different float rounding.
            np.testing.assert_allclose(grad, plain, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(params=["record_operation", "custom_gradient"])
def marker_path(request, monkeypatch):
    """Both ways a marker can be made: the fast tape recording and tf.custom_gradient."""
    monkeypatch.setattr(instrument_module, "USE_RECORD_OPERATION",
                        request.param == "record_operation")
    return request.param


def test_markers_pass_values_and_gradients_through_unchanged(marker_path):
    dense = [keras.layers.Dense(3, name=f"d{i}") for i in range(3)]
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)

    def forward(h):
        for layer in dense:
            h = tf.nn.relu(layer(h))
        return h

    forward(x)
    variables = [v for layer in dense for v in layer.trainable_variables]
    plain_output, plain_grads = backward_step(Instrument(TinyWorkload([]), Recorder()),
                                              forward, x, variables)
    instrument = Instrument(TinyWorkload([(layer.name, layer) for layer in dense]), Recorder())
    instrument.install()
    output, grads = backward_step(instrument, forward, x, variables)
    instrument.remove()
    np.testing.assert_array_equal(output.numpy(), plain_output.numpy())
    for grad, plain in zip(grads, plain_grads):
        np.testing.assert_array_equal(grad.numpy(), plain.numpy())
    assert len(layer_ranges(instrument.recorder.timeline, "backward")) == 3


def test_output_marker_fires_once_before_any_layer_backward():
    layer = keras.layers.Dense(2, name="fc")
    instrument = Instrument(TinyWorkload([("fc", layer)]), Recorder())
    instrument.install()
    calls = []
    instrument.on_output_grad = lambda: calls.append(time.perf_counter_ns())
    x = tf.ones((2, 3))
    with tf.GradientTape() as tape:
        y = layer(x)
        marked = instrument.mark_output(y)
        loss = tf.reduce_sum(marked * tf.constant([[1.0, -2.0], [3.0, 0.5]]))
    grad_y, _ = tape.gradient(loss, [y, layer.kernel])
    instrument.finish_backward()
    np.testing.assert_array_equal(marked.numpy(), y.numpy())
    np.testing.assert_array_equal(grad_y.numpy(), [[1.0, -2.0], [3.0, 0.5]])
    assert len(calls) == 1
    (fc_backward,) = layer_ranges(instrument.recorder.timeline, "backward")
    assert calls[0] <= fc_backward.start_ns
    # An output no tape watches has nothing to mark.
    plain = layer(x)
    assert instrument.mark_output(plain) is plain
    instrument.remove()


def test_first_layer_backward_holds_its_weight_gradient(marker_path):
    """The first layer's input is not watched, so no input marker fires: its range must still
    hold its (here: sleeping) weight-gradient work, ended by finish_backward."""
    first, second = SlowScale(0.05, name="first"), SlowScale(0.0, name="second")
    instrument = Instrument(TinyWorkload([("first", first), ("second", second)]), Recorder())
    instrument.install()

    def forward(h):
        return second(first(h))

    forward(tf.ones((2, 3)))
    backward_step(instrument, forward, tf.ones((2, 3)),
                  first.trainable_variables + second.trainable_variables)
    instrument.remove()
    ranges = {r.name: r for r in layer_ranges(instrument.recorder.timeline, "backward")}
    assert ranges["first"].duration_ns >= 50e6
    assert ranges["second"].end_ns <= ranges["first"].start_ns


class Branches(keras.Model):
    """out = long(stem(x)) + short(stem(x)): after the add, TensorFlow's tape has both branches
    ready and would run them interleaved."""

    def __init__(self):
        super().__init__()
        self.stem = SlowScale(0.0, name="stem")
        self.short = SlowScale(0.08, name="short")
        self.long1 = SlowScale(0.04, name="long1")
        self.long2 = SlowScale(0.04, name="long2")

    def call(self, x):
        h = self.stem(x)
        return self.long2(tf.nn.relu(self.long1(h))) + self.short(h)


def test_parallel_branches_get_disjoint_ranges_each_holding_its_own_work(marker_path):
    model = Branches()
    x = tf.ones((2, 3))
    model(x)
    names = ["stem", "long1", "long2", "short"]
    instrument = Instrument(TinyWorkload([(n, getattr(model, n)) for n in names]), Recorder())
    instrument.install()
    backward_step(instrument, model, x, model.trainable_variables)
    instrument.remove()
    timeline = instrument.recorder.timeline
    check_nesting(timeline)
    backward = layer_ranges(timeline, "backward")
    # One at a time, in reverse call order.
    assert [r.name for r in backward] == ["short", "long2", "long1", "stem"]
    assert all(a.end_ns <= b.start_ns for a, b in zip(backward, backward[1:]))
    seconds = {r.name: r.duration_ns / 1e9 for r in backward}
    assert 0.08 <= seconds["short"] < 0.12          # not long1's or long2's sleep as well
    assert 0.04 <= seconds["long2"] < 0.08
    assert 0.04 <= seconds["long1"] < 0.08


def test_a_layer_called_twice_gets_a_range_per_call():
    layer = keras.layers.Dense(3, name="shared")
    x = tf.ones((2, 3))
    layer(x)
    instrument = Instrument(TinyWorkload([("shared", layer)]), Recorder())
    instrument.install()
    backward_step(instrument, lambda h: layer(tf.nn.relu(layer(h))), x,
                  layer.trainable_variables)
    instrument.remove()
    timeline = instrument.recorder.timeline
    check_nesting(timeline)
    assert len(layer_ranges(timeline, "forward")) == 2
    assert len(layer_ranges(timeline, "backward")) == 2


def test_tf_function_traces_the_instrumented_model_unchanged():
    dense = keras.layers.Dense(2, name="fc")
    x = tf.constant([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    eager_output = dense(x)
    instrument = Instrument(TinyWorkload([("fc", dense)]), Recorder())
    instrument.install()

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            y = instrument.mark_output(dense(x))
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, dense.kernel)

    y, grad = step(x)
    instrument.remove()
    np.testing.assert_array_equal(y.numpy(), eager_output.numpy())
    np.testing.assert_allclose(grad.numpy(), np.repeat(x.numpy().sum(0)[:, None], 2, axis=1))
    # Gradient functions run while the graph is built: the wrapper records nothing there.
    assert instrument.recorder.timeline.ranges == []


def test_resnet_backward_runs_layer_by_layer_in_reverse_forward_order():
    workload = build_workload("tensorflow", model="resnet20", **TINY)
    result = profile(WorkloadTarget(workload), warmup=0, steps=1, overhead_steps=0)
    assert result.doc["errors"] == []
    check_nesting(result.timeline)
    forward = [r.name for r in layer_ranges(result.timeline, "forward")]
    backward = layer_ranges(result.timeline, "backward")
    assert [r.name for r in backward] == forward[::-1]
    assert all(a.end_ns <= b.start_ns for a, b in zip(backward, backward[1:]))
    phases = {r.name: r for r in result.timeline.ranges if r.kind == "phase"}
    assert phases["backward"].start_ns <= backward[0].start_ns
    assert backward[-1].end_ns <= phases["backward"].end_ns


def test_a_forward_that_raises_closes_its_range_and_leaves_the_layer_removable():
    class Failing(keras.layers.Layer):
        def call(self, x):
            raise RuntimeError("boom")

    layer = Failing(name="failing")
    instrument = Instrument(TinyWorkload([("failing", layer)]), Recorder())
    instrument.install()
    with pytest.raises(RuntimeError, match="boom"):
        layer(tf.ones((1, 2)))
    (forward,) = layer_ranges(instrument.recorder.timeline, "forward")
    assert forward.name == "failing"
    instrument.remove()
    assert "call" not in vars(layer)


def test_phase_sync_and_device_clock_only_on_the_gpu():
    cpu = Instrument(TinyWorkload([]), Recorder())
    assert cpu.phase_sync is False and cpu.device_clock() is None
    gpu_workload = TinyWorkload([])
    gpu_workload.device = "cuda"
    gpu = Instrument(gpu_workload, Recorder())     # the clock is made, not used: no GPU here
    assert gpu.phase_sync is True
    assert isinstance(gpu.device_clock(), instrument_module.SyncedDeviceClock)
    assert any(note.startswith("GPU") for note in gpu.notes)


def test_notes_say_onednn_layout_and_transposes():
    """The report's notes say whether oneDNN was on, which layout TensorFlow's CPU conv trains in
    here (as the adapter's probe found it), and what the Keras workload transposes."""
    import ops.tensorflow as ops_tf
    workload = build_workload("tensorflow", model="resnet20", **TINY)
    notes = Instrument(workload, Recorder()).notes
    state = {True: "on", False: "off", None: "unknown"}[ops_tf.onednn_enabled()]
    layout = [n for n in notes if n.startswith("TensorFlow ") and "oneDNN" in n]
    assert len(layout) == 1 and f"oneDNN ops {state}" in layout[0], notes
    trains_nchw = ops_tf.cpu_conv_layout("SAME", "float32") == "NCHW"
    assert ("in NCHW" in layout[0]) == trains_nchw, layout
    assert workload.layout_note in notes and "channels_last (NHWC)" in workload.layout_note
    assert Instrument(TinyWorkload([]), Recorder()).notes.count(workload.layout_note) == 0
