"""The instrument contract (profiler/instrument/base.py): every framework's module meets it,
the check catches what a module lacks, and an instrument of the second kind (ranges read from
the framework's own trace after the step) reaches the report through the same engine path as
the hook-based ones."""

import importlib
import time
import types

import pytest

from ops import frameworks
from profiler import engine, instrument
from profiler.instrument import base
from profiler.targets import UserTarget


@pytest.mark.parametrize("framework", frameworks.import_order(frameworks.FRAMEWORKS))
def test_every_framework_meets_the_contract(framework):
    try:
        module = instrument.load(framework)
    except ImportError as e:
        pytest.skip(f"{framework} does not import here: {e}")
    assert base.check_module(module) == []
    assert issubclass(module.Instrument, base.InstrumentBase)


def _module(name="profiler.instrument.torch", **parts):
    module = types.ModuleType(name)
    for key, value in parts.items():
        setattr(module, key, value)
    return module


class _Hooks(base.InstrumentBase):
    def install(self):
        pass

    def remove(self):
        pass

    def mark_output(self, output):
        return output


class _UserModel:
    framework = "torch"

    def named_layers(self):
        return []

    def synchronize(self):
        pass

    def batch_size_of(self, output):
        return 1

    def version(self):
        return "0"

    def device_kind(self):
        return "cpu"

    def device_name(self):
        return "cpu"


class _Events:
    def __init__(self, on_event):
        self.notes = []

    def install(self):
        pass

    def remove(self):
        pass


def _training_step(model, loss_fn, optimizer, device=None, mode="eager"):
    return lambda prof, batch: None


def test_a_complete_module_passes_and_each_missing_part_is_named():
    parts = dict(Instrument=_Hooks, UserModel=_UserModel, PhaseEvents=_Events,
                 training_step=_training_step)
    assert base.check_module(_module(**parts)) == []
    for missing, expected in [("Instrument", "Instrument: expected a subclass"),
                              ("UserModel", "UserModel: expected a class"),
                              ("PhaseEvents", "PhaseEvents: expected a class"),
                              ("training_step", "training_step: expected a function")]:
        problems = base.check_module(_module(**{k: v for k, v in parts.items()
                                                if k != missing}))
        assert any(p.startswith(expected) for p in problems), (missing, problems)


def test_the_check_reads_kinds_signatures_and_the_framework_name():
    class Unfinished(base.InstrumentBase):     # install/remove/mark_output left out
        pass

    class Trace(_Hooks):
        kind = "trace"                          # without collect_step

    class Odd(_Hooks):
        kind = "sampling"

    def step(model, loss_fn, optimizer, device=None):        # no mode
        return None

    class Other(_UserModel):
        framework = "chainer"

    parts = dict(Instrument=_Hooks, UserModel=_UserModel, PhaseEvents=_Events,
                 training_step=_training_step)
    for change, expected in [
            (dict(Instrument=Unfinished), "Instrument.install: not implemented"),
            (dict(Instrument=Trace), "Instrument.collect_step: a trace instrument"),
            (dict(Instrument=Odd), "Instrument.kind: expected one of"),
            (dict(training_step=step), "training_step: expected training_step(model"),
            (dict(UserModel=Other), "UserModel.framework: expected 'torch'"),
            (dict(PhaseEvents=lambda: None), "PhaseEvents: expected a class")]:
        problems = base.check_module(_module(**{**parts, **change}))
        assert any(p.startswith(expected) for p in problems), (change, problems)


def test_a_trace_instrument_reaches_the_report_through_the_engine(monkeypatch):
    """A "trace" instrument records nothing while the step runs and the layers' ranges after
    it (collect_step), on a track of its own: the report's layer table has them, and the
    phases still come from the step's boundaries."""
    torch = pytest.importorskip("torch")
    module = instrument.load("torch")
    collected = []

    class FromTrace(_Hooks):          # nothing installed: the ranges come after the step
        kind = "trace"

        def collect_step(self, step, window):
            collected.append(step)
            assert window[0] < window[1]
            time.sleep(0.3)           # reading a trace takes time: not the step's
            now = self.recorder.now_ns()
            for k, (name, layer) in enumerate(self.layers):
                for direction, offset in (("forward", 0), ("backward", 1000)):
                    self.recorder.record(name, "layer", now + offset + k * 10,
                                         now + offset + k * 10 + 5, track="trace:cpu",
                                         direction=direction, layer_type=type(layer).__name__)

    monkeypatch.setattr(module, "Instrument", FromTrace)
    assert base.check_module(module) == []
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    loader = [(torch.randn(5, 4), torch.randint(0, 2, (5,)))] * 2
    target = UserTarget(model, loader, torch.nn.functional.cross_entropy,
                        torch.optim.SGD(model.parameters(), lr=0.1))
    report = engine.profile(target, steps=2, warmup=1, overhead_steps=1)
    assert report["errors"] == []
    assert collected == [-1, 0, 1]          # warm-up, then the measured steps
    assert max(report["instrumentation"]["instrumented_step_ms"]) < 300
    layers = {row["name"]: row for row in report["layers"]}
    assert sorted(layers) == ["0", "2"]
    assert all(row["forward_ms"] == pytest.approx(5e-6) for row in layers.values())
    assert report["phases_ms"]["forward"]["mean"] > 0
    assert importlib.import_module("profiler.instrument.torch").Instrument is FromTrace
