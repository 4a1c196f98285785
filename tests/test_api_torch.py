"""profiler.api on a user's own PyTorch model and loop: docs/your-own-model.md's example as
written, phases split at the right boundaries, the layer table against the step, and bad
input."""

from __future__ import annotations

import json
import time

import pytest

torch = pytest.importorskip("torch")

from profiler.api import LayerProfiler, profile_training  # noqa: E402
from profiler.report import validate_report  # noqa: E402
from tests.user_model_checks import check_layers_nest_in_phases, profile_factory_cli  # noqa: E402


class TinyNet(torch.nn.Module):
    """Not a seed workload: conv -> batch norm -> a Sequential head (which has no parameters of
    its own, so its Linear is the layer, named "head.1")."""

    def __init__(self, forward_sleep_s: float = 0.0):
        super().__init__()
        self.forward_sleep_s = forward_sleep_s
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))

    def forward(self, x):
        if self.forward_sleep_s:
            time.sleep(self.forward_sleep_s)
        return self.head(torch.relu(self.bn(self.conv(x))))


def batches(n=4, batch=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 10, (batch,),
                                                                      generator=g))
            for _ in range(n)]


def test_readme_example_runs_as_written(tmp_path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    dev = torch.device("cpu")
    prof = LayerProfiler(model, framework="torch", warmup=1)
    for x, t in batches(5):
        with prof.step():
            with prof.phase("data"):
                x, t = x.to(dev), t.to(dev)
            out = prof.mark_output(model(x))
            loss = loss_fn(out, t)
            loss.backward()
            opt.step()
            opt.zero_grad()
    written = prof.report().save(tmp_path / "mine")
    report = json.loads(written["report"].read_text())
    validate_report(report)
    assert report["iters"] == 4 and report["warmup"] == 1 and report["batch_size"] == 4
    assert [layer["name"] for layer in report["layers"]] == ["conv", "bn", "head.1"]
    # Each layer range nests in its phase: forward layers add up within the forward phase,
    # backward layers within the two backward phases; the first layer's backward is seen.
    phases = report["phases_ms"]
    assert sum(layer["forward_ms"] for layer in report["layers"]) <= phases["forward"]["mean"]
    assert sum(layer["backward_ms"] for layer in report["layers"]) <= (
        phases["backward"]["mean"] + phases["loss_backward"]["mean"])
    assert all(layer["backward_ms"] > 0 for layer in report["layers"])
    assert phases["data_wait"]["mean"] > 0
    for name in ("trace", "folded", "speedscope"):
        assert written[name].stat().st_size > 0
    prof.close()
    assert torch.autograd.backward.__module__ == "torch.autograd"


class SleepyLoss(torch.autograd.Function):
    """An MSE whose forward and backward each sleep a known time."""

    @staticmethod
    def forward(ctx, out, target):
        time.sleep(SLEEP["loss_forward"])
        ctx.save_for_backward(out, target)
        return ((out - target) ** 2).mean()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(SLEEP["loss_backward"])
        out, target = ctx.saved_tensors
        return grad * 2 * (out - target) / out.numel(), None


class SleepySGD(torch.optim.SGD):
    def step(self, closure=None):
        time.sleep(SLEEP["optimizer"])
        return super().step(closure)


SLEEP = {"forward": 0.4, "loss_forward": 0.1, "loss_backward": 0.2, "optimizer": 0.05}


@pytest.fixture
def one_thread():
    """On a loaded machine every OpenMP region of the tiny model waits for a second core
    (tens of ms in all, measured here with the other core busy); one thread keeps the compute
    around the sleeps at about a millisecond."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_phases_split_at_the_boundaries(one_thread):
    # Each phase holds one sleep of a distinct length: a phase that took a neighbour's sleep
    # (a boundary in the wrong place) would be at least 50 ms off; the compute around the
    # sleeps takes about a millisecond (after a warm-up step), so 45 ms leaves room for a
    # loaded machine.
    model = TinyNet(forward_sleep_s=SLEEP["forward"])
    opt = SleepySGD(model.parameters(), lr=0.01)
    prof = LayerProfiler(model, warmup=1)
    for x, _ in batches(4):
        with prof.step():
            out = prof.mark_output(model(x))
            loss = SleepyLoss.apply(out, torch.zeros_like(out))
            loss.backward()
            opt.step()
            opt.zero_grad()
    prof.close()
    phases = prof.report()["phases_ms"]
    for phase, sleep_s in SLEEP.items():
        got_ms = phases[phase]["median"]
        assert sleep_s * 1e3 <= got_ms < sleep_s * 1e3 + 45.0, (phase, got_ms)


def test_profile_training_measures_overhead_and_keeps_a_failed_run():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    report = profile_training(model, batches(3), torch.nn.functional.cross_entropy, opt,
                              steps=4, warmup=1, overhead_steps=4)
    assert report["iters"] == 4 and report["errors"] == []
    assert len(report["instrumentation"]["uninstrumented_step_ms"]) == 4
    assert report["instrumentation"]["overhead_pct"] is not None

    calls = []

    def failing_loss(out, t):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("loss became nan")
        return torch.nn.functional.cross_entropy(out, t)

    report = profile_training(model, batches(3), failing_loss, opt, steps=6, warmup=1)
    assert report["iters"] >= 1
    assert any("FloatingPointError: loss became nan" in e for e in report["errors"])
    assert torch.autograd.backward.__module__ == "torch.autograd"   # hooks gone


def test_layer_filter_by_names_and_callable():
    model = TinyNet()
    prof = LayerProfiler(model, layers=["conv", "head.1"])
    assert [n for n, _ in prof.target.named_layers()] == ["conv", "head.1"]
    prof = LayerProfiler(model, layers=lambda name, m: isinstance(m, torch.nn.Conv2d))
    assert [n for n, _ in prof.target.named_layers()] == ["conv"]
    with pytest.raises(ValueError, match=r"layers: no layer .* \['conv', 'bn', 'head.1'\]"):
        LayerProfiler(model, layers=lambda name, m: False)
    with pytest.raises(ValueError, match=r"layers: \['nope'\] not in the TinyNet"):
        LayerProfiler(model, layers=["conv", "nope"])


def test_bad_input_is_one_clear_error_each():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module .* got builtins.dict"):
        LayerProfiler({}, framework="torch")
    with pytest.raises(ValueError, match="framework: expected one of"):
        LayerProfiler(TinyNet(), framework="jax")
    with pytest.raises(ValueError, match="warmup: expected an int >= 0"):
        LayerProfiler(TinyNet(), warmup=-1)
    model = TinyNet()
    prof = LayerProfiler(model, warmup=0)
    with pytest.raises(RuntimeError, match="no measured step yet"):
        prof.report()
    x, t = batches(1)[0]
    with pytest.raises(RuntimeError, match="steps do not nest"):
        with prof.step():
            with prof.step():
                pass
    with pytest.raises(RuntimeError, match="without mark_output"):
        with prof.step():
            model(x).sum().backward()
    with pytest.raises(ValueError, match="name: expected one of"):
        with prof.step():
            with prof.phase("dataloading"):
                pass
    with pytest.raises(RuntimeError, match="outside a step"):
        prof.mark_output(model(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="loader: expected an iterable that yields batches"):
        profile_training(model, [], torch.nn.functional.cross_entropy, opt, steps=2)
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        profile_training(model, batches(1), torch.nn.functional.cross_entropy, "sgd", steps=2)
    with pytest.raises(ValueError, match=r"loader: expected batches \(inputs, targets\)"):
        profile_training(model, [x], torch.nn.functional.cross_entropy, opt, steps=2)
    prof.close()
    assert torch.autograd.backward.__module__ == "torch.autograd"


# ----------------------------------------------------------------------------- the CLI

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
FACTORY = "tests/user_models/torch_cnn.py"


def _cli(*args, timeout=300):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "profiler.layerwise", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_cli_profiles_a_factory_from_a_file(tmp_path):
    report = profile_factory_cli("torch", f"{FACTORY}:factory", tmp_path)
    assert report["model"] == "SmallCNN"
    assert [layer["name"] for layer in report["layers"]] == ["features.0", "features.3",
                                                             "classifier"]
    check_layers_nest_in_phases(report)
    assert report["threads"]["requested"] >= 1


@pytest.mark.parametrize("spec, message", [
    (f"{FACTORY}:nope", "has no function 'nope'"),
    ("tests/user_models/missing.py:factory", "no such file"),
    (f"{FACTORY}:not_a_factory", "must return a dict with keys"),
    ("no_such_package.module:factory", "cannot import 'no_such_package.module'"),
])
def test_cli_bad_factory_is_one_line(tmp_path, spec, message):
    proc = _cli("--model", spec, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_refuses_seed_options_with_a_factory():
    from profiler import layerwise
    with pytest.raises(SystemExit):
        layerwise.parse_args(["--model", f"{FACTORY}:factory", "--batch-size", "4"])
    with pytest.raises(SystemExit):
        layerwise.parse_args(["--model", "resnet21"])
    args = layerwise.parse_args(["--model", f"{FACTORY}:factory"])
    assert args.user_model and args.out.endswith("torch-factory")


def test_a_loader_that_cannot_start_over_says_so():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    one_pass = (b for b in batches(2))
    report = profile_training(model, one_pass, torch.nn.functional.cross_entropy, opt,
                              steps=4, warmup=0, overhead_steps=0)
    assert report["iters"] == 2
    assert any("ran out after 2 batches" in e for e in report["errors"])


def test_the_api_is_importable_from_the_package():
    from profiler import LayerProfiler as from_package
    assert from_package is LayerProfiler
    import profiler
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        profiler.nope


def test_close_gives_every_layer_its_own_forward_back():
    """The instrument wraps each layer's forward on the instance (cheaper than module hooks);
    close() restores the class's forward, or an instance-level forward the user had set, and
    outputs are the same with and without the wrapper."""
    model = TinyNet()
    def own_forward(x):
        return torch.nn.BatchNorm2d.forward(model.bn, x)
    model.bn.forward = own_forward
    x, t = batches(1)[0]
    prof = LayerProfiler(model, warmup=0)
    with prof.step():
        out = prof.mark_output(model(x))
        torch.nn.functional.cross_entropy(out, t).backward()
    assert all("forward" in vars(m) for m in (model.conv, model.bn, model.head[1]))
    prof.close()
    assert "forward" not in vars(model.conv) and "forward" not in vars(model.head[1])
    assert model.bn.forward is own_forward
    model.eval()
    with torch.no_grad():
        plain = model(x)
        prof = LayerProfiler(model, warmup=0)
        with prof.step():
            marked = prof.mark_output(model(x))
        prof.close()
    assert torch.equal(plain, marked)


def test_profile_training_in_graph_mode_compiles_the_model_and_reports_no_layers():
    """mode="graph": the model runs through torch.compile; the report is in graph mode, has
    the step's phases (the loss backward split at the output's gradient, which a hook on the
    output tensor still sees) and no layer table, and adds up."""
    model = TinyNet()
    report = profile_training(model, batches(4), torch.nn.functional.cross_entropy,
                              torch.optim.SGD(model.parameters(), lr=0.01), steps=2, warmup=1,
                              overhead_steps=1, mode="graph")
    validate_report(report.doc)
    assert report["errors"] == [] and report["mode"] == "graph"
    assert report["layers"] == [] and report["phases_absent"] == {}
    for phase in ("forward", "loss_forward", "loss_backward", "backward", "optimizer"):
        assert report["phases_ms"][phase]["mean"] > 0, phase
    assert any(n.startswith("Graph mode:") for n in report["notes"])
