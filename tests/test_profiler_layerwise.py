"""The layer-wise profiler on real workloads: every framework's instrumentation covers every
layer with parameters in both directions (the first layer's backward included), phases add up
to the step, ranges nest, NVTX ranges are emitted, and the CLI writes valid outputs, refuses
bad arguments and keeps the other frameworks' results when one fails."""

import importlib
import json
import os
import sys

import pytest

from ops.frameworks import FRAMEWORKS
from profiler import engine, layerwise, recorder
from profiler.analysis.nesting import check_nesting
from profiler.analysis.phases import layer_breakdown, phase_breakdown
from profiler.analysis.trace_events import validate_chrome_trace
from profiler.engine import compare, profile
from profiler.report import validate_report
from profiler.targets import WorkloadTarget
from profiler.timeline import PHASES
from profiler.workloads import build_workload

TINY = dict(batch_size=4, train_size=16, test_size=4)


def instrument_available(framework):
    for module in (f"profiler.workloads.{framework}.common", f"profiler.instrument.{framework}"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            pytest.skip(f"{framework}: {e}")


@pytest.fixture(params=FRAMEWORKS)
def framework(request):
    instrument_available(request.param)
    return request.param


class RecordingNvtx:
    """Stands in for the nvtx package (no NVTX tool can observe ranges in CI)."""

    def __init__(self):
        self.started, self.ended = [], []

    def start(self, message, colour):
        self.started.append((message, colour))
        return len(self.started)

    def end(self, handle):
        self.ended.append(handle)


@pytest.mark.parametrize("model", ["resnet20", "deeppose"])
def test_profile_covers_every_layer_and_phase(framework, model, monkeypatch):
    nvtx = RecordingNvtx()
    monkeypatch.setattr(recorder, "NVTX", nvtx)
    monkeypatch.setattr(engine, "NVTX", nvtx)
    workload = build_workload(framework, model=model, **TINY)
    result = profile(WorkloadTarget(workload), warmup=1, steps=2, overhead_steps=1)
    assert result.doc["errors"] == []
    check_nesting(result.timeline)
    phases = phase_breakdown(result.timeline)
    assert phases["steps"] == [0, 1]
    total = sum(phases["phases_ms"][p]["mean"] for p in PHASES)
    assert total == pytest.approx(phases["step_ms"]["mean"], rel=0.02)
    for phase in ("data_wait", "forward", "loss_forward", "loss_backward", "backward",
                  "optimizer"):
        assert phases["phases_ms"][phase]["mean"] > 0, phase
    rows = {row["name"]: row for row in layer_breakdown(result.timeline)}
    expected = [name for name, _ in workload.named_layers()]
    assert sorted(rows) == sorted(expected)
    for name in expected:
        assert rows[name]["forward_ms"] > 0, f"{name} forward"
        assert rows[name]["backward_ms"] > 0, f"{name} backward"
    # The first layer's input needs no gradient (the trap): its backward still computes the
    # weight gradient, work of the order of its forward, not the few microseconds of a range
    # closed when the output's gradient arrives. Its forward can cost many times its backward
    # (oneDNN reorders the input there; MXNet without oneDNN: 8.5 ms forward, 0.62 ms
    # backward for ResNet's 3-channel conv0; a loaded CPU stretches short ranges), so the bar
    # is a fiftieth: the trap (microseconds) lands well below it.
    first = expected[0]
    assert rows[first]["backward_ms"] > 0.02 * rows[first]["forward_ms"]
    # NVTX mirrored the ranges: balanced, one colour per phase, layers named.
    assert len(nvtx.started) == len(nvtx.ended) > 0
    messages = {m for m, _ in nvtx.started}
    assert {"step", "forward", "loss_backward", "backward", "optimizer"} <= messages
    if framework == "mxnet":
        # Its layer ranges are NVTX ranges that C marks on MXNet's engine start through the C
        # API, not through this double (test_instrument_mxnet.py checks them); the report says.
        assert any(n.startswith("No NVTX ranges for the layers") for n in result["notes"])
    else:
        assert f"{first} (backward)" in messages
    colours = {m: c for m, c in nvtx.started}
    assert colours["forward"] != colours["backward"]
    instrumentation = result["instrumentation"]
    assert len(instrumentation["uninstrumented_step_ms"]) == 1
    assert len(instrumentation["instrumented_step_ms"]) == 2


def test_uninstrumented_steps_record_nothing(monkeypatch):
    workload = build_workload("torch", model="resnet20", **TINY)
    result = profile(WorkloadTarget(workload), warmup=0, steps=1, overhead_steps=2)
    steps = [r for r in result.timeline.ranges if r.kind == "step"]
    assert len(steps) == 1
    assert len(result["instrumentation"]["uninstrumented_step_ms"]) == 2


def test_overhead_steps_alternate_with_measured_ones(monkeypatch):
    """Instrumented and plain steps run in neighbouring pairs (stats.overhead_schedule), the
    hooks off for exactly the plain ones."""
    order = []
    target = WorkloadTarget(build_workload("torch", model="resnet20", **TINY))
    own_step = target.step

    def step(prof, batch):   # whether the layer hooks are on while the step runs
        instrument = engine_profilers[-1].instrument
        order.append(("plain" if prof is None else "inst", bool(instrument._handles)))
        return own_step(prof, batch)
    engine_profilers = []
    own_profiler = target.profiler

    def profiler(**kwargs):
        engine_profilers.append(own_profiler(**kwargs))
        return engine_profilers[-1]
    monkeypatch.setattr(target, "step", step)
    monkeypatch.setattr(target, "profiler", profiler)
    result = profile(target, warmup=1, steps=3, overhead_steps=3)
    assert result.doc["errors"] == []
    assert order == [("inst", True), ("inst", True), ("plain", False), ("plain", False),
                     ("inst", True), ("inst", True), ("plain", False)]
    assert [r.step for r in result.timeline.ranges if r.kind == "step"] == [-1, 0, 1, 2]


def test_compare_interleaves_variants():
    workload = build_workload("torch", model="deeppose", **TINY)
    outcome = compare({v: WorkloadTarget(workload, impls={"loss": v})
                       for v in ("autograd", "native")}, rounds=2, steps_per_round=1, warmup=0)
    assert outcome.errors == []
    for variant in ("autograd", "native"):
        assert sorted(outcome.step_round[variant].values()) == [0, 1]
        assert phase_breakdown(outcome.reports[variant].timeline)["steps"] == [0, 1]
        assert outcome.reports[variant]["impls"]["loss"] == variant
    # Rounds rotate who goes first (autograd, native; then native, autograd): the run ends
    # on autograd.
    assert workload.loss_impl == "autograd"


def cli(tmp_path, *extra):
    return ["--model", "resnet20", "--batch-size", "4", "--warmup", "1", "--iters", "2",
            "--synthetic-size", "16", "--no-progress", "--out", str(tmp_path), *extra]


def test_cli_writes_valid_outputs(tmp_path, capsys):
    assert layerwise.main(cli(tmp_path, "--framework", "torch", "--format", "json")) == 0
    report = json.loads(capsys.readouterr().out)
    validate_report(report)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["framework"] == "torch" and on_disk["phases_ms"].keys() == set(PHASES)
    assert on_disk["instrumentation"]["overhead_pct"] is not None
    validate_chrome_trace(json.loads((tmp_path / "trace.json").read_text()))
    folded = (tmp_path / "flame.folded").read_text().splitlines()
    assert any(";forward;conv0 (forward) " in line for line in folded)
    speedscope = json.loads((tmp_path / "flame.speedscope.json").read_text())
    assert speedscope["profiles"] and speedscope["shared"]["frames"]


def test_cli_records_the_threads_it_set(tmp_path, monkeypatch):
    """--threads reaches torch, the BLAS/OpenMP libraries and our kernels before the run, and
    report.json says what each used (nothing ignored)."""
    import torch
    from ops import core
    before = torch.get_num_threads(), core.cpu_threads()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "OPS_CPU_THREADS"):   # set by --threads: restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    try:
        assert layerwise.main(cli(tmp_path, "--framework", "torch", "--threads", "1",
                                  "--overhead-iters", "0", "--format", "json")) == 0
    finally:
        torch.set_num_threads(before[0])
        core.set_cpu_threads(before[1])
    report = json.loads((tmp_path / "report.json").read_text())
    validate_report(report)
    threads = report["threads"]
    assert threads["requested"] == 1 and threads["ignored"] == [], threads
    assert threads["intra_op"] == 1 and threads["ours"]["ops._C"] == 1, threads


def test_cli_compare(tmp_path, capsys):
    code = layerwise.main(["--framework", "torch", "--model", "deeppose", "--batch-size", "2",
                           "--synthetic-size", "8", "--warmup", "0", "--rounds", "2",
                           "--steps-per-round", "1", "--no-progress", "--out", str(tmp_path),
                           "--compare", "loss=autograd,native"])
    assert code == 0
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["variants"] == ["autograd", "native"]
    assert any(line.startswith("loss backward, native vs autograd: ")
               for line in doc["differences"])
    assert "native vs autograd" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--framework", "jax"], "invalid choice: 'jax'"),
    (["--batch-size", "0"], "expected a positive integer"),
    (["--iters", "x"], "expected an integer"),
    (["--threads", "0"], "expected a positive integer"),
    (["--loss-impl", "native"], "loss impls apply to --model deeppose"),
    (["--compare", "speed"], "expected loss=A,B,... or conv=A,B,..."),
    (["--model", "deeppose", "--compare", "loss=autograd"], "at least two distinct"),
    (["--model", "deeppose", "--compare", "loss=autograd,fast"],
     "expected at least two distinct loss impls"),
    (["--compare", "conv=framework,native", "--framework", "all"], "runs in one framework"),
    (["--compare", "conv=framework,native", "--iters", "3"],
     "--iters: --compare runs --warmup, then --rounds rounds"),
    (["--rounds", "3", "--steps-per-round", "3"],
     "--rounds, --steps-per-round: only with --compare"),
    (["--framework", "all", "--python", "jax=/usr/bin/python3"], "--python: expected"),
    (["--framework", "all", "--python", "torch=/no/such/python"], "not an executable"),
    (["--cross-check", "--mode", "graph"], "--cross-check: compares the hooks with"),
    (["--cross-check", "--framework", "chainer"], "--cross-check: compares the hooks with"),
    (["--cross-check", "--instrument", "trace"], "--cross-check: compares the hooks with"),
    (["--instrument", "trace", "--framework", "chainer"],
     "no trace-based instrument for chainer"),
    (["--instrument", "sometimes"], "invalid choice: 'sometimes'"),
])
def test_cli_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        layerwise.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_failed_run_keeps_a_report(tmp_path):
    code = layerwise.main(cli(tmp_path, "--framework", "torch", "--data", str(tmp_path / "x")))
    assert code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("no such directory" in e for e in report["errors"])


def test_framework_all_isolates_failures(tmp_path, capsys):
    """One framework's interpreter fails outright: its error is reported and the others'
    results are kept and merged."""
    code = layerwise.main(cli(tmp_path, "--framework", "all", "--format", "json",
                              "--python", "mxnet=/bin/false", "--python",
                              f"torch={sys.executable}"))
    reports = json.loads(capsys.readouterr().out)
    assert [r["framework"] for r in reports] == list(FRAMEWORKS)
    by_name = {r["framework"]: r for r in reports}
    assert by_name["mxnet"]["errors"] and "exited with status 1" in by_name["mxnet"]["errors"][0]
    assert by_name["torch"]["errors"] == [] and "phases_ms" in by_name["torch"]
    assert code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["reports"][0]["framework"] \
        == "torch"


def test_cli_refuses_an_out_it_cannot_write_before_any_work(tmp_path, capsys):
    """An --out that cannot be made (a file in the way, /proc) is one error line and exit 2,
    before anything is built; a refused folder that did not exist is not left behind."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (blocker / "sub", "/proc/deepprof-no-such-dir/out"):
        assert layerwise.main(cli(out, "--framework", "torch")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out: expected a folder this process can create and "
                              "write in") and "Traceback" not in err
    assert not os.path.exists("/proc/deepprof-no-such-dir")
