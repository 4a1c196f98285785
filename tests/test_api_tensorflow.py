"""profiler.api on a user's own Keras model and eager training loop: docs/your-own-model.md's
example as written, phases split at the right boundaries (tape.gradient, the Keras optimizer),
the layer table against the step, layer names and filters, the class attributes put back
exactly, and bad input (a step under tf.function included)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from profiler.api import LayerProfiler, profile_training  # noqa: E402
from profiler.instrument import tensorflow as instrument_tf  # noqa: E402
from profiler.report import validate_report  # noqa: E402
from tests.user_model_checks import profile_factory_cli  # noqa: E402

# What PhaseEvents replaces while installed, as it was before any test: checked after each
# profiler is closed (the very function objects, not look-alikes).
TAPE_METHODS = ("gradient", "jacobian", "batch_jacobian")
ORIGINAL_TAPE = {name: vars(tf.GradientTape)[name] for name in TAPE_METHODS}


def optimizer_methods():
    return {(cls, name): vars(cls)[name] for cls in instrument_tf._optimizer_classes()
            for name in ("apply_gradients", "apply") if name in vars(cls)}


def assert_restored(before):
    assert all(vars(tf.GradientTape)[name] is ORIGINAL_TAPE[name] for name in TAPE_METHODS)
    after = optimizer_methods()
    assert all(after[key] is original for key, original in before.items())


class TinyNet(keras.Model):
    """Not a seed workload: conv -> batch norm -> a Sequential head (which has no weights of
    its own, so its Dense is the layer, named "head/dense")."""

    def __init__(self, forward_sleep_s: float = 0.0):
        super().__init__(name="tiny_net")
        self.forward_sleep_s = forward_sleep_s
        self.conv = keras.layers.Conv2D(8, 3, padding="same", name="conv")
        self.bn = keras.layers.BatchNormalization(name="bn")
        self.head = keras.Sequential([keras.layers.Flatten(name="flatten"),
                                      keras.layers.Dense(10, name="dense")], name="head")

    def call(self, x, training=None):
        if self.forward_sleep_s:
            time.sleep(self.forward_sleep_s)
        return self.head(keras.ops.relu(self.bn(self.conv(x), training=training)))


def tiny_net(**kwargs) -> TinyNet:
    model = TinyNet(**kwargs)
    model(tf.zeros((1, 8, 8, 3)))          # Keras makes the weights at the first call
    return model


def batches(n=4, batch=4):
    """(images NHWC, labels) as the user's NumPy arrays."""
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, 8, 8, 3), dtype=np.float32),
             rng.integers(0, 10, batch)) for _ in range(n)]


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_readme_example_runs_as_written(tmp_path):
    before = optimizer_methods()
    model = tiny_net()
    opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dataset = tf.data.Dataset.from_tensor_slices(tuple(np.concatenate(a) for a in
                                                       zip(*batches(5)))).batch(4)
    prof = LayerProfiler(model, framework="tensorflow", warmup=1)
    for x, t in dataset:
        with prof.step():
            with tf.GradientTape() as tape:
                out = prof.mark_output(model(x, training=True))
                loss = loss_fn(t, out)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
    written = prof.report().save(tmp_path / "mine")
    report = json.loads(written["report"].read_text())
    validate_report(report)
    assert report["framework"] == "tensorflow" and report["model"] == "TinyNet"
    assert report["iters"] == 4 and report["warmup"] == 1 and report["batch_size"] == 4
    assert [layer["name"] for layer in report["layers"]] == ["conv", "bn", "head/dense"]
    assert [layer["type"] for layer in report["layers"]] == [
        "Conv2D", "BatchNormalization", "Dense"]
    # Each layer range nests in its phase: forward layers add up within the forward phase,
    # backward layers within the two backward phases; the first layer's backward (ended when
    # tape.gradient returns) is seen.
    phases = report["phases_ms"]
    assert sum(layer["forward_ms"] for layer in report["layers"]) <= phases["forward"]["mean"]
    assert sum(layer["backward_ms"] for layer in report["layers"]) <= (
        phases["backward"]["mean"] + phases["loss_backward"]["mean"])
    assert all(layer["backward_ms"] > 0 for layer in report["layers"])
    for phase in ("forward", "loss_forward", "loss_backward", "backward", "optimizer"):
        assert phases[phase]["mean"] > 0, phase
    assert any("User model TinyNet: runs as built (channels_last)" in n
               for n in report["notes"])
    for name in ("trace", "folded", "speedscope"):
        assert written[name].stat().st_size > 0
    prof.close()
    assert_restored(before)


# -------------------------------------------------------------------- phase boundaries

SLEEP = {"forward": 0.15, "loss_forward": 0.05, "loss_backward": 0.1, "backward": 0.2,
         "optimizer": 0.25}


def sleepy_mse(target, out):
    """An MSE whose forward and backward each sleep a known time (Keras' order)."""
    time.sleep(SLEEP["loss_forward"])

    @tf.custom_gradient
    def mse(out):
        def grad(dy):
            time.sleep(SLEEP["loss_backward"])
            return dy * 2 * (out - target) / tf.cast(tf.size(out), out.dtype)
        return tf.reduce_mean((out - target) ** 2), grad
    return mse(out)


class SlowScale(keras.layers.Layer):
    """y = x * w, whose gradient sleeps first (standing for its weight-gradient work)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer="ones", name="w")

    def call(self, x):
        @tf.custom_gradient
        def scale(x, w):
            def grad(dy):
                time.sleep(SLEEP["backward"])
                return dy * w, tf.reduce_sum(dy * x)
            return x * w, grad
        return scale(x, tf.convert_to_tensor(self.w))


class SleepyNet(keras.Model):
    """SlowScale first (its input, the image batch, is not watched: its backward ends when
    tape.gradient returns), then a dense layer."""

    def __init__(self):
        super().__init__(name="sleepy_net")
        self.scale = SlowScale(name="scale")
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = keras.layers.Dense(3, name="dense")

    def call(self, x, training=None):
        time.sleep(SLEEP["forward"])
        return self.dense(self.flatten(self.scale(x)))


class SleepySGD(keras.optimizers.SGD):
    """An override of ``apply`` (defined before any profiler is installed, as a user's
    optimizer is): its own time must count to the optimizer phase, once."""

    def apply(self, grads, trainable_variables=None):
        time.sleep(SLEEP["optimizer"])
        return super().apply(grads, trainable_variables)


def test_phases_split_at_the_boundaries():
    # Each phase holds one sleep of a distinct length: a phase that took a neighbour's sleep
    # (a boundary in the wrong place) would be at least 50 ms off; the tiny model's eager ops
    # around the sleeps take a few milliseconds (after a warm-up step), so 45 ms leaves room
    # for a loaded machine. TensorFlow's thread pools cannot be resized once its runtime has
    # started (another test file may have started it), so the model is small enough that its
    # ops do not split across threads (no waiting for a busy second core, unlike PyTorch's
    # OpenMP regions in tests/test_api_torch.py).
    model = SleepyNet()
    model(tf.zeros((1, 4, 4, 2)))
    opt = SleepySGD(learning_rate=0.01)
    before = optimizer_methods()
    prof = LayerProfiler(model, framework="tensorflow", warmup=1)
    x = tf.random.normal((2, 4, 4, 2), seed=0)
    for _ in range(4):              # medians of 3: one step slowed by the machine is outvoted
        with prof.step():
            with tf.GradientTape() as tape:
                out = prof.mark_output(model(x, training=True))
                loss = sleepy_mse(tf.zeros_like(out), out)
            grads = tape.gradient(loss, model.trainable_variables)
            # apply, not apply_gradients: the override itself must be the boundary (through
            # apply_gradients, BaseOptimizer's would be reached first).
            opt.apply(grads, model.trainable_variables)
    prof.close()
    assert_restored(before)
    report = prof.report()
    phases = report["phases_ms"]
    for phase, sleep_s in SLEEP.items():
        got_ms = phases[phase]["median"]
        assert sleep_s * 1e3 <= got_ms < sleep_s * 1e3 + 45.0, (phase, got_ms)
    # The first layer's backward holds its (sleeping) weight-gradient work and nests in the
    # backward phase.
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert list(layers) == ["scale", "dense"]
    assert SLEEP["backward"] * 1e3 <= layers["scale"]["backward_ms"] <= (
        phases["backward"]["mean"])


def test_phase_events_fire_once_per_outermost_call_and_are_put_back():
    before = optimizer_methods()
    events = []
    phase_events = instrument_tf.PhaseEvents(events.append)
    phase_events.install()
    phase_events.install()                    # idempotent: wrapped once
    try:
        w = tf.Variable(2.0)
        # LossScaleOptimizer.apply calls its inner SGD's apply: one optimizer phase.
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.1))
        with tf.GradientTape() as tape:
            loss = w * w
        (grad,) = tape.gradient(loss, [w])
        opt.apply_gradients([(grad, w)])
        assert events == ["backward_start", "backward_end", "optimizer_start",
                          "optimizer_end"]
        events.clear()

        @tf.function
        def traced_step():
            with tf.GradientTape() as tape:
                loss = w * w
            return tape.gradient(loss, [w])
        traced_step()                          # traced: no boundaries, a note
        assert events == []
        assert any("while a graph was traced" in n for n in phase_events.notes)
        # A Jacobian's row-by-row gradients (eager without pfor) are no boundaries either.
        with tf.GradientTape(persistent=True) as tape:
            y = tf.stack([w * w, w * 3.0])
        tape.jacobian(y, w, experimental_use_pfor=False)
        assert events == []
    finally:
        phase_events.remove()
    assert_restored(before)
    w.assign(1.0)
    with tf.GradientTape() as tape:
        loss = w * w
    tape.gradient(loss, [w])
    assert events == []                        # removed: nothing fires


# -------------------------------------------------------------------- whole-run API

def test_profile_training_measures_overhead_and_keeps_a_failed_run():
    before = optimizer_methods()
    model = tiny_net()
    opt = keras.optimizers.SGD(learning_rate=0.01)
    report = profile_training(model, batches(3), LOSS, opt, framework="tensorflow",
                              steps=4, warmup=1, overhead_steps=4)
    validate_report(report.doc)
    assert report["iters"] == 4 and report["errors"] == []
    assert len(report["instrumentation"]["uninstrumented_step_ms"]) == 4
    assert report["instrumentation"]["overhead_pct"] is not None
    phases = report["phases_ms"]
    assert phases["h2d"]["mean"] > 0 and phases["data_wait"]["mean"] > 0
    # The layer table against the step: every layer's forward and backward within the step.
    step_ms = report["instrumentation"]["instrumented_step_ms_median"]
    assert sum(layer["forward_ms"] + layer["backward_ms"]
               for layer in report["layers"]) < step_ms
    assert_restored(before)

    calls = []

    def failing_loss(t, out):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("loss became nan")
        return LOSS(t, out)

    report = profile_training(model, batches(3), failing_loss, opt, framework="tensorflow",
                              steps=6, warmup=1)
    assert report["iters"] >= 1
    assert any("FloatingPointError: loss became nan" in e for e in report["errors"])
    assert_restored(before)


def test_profile_training_passes_sample_weights_and_regularisation():
    """(x, y, sample_weight) batches reach loss_fn as its third argument; model.losses (a
    kernel regulariser) is added as Keras' fit adds it."""
    seen = []

    def loss_fn(t, out, sample_weight=None):
        seen.append(sample_weight is not None)
        return LOSS(t, out, sample_weight)

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(1.0),
                                 name="fc")(inputs)
    model = keras.Model(inputs, outputs, name="regularised")
    x = np.ones((2, 4), np.float32)
    data = [(x, np.array([0, 1]), np.array([1.0, 0.0], np.float32))]
    step = instrument_tf.training_step(model, loss_fn, keras.optimizers.SGD(0.0))
    loss = step(None, data[0])
    expected = LOSS(data[0][1], model(x), data[0][2]) + tf.add_n(model.losses)
    assert seen == [True] and np.isclose(float(loss), float(expected))
    assert float(tf.add_n(model.losses)) > 0


# -------------------------------------------------------------------- layers

class Block(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)


class Nested(keras.Model):
    """Two blocks with the same sublayer names, one block used twice (shared)."""

    def __init__(self):
        super().__init__(name="nested")
        self.b1 = Block(name="b1")
        self.b2 = Block(name="b2")
        self.again = self.b1
        self.fc = keras.layers.Dense(3, name="fc")

    def call(self, x, training=None):
        h = self.b1(self.b2(self.b1(x, training=training), training=training),
                    training=training)
        return self.fc(keras.ops.mean(h, axis=(1, 2)))


def test_layer_names_are_keras_nesting_and_filters_select():
    model = Nested()
    model(tf.zeros((1, 4, 4, 4)))
    prof = LayerProfiler(model, framework="tensorflow")
    assert [n for n, _ in prof.target.named_layers()] == ["b1/conv", "b1/bn", "b2/conv",
                                                           "b2/bn", "fc"]
    prof = LayerProfiler(model, framework="tensorflow", layers=["b2/conv", "fc"])
    assert [n for n, _ in prof.target.named_layers()] == ["b2/conv", "fc"]
    prof = LayerProfiler(model, framework="tensorflow",
                         layers=lambda name, layer: isinstance(layer, keras.layers.Conv2D))
    assert [n for n, _ in prof.target.named_layers()] == ["b1/conv", "b2/conv"]
    with pytest.raises(ValueError, match=r"layers: no layer .* \['b1/conv', 'b1/bn', "):
        LayerProfiler(model, framework="tensorflow", layers=lambda name, layer: False)
    with pytest.raises(ValueError, match=r"layers: \['nope'\] not in the Nested"):
        LayerProfiler(model, framework="tensorflow", layers=["fc", "nope"])
    with pytest.raises(ValueError, match=r"layers: \['b1'\] have no weights of their own"):
        LayerProfiler(model, framework="tensorflow", layers=["b1"])

    # The shared block is called twice a step: two calls, one name.
    prof = LayerProfiler(model, framework="tensorflow", warmup=0)
    x = tf.zeros((2, 4, 4, 4))
    with prof.step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(prof.mark_output(model(x, training=True)))
        tape.gradient(loss, model.trainable_variables)
    prof.close()
    calls = {layer["name"]: layer["calls"] for layer in prof.report()["layers"]}
    assert calls == {"b1/conv": 2, "b1/bn": 2, "b2/conv": 1, "b2/bn": 1, "fc": 1}


# -------------------------------------------------------------------- bad input

def test_bad_input_is_one_clear_error_each():
    before = optimizer_methods()
    with pytest.raises(TypeError, match="model: expected a keras.Model .* got builtins.dict"):
        LayerProfiler({}, framework="tensorflow")
    with pytest.raises(TypeError, match=r"model: expected a keras.Model .* got "
                                        r"keras.src.layers.core.dense.Dense"):
        LayerProfiler(keras.layers.Dense(3), framework="tensorflow")
    with pytest.raises(ValueError, match="model: the TinyNet is not built yet"):
        LayerProfiler(TinyNet(), framework="tensorflow")
    model = tiny_net()
    prof = LayerProfiler(model, framework="tensorflow", warmup=0)
    with pytest.raises(RuntimeError, match="no measured step yet"):
        prof.report()
    x, t = batches(1)[0]
    with pytest.raises(RuntimeError, match="steps do not nest"):
        with prof.step():
            with prof.step():
                pass
    with pytest.raises(RuntimeError, match="without mark_output"):
        with prof.step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x, training=True))
            tape.gradient(loss, model.trainable_variables)
    with pytest.raises(RuntimeError, match="outside a step"):
        prof.mark_output(model(x))
    prof.close()

    # A step traced by tf.function cannot be timed: refused at the first mark_output.
    prof = LayerProfiler(model, framework="tensorflow", warmup=0)

    @tf.function
    def traced_step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(prof.mark_output(model(x, training=True)))
        return tape.gradient(loss, model.trainable_variables)
    with pytest.raises(RuntimeError, match="mark_output: the output is a graph tensor: the "
                                           "step runs inside a tf.function"):
        with prof.step():
            traced_step(tf.constant(x))
    prof.close()

    opt = keras.optimizers.SGD(learning_rate=0.01)

    def run(loader=batches(1), loss_fn=LOSS, optimizer=opt, **kwargs):
        return profile_training(model, loader, loss_fn, optimizer, framework="tensorflow",
                                steps=1, warmup=0, overhead_steps=0, **kwargs)
    with pytest.raises(ValueError, match="loader: expected an iterable that yields batches"):
        run(loader=[])
    with pytest.raises(TypeError, match="optimizer: expected a keras.optimizers.Optimizer"):
        run(optimizer="sgd")
    with pytest.raises(TypeError, match=r"loss_fn: expected a callable \(y_true, y_pred\)"):
        run(loss_fn="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"loader: expected batches \(inputs, targets\)"):
        run(loader=[x])
    with pytest.raises(ValueError, match=r"loss_fn: expected a scalar .* got .* of shape "
                                         r"\(4,\)"):
        run(loss_fn=keras.losses.sparse_categorical_crossentropy)
    with pytest.raises(ValueError, match="device: expected None, 'cpu' or 'cuda', got 'gpu'"):
        run(device="gpu")
    assert_restored(before)


# ----------------------------------------------------------------------------- the CLI

FACTORY = "tests/user_models/tensorflow_cnn.py"


def test_cli_profiles_a_keras_factory_from_a_file(tmp_path):
    report = profile_factory_cli("tensorflow", f"{FACTORY}:factory", tmp_path)
    assert report["model"] == "SmallCNN"
    assert [layer["name"] for layer in report["layers"]] == [
        "block1/conv", "block1/bn", "block2/conv", "block2/bn", "classifier"]
    assert all(layer["backward_ms"] > 0 for layer in report["layers"])


def _graph_report(instrument):
    model = tiny_net()
    x = np.random.default_rng(0).random((4, 8, 8, 3), np.float32)
    y = np.arange(4) % 10
    report = profile_training(model, [(x, y)] * 3,
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                              keras.optimizers.SGD(0.01), framework="tensorflow", steps=2,
                              warmup=1, overhead_steps=1, mode="graph", instrument=instrument)
    validate_report(report.doc)
    return model, report


def test_profile_training_in_graph_mode_times_one_compiled_call():
    """mode="graph", instrument="hooks": the step is one tf.function; its time is the
    compiled_step phase, the phases inside it are listed as absent with the reason, there is
    no layer table, and the PhaseEvents are put back."""
    before = optimizer_methods()
    _, report = _graph_report("hooks")
    assert report["errors"] == [] and report["mode"] == "graph" and report["layers"] == []
    assert report["phases_ms"]["compiled_step"]["mean"] > 0
    assert set(report["phases_absent"]) == {"forward", "loss_forward", "loss_backward",
                                            "backward", "optimizer"}
    assert all("inside the compiled step" in why for why in report["phases_absent"].values())
    assert_restored(before)


def test_profile_training_in_graph_mode_times_layers_from_the_trace():
    """mode="graph" (instrument "auto": TensorFlow's trace): every layer of the user's model
    gets forward and backward times from the compiled step's op scopes, and the phases inside
    the call (profile_training's step scopes its loss and its update) replace compiled_step."""
    before = optimizer_methods()
    model, report = _graph_report("auto")
    assert report["errors"] == [] and report["instrument_kind"] == "trace"
    names = [name for name, _ in instrument_tf.UserModel(model, lambda n, l: True).named_layers()]
    assert [row["name"] for row in report["layers"]] == names
    assert all(row["forward_ms"] > 0 and row["backward_ms"] > 0 for row in report["layers"])
    assert "compiled_step" not in report["phases_ms"]
    for phase in ("forward", "loss_forward", "backward", "optimizer"):
        assert report["phases_ms"][phase]["mean"] > 0, phase
    assert_restored(before)
