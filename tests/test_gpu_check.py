"""scripts/gpu_check.py without a GPU: the plan, the budget (allowances, cut-off, what a cut
run keeps), failures not stopping later steps, the summary's schema and the dry run end to end.
Fake steps only sleep, write or fail; nothing here builds or needs a GPU."""

import importlib
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)
Step = gpu_check.Step
PY = sys.executable


def py(code: str):
    return [PY, "-c", code]


def run(tmp_path, steps, budget_s, reserve_s=0.5):
    runner = gpu_check.Runner(tmp_path / "out", tmp_path / "work", budget_s, reserve_s=reserve_s,
                              echo=lambda line: None)
    return runner.run(steps)


def by_name(summary):
    return {s["name"]: s for s in summary["steps"]}


def test_plan_order_and_dependencies(tmp_path):
    steps = gpu_check.build_plan(PY, tmp_path)
    names = [s.name for s in steps]
    assert names == ["gpu-info", "build", "tests", "bench", "profile-resnet20",
                     "profile-deeppose", "compare-deeppose-loss", "chainer", "nsys"]
    for i, step in enumerate(steps):
        assert set(step.needs) <= set(names[:i]), f"{step.name} needs a later step"
        assert 0 < step.min_s <= step.want_s
    assert all("build" in s.needs for s in steps[2:])
    # The whole plan's allowances exceed the default budget: the priority order decides.
    assert sum(s.want_s for s in steps) > gpu_check.DEFAULT_BUDGET_S
    build = steps[1]
    assert build.env["OPS_CUDA_ARCH"] == "90" and build.env["OPS_TORCH"] == "1"
    assert "--no-build-isolation" in build.commands[0]


def test_plan_commands_parse_with_the_modules_own_parsers(tmp_path):
    """Each module step's exact arguments go through that module's argparse here."""
    for step in gpu_check.build_plan(PY, tmp_path):
        for argv in step.commands:
            if argv[1:2] == ["-m"] and argv[2] in ("experiments.bench_kernels",
                                                    "profiler.layerwise"):
                importlib.import_module(argv[2]).parse_args(argv[3:])


def test_budget_allowance_and_cut_off_keep_what_was_measured(tmp_path):
    work = tmp_path / "work"
    steps = [
        Step("first", "writes a result", [py(
            f"import json, pathlib; p = pathlib.Path({str(work / 'first')!r}); "
            "(p / 'result.json').write_text(json.dumps({'ratio': 0.5}))")],
            want_s=5, min_s=0.1,
            outcome=lambda d: json.loads((d / "result.json").read_text())),
        Step("partial", "writes half, then hangs", [py(
            f"import pathlib, time; pathlib.Path({str(work / 'partial' / 'half.txt')!r})"
            ".write_text('measured'); print('half done', flush=True); time.sleep(60)")],
            want_s=60, min_s=0.1, outcome=lambda d: {"half": (d / "half.txt").read_text()}),
        Step("later", "no time left for it", [py("pass")], want_s=5, min_s=1),
    ]
    summary = run(tmp_path, steps, budget_s=3.5, reserve_s=0.5)
    steps_ = by_name(summary)
    assert steps_["first"]["status"] == "passed"
    assert steps_["first"]["outcome"] == {"ratio": 0.5}
    # The hanging step got what was left of the budget, not its own 60 s, and was stopped.
    partial = steps_["partial"]
    assert partial["status"] == "timed_out"
    assert partial["timeout_s"] <= 3.0 and partial["duration_s"] < 10
    assert partial["outcome"] == {"half": "measured"}
    assert steps_["later"]["status"] == "skipped" and "budget" in steps_["later"]["reason"]
    # Nothing measured is lost: the summary on disk and the packed logs say the same.
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["final"] is True and by_name(on_disk)["first"]["outcome"] == {"ratio": 0.5}
    with tarfile.open(tmp_path / "out" / "artifacts.tar.gz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("partial/log.txt").read().decode()
    assert {"first/result.json", "partial/half.txt", "partial/log.txt"} <= names
    assert "half done" in log and "timed out" in log


def test_a_failing_step_does_not_stop_later_ones(tmp_path):
    steps = [
        Step("broken", "fails", [py("import sys; sys.exit(4)"), py("print('never')")],
             want_s=5, min_s=0.1),
        Step("independent", "runs anyway", [py("print('ran')")], want_s=5, min_s=0.1),
        Step("dependent", "needs broken", [py("pass")], want_s=5, min_s=0.1,
             needs=("broken",)),
        Step("crashing-outcome", "its outcome reader fails", [py("pass")], want_s=5, min_s=0.1,
             outcome=lambda d: 1 / 0),
        Step("precondition", "cannot run here", [py("pass")], want_s=5, min_s=0.1,
             precondition=lambda: "nothing to run with"),
    ]
    steps_ = by_name(run(tmp_path, steps, budget_s=30))
    assert steps_["broken"]["status"] == "failed" and steps_["broken"]["returncode"] == 4
    assert "never" not in (tmp_path / "work" / "broken" / "log.txt").read_text()
    assert steps_["independent"]["status"] == "passed"
    assert steps_["dependent"]["status"] == "skipped"
    assert "broken" in steps_["dependent"]["reason"]
    assert steps_["crashing-outcome"]["status"] == "passed"
    assert "ZeroDivisionError" in steps_["crashing-outcome"]["outcome"]["error"]
    assert steps_["precondition"]["reason"] == "nothing to run with"


def test_summary_schema(tmp_path):
    steps = [Step("gpu-info", "fake nvidia-smi", [py("print('NVIDIA H200, 580.159, 143771 MiB')")],
                  want_s=5, min_s=0.1,
                  outcome=lambda d: gpu_check.gpu_info(d / "log.txt"))]
    summary = run(tmp_path, steps, budget_s=20)
    assert summary["schema_version"] == gpu_check.SCHEMA_VERSION
    assert summary["gpu"] == "NVIDIA H200"
    assert set(summary) >= {"tool", "final", "budget_s", "elapsed_s", "gpu", "steps", "counts",
                            "artifacts"}
    assert summary["counts"] == {"passed": 1, "failed": 0, "timed_out": 0, "skipped": 0}
    step = summary["steps"][0]
    assert set(step) == {"name", "status", "duration_s", "timeout_s", "returncode", "reason",
                         "log", "outcome"}
    text = (tmp_path / "out" / "summary.txt").read_text()
    assert "GPU NVIDIA H200" in text and "gpu-info" in text
    # Exactly the three files the device tool brings back.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "artifacts.tar.gz", "summary.json", "summary.txt"]


def test_outcome_readers(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                     '<testcase classname="tests.test_cuda" name="test_a"/>'
                     '<testcase classname="tests.test_cuda" name="test_b"><failure/></testcase>'
                     '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(junit)
    assert (counts["tests"], counts["passed"], counts["failures"], counts["skipped"]) == \
        (4, 2, 1, 1)
    assert counts["not_passed"] == ["tests.test_cuda::test_b"]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"copy_gbps": 4000.0, "rows": [
        {"group": "loss fused vs composite", "name": "256x28", "ratio": 0.1, "ratio_iqr": 0.01,
         "ours_ms": 0.01, "torch_ms": 0.1, "extra": {"ours_host_ms": 0.005}},
        {"group": "conv forward", "name": "3x3 b128", "ratio": 1.4, "ratio_iqr": 0.1,
         "ours_ms": 1.0, "torch_ms": 0.7, "extra": {}}]}))
    out = gpu_check.bench_outcome(bench)
    assert out["copy_gbps"] == 4000.0 and out["loss"][0]["ours_host_ms"] == 0.005
    assert out["conv"][0]["ratio"] == 1.4
    assert gpu_check.junit_counts(tmp_path / "absent.xml") == {"junit": "missing"}


def test_only_keeps_what_the_steps_need(tmp_path):
    steps = gpu_check.select(gpu_check.build_plan(PY, tmp_path), "bench")
    assert [s.name for s in steps] == ["gpu-info", "build", "bench"]
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.select(gpu_check.build_plan(PY, tmp_path), "benchmark")


def test_without_a_gpu_the_real_check_refuses_to_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "has_gpu", lambda: "nvidia-smi is not on PATH")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "DRY_RUN=1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dry_run_end_to_end(tmp_path):
    """The script as make runs it (without the command checks, which import torch several
    times): plan printed, fake steps through the budget, exit 0."""
    done = subprocess.run([PY, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run",
                           "--no-validate", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plan under a 480 s budget" in done.stdout
    assert "dry run: OK" in done.stdout
    summary = json.loads((tmp_path / "dry-run" / "summary.json").read_text())
    assert {s["name"]: s["status"] for s in summary["steps"]} == gpu_check.FAKE_EXPECTED
