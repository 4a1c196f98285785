"""Variants of a user's own model compared in interleaved rounds: profiler.api.compare_training
on two builds, and ``python -m profiler.layerwise --model FACTORY --compare KEY=A,B,...``
(comparison.json, the tables, each variant's report) with its bad input refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from profiler import layerwise  # noqa: E402
from profiler.analysis.variants import compare_variants  # noqa: E402
from profiler.api import build_variants, compare_training  # noqa: E402
from profiler.report import validate_report  # noqa: E402
from profiler.timeline import PHASES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FACTORY = "tests/user_models/torch_cnn.py:factory"


class Logged(torch.nn.Module):
    """A linear model that logs its name to ``calls`` on every forward (the run's order), and
    sleeps ``sleep_s`` there (a known difference)."""

    def __init__(self, name: str, calls: list, sleep_s: float = 0.0):
        super().__init__()
        self.name, self.calls, self.sleep_s = name, calls, sleep_s
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        self.calls.append(self.name)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.fc(x)


def build(name: str, calls: list, sleep_s: float = 0.0, loss_fn=None) -> dict:
    torch.manual_seed(0)
    model = Logged(name, calls, sleep_s)
    batches = [(torch.randn(2, 4), torch.randint(0, 3, (2,))) for _ in range(3)]
    return dict(model=model, loader=batches, name=name,
                loss_fn=loss_fn or torch.nn.functional.cross_entropy,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.01))


# ----------------------------------------------------------------------------- the API

def test_compare_training_interleaves_the_variants_and_reports_each():
    calls: list = []
    backward = torch.autograd.backward
    comparison = compare_training({"fast": build("fast", calls),
                                   "slow": build("slow", calls, sleep_s=0.02)},
                                  rounds=3, steps_per_round=1, warmup=1)
    # Warm-up of each, then rounds in rotating order: AB, BA, AB.
    assert calls == ["fast", "slow", "fast", "slow", "slow", "fast", "fast", "slow"]
    assert comparison.errors == []
    assert comparison.step_round == {"fast": {0: 0, 1: 1, 2: 2}, "slow": {0: 0, 1: 1, 2: 2}}
    for variant, report in comparison.reports.items():
        validate_report(report.doc)
        assert report["model"] == variant and report["iters"] == 3 and report["warmup"] == 1
        assert any(f"Variant {variant!r}" in note for note in report["notes"])
    assert torch.autograd.backward is backward          # every profiler's hooks removed
    result = compare_variants({v: r.timeline for v, r in comparison.reports.items()},
                              comparison.step_round, ["fast", "slow"])
    assert set(result["phases_ms"]) == {"step", *PHASES}
    assert all(len(ms) == 3 for ms in result["per_round_ms"]["slow"].values())
    # 20 ms of sleep against about a millisecond of compute, in every round.
    assert any(line.startswith("forward, slow vs fast: ") and line.endswith(" slower")
               for line in result["differences"]), result["differences"]


def test_compare_training_keeps_what_was_measured_when_a_variant_fails():
    calls: list = []
    failures = {"left": 1}

    def fails_once_measured(out, t):       # the warm-up passes, the first measured step fails
        failures["left"] -= 1
        if failures["left"] < 0:
            raise RuntimeError("loss exploded")
        return torch.nn.functional.cross_entropy(out, t)

    comparison = compare_training({"a": build("a", calls),
                                   "b": build("b", calls, loss_fn=fails_once_measured)},
                                  rounds=3, steps_per_round=1, warmup=1)
    assert comparison.errors[0] == "b: RuntimeError: loss exploded"
    assert comparison.reports["a"]["iters"] == 1          # round 0 ran a, then b failed
    assert "b" not in comparison.reports and "b: no measured step" in comparison.errors


def test_compare_training_refuses_bad_input():
    calls: list = []
    with pytest.raises(ValueError, match=r"builds: expected a dict of at least two variants"):
        compare_training({"a": build("a", calls)})
    broken = build("b", calls)
    del broken["optimizer"]
    with pytest.raises(ValueError, match=r"builds\['b'\]: expected a dict with keys"):
        compare_training({"a": build("a", calls), "b": broken})
    with pytest.raises(ValueError, match="steps_per_round: expected an int >= 1, got 0"):
        compare_training({"a": build("a", calls), "b": build("b", calls)}, steps_per_round=0)
    assert calls == []                                     # nothing ran


def test_build_variants_checks_the_keyword_and_names_a_failing_variant():
    builds = build_variants(FACTORY, "conv", ["torch", "kernel"])
    assert list(builds) == ["torch", "kernel"]
    assert type(builds["kernel"]["model"].features[0]).__module__ == "ops.torch.conv"
    assert type(builds["torch"]["model"].features[0]) is torch.nn.Conv2d
    with pytest.raises(ValueError, match=r"--compare lr=\.\.\.: the factory "
                                         r"tests/user_models/torch_cnn.py:factory takes no "
                                         r"keyword 'lr' \(its parameters: samples, batch_size, "
                                         r"conv\)"):
        build_variants(FACTORY, "lr", ["0.1", "0.2"])
    with pytest.raises(ValueError, match=r"--compare conv=fast: the factory .* raised "
                                         r"ValueError: torch_cnn.factory: conv: expected one of"):
        build_variants(FACTORY, "conv", ["torch", "fast"])


# ----------------------------------------------------------------------------- the CLI

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "profiler.layerwise", "--model", FACTORY,
                           *args, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_compares_variants_of_a_factory(tmp_path):
    proc = _cli("--compare", "conv=torch,kernel", "--rounds", "2", "--steps-per-round", "1",
                "--warmup", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["kind"] == "conv" and doc["variants"] == ["torch", "kernel"]
    assert doc["model"] == FACTORY and doc["rounds"] == 2 and doc["errors"] == []
    assert list(doc["phases_ms"]) == ["step", *PHASES]
    assert all(set(by_variant) == {"torch", "kernel"} for by_variant in doc["phases_ms"].values())
    assert all(len(ms) == 2 for ms in doc["per_round_ms"]["kernel"].values())
    for name in ["step", *PHASES]:
        label = name.replace("_", " ")
        assert any(line.startswith(f"{label}, kernel vs torch: ") for line in doc["differences"])
    assert "Per phase, median of round medians" in proc.stdout
    assert f"{FACTORY}: conv variants vs torch" in proc.stdout
    assert "step, kernel vs torch: " in proc.stdout
    for variant in ("torch", "kernel"):
        report = json.loads((tmp_path / variant / "report.json").read_text())
        validate_report(report)
        assert report["model"] == "SmallCNN" and report["iters"] == 2
        assert [layer["name"] for layer in report["layers"]] == ["features.0", "features.3",
                                                                 "classifier"]
        assert (tmp_path / variant / "trace.json").is_file()


@pytest.mark.parametrize("compare, message", [
    ("lr=0.1,0.01", "the factory tests/user_models/torch_cnn.py:factory takes no keyword 'lr' "
                    "(its parameters: samples, batch_size, conv)"),
    ("conv=torch,fast", "--compare conv=fast: the factory tests/user_models/torch_cnn.py:"
                        "factory raised ValueError: torch_cnn.factory: conv: expected one of"),
])
def test_cli_refuses_a_factory_that_cannot_build_a_variant(tmp_path, compare, message):
    proc = _cli("--compare", compare, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compare, message", [
    ("conv=torch", "--compare conv=...: expected at least two distinct variants, got "
                   "['torch']"),
    ("conv=torch,kernel,torch", "expected at least two distinct variants"),
    ("1conv=torch,kernel", "with KEY a keyword argument of the factory (a Python identifier)"),
    ("class=a,b", "with KEY a keyword argument"),
    ("conv", "expected KEY=A,B,..."),
    ("conv=torch,../up", "each variant names its report's folder in --out"),
])
def test_cli_refuses_bad_compare_arguments_for_a_factory(compare, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        layerwise.parse_args(["--model", FACTORY, "--compare", compare])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_takes_any_keyword_for_a_factory_and_refuses_it_under_torchrun(monkeypatch):
    args = layerwise.parse_args(["--model", FACTORY, "--compare", "optimizer=sgd, adam",
                                 "--rounds", "3", "--steps-per-round", "1"])
    assert args.compare == ("optimizer", ["sgd", "adam"])
    assert (args.rounds, args.steps_per_round) == (3, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--compare optimizer=\.\.\.: compares variants in "
                                         r"one process; under torchrun"):
        layerwise.run(args)
