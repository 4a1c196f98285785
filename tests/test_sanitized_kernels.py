"""The CPU conv kernels under AddressSanitizer and UndefinedBehaviorSanitizer: a C++ driver
(tests/native/conv2d_cpu_sanitized.cpp) compiled with the kernel sources runs random shapes on
every GEMM path this CPU runs, at several thread counts. A write past a buffer in the
Python-level tests corrupts the heap silently and aborts the process later, in whatever test
runs then (how a one-value overrun of gx showed itself in CI); here it is reported at the
faulty access, with its stack."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "native" / "conv2d_cpu_sanitized.cpp"
KERNEL_SOURCES = [ROOT / "csrc" / "conv2d_cpu.cpp", ROOT / "csrc" / "gemm_cpu.cpp"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer"]
# Fixed seeds: a failure names its shape and reproduces. 600 shapes: about 25 s on 2 cores (the
# naive float64 reference most of it), after a 20 s compile.
SEEDS_AND_SHAPES = [(1, 300), (2, 300)]


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def sanitized_driver(tmp_path_factory):
    """The driver built with the sanitizers; skipped (with the reason) where this compiler has
    no sanitizer or OpenMP runtime, which a compile of an empty program tells apart from our
    errors."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (CXX, g++ or c++) on PATH")
    folder = tmp_path_factory.mktemp("sanitized")
    probe = folder / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    tried = subprocess.run([compiler, "-fopenmp", *SANITIZE, str(probe), "-o",
                            str(folder / "probe")], capture_output=True, text=True)
    if tried.returncode != 0:
        pytest.skip(f"{compiler} cannot link the sanitizers (or OpenMP) here: "
                    f"{tried.stderr.strip()[-300:]}")
    binary = folder / "conv2d_cpu_sanitized"
    built = subprocess.run([compiler, "-std=c++17", "-O1", "-g", "-fopenmp", *SANITIZE,
                            # std::vector's spare capacity counts as outside it
                            "-D_GLIBCXX_SANITIZE_VECTOR=1",
                            f"-I{ROOT / 'csrc'}", str(DRIVER), *map(str, KERNEL_SOURCES),
                            "-o", str(binary)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    return binary


@pytest.mark.parametrize("seed,shapes", SEEDS_AND_SHAPES)
def test_conv_kernels_stay_inside_their_buffers(sanitized_driver, seed, shapes):
    env = dict(os.environ)
    # LeakSanitizer stops under ptrace (some containers) and the kernels keep per-thread
    # buffers until exit by design; an overrun or use-after-free still aborts at once.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
    env.pop("OPS_CPU_GEMM", None)  # the driver sets every path itself
    run = subprocess.run([str(sanitized_driver), str(shapes), str(seed)], capture_output=True,
                         text=True, env=env, timeout=600)
    report = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, report
    assert f"{shapes} shapes, 0 disagreed" in run.stdout, report
