"""Our CPU kernels on every GEMM path this CPU runs (OPS_CPU_GEMM / ops.core.set_gemm_path) and
for several thread counts (ops.core.set_cpu_threads), against the NumPy float64 reference; the
environment variable reaching ops._C and the torch operator library; bad settings refused."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import ops
from ops import _C, core
from tests.kernel_calls import (ADAPTER_CONV_CASES, assert_conv2d_matches_reference, conv2d_all,
                                conv_case_id, conv_case_inputs, pairs)

ROOT = Path(__file__).resolve().parent.parent

# Shapes that exercise the GEMM's blocking: K = 288 > KC (two K panels), Cout = 100 > MC (two M
# blocks forward, K > MC backward-data), P > NR, full register tiles; batch 1 splits each GEMM's
# columns across the threads, batch 4 gives the threads whole images.
COLUMN_SPLIT_CASE = (1, 32, 12, 12, 100, (3, 3), 1, 1, 1, True)
IMAGE_SPLIT_CASE = (4, 24, 9, 9, 20, (3, 3), 1, 1, 1, True)
POINTWISE_CASE = (4, 16, 16, 16, 16, (1, 1), 1, 0, 1, False)  # the GEMM reads x directly
# ResNet's first stage: P = 1024 > KC (positions in several K panels for backward-weight), rows
# of 32 positions (16-position transposes), K = 144 = 4.5 strips of 32 (a partial strip).
RESNET_STAGE1_CASE = (2, 16, 32, 32, 16, (3, 3), 1, 1, 1, False)
# ResNet's downsampling 3x3/2: the image's rows split into 2 column phases (consecutive reads).
RESNET_DOWNSAMPLE_CASE = (2, 16, 32, 32, 32, (3, 3), 2, 1, 1, True)
# P = 529 >= 512 positions in rows of 23: backward-weight's dot products, with steps that cross
# a row (added value by value) and a tail; batch 1 splits its K = 144 columns across threads.
ODD_ROWS_CASE = (1, 16, 23, 23, 8, (3, 3), 1, 1, 1, True)
CASES = ADAPTER_CONV_CASES + [COLUMN_SPLIT_CASE, IMAGE_SPLIT_CASE, POINTWISE_CASE,
                              RESNET_STAGE1_CASE, RESNET_DOWNSAMPLE_CASE, ODD_ROWS_CASE]
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])


def check_against_reference(case, dtype, seed=0):
    x, w, b, gy, params = conv_case_inputs(case, dtype, seed)
    params = pairs(params)
    assert_conv2d_matches_reference(conv2d_all(x, w, b, gy, **params), x, w, b, gy, params)


@pytest.fixture(params=core.GEMM_PATHS)
def gemm_path(request):
    """Each GEMM path in turn, for ops._C's kernels; restored afterwards."""
    path = request.param
    if path not in core.gemm_paths():
        pytest.skip(f"this CPU does not run the {path!r} GEMM path (it runs {core.gemm_paths()})")
    previous = core.gemm_path()
    core.set_gemm_path(path)
    yield path
    core.set_gemm_path(previous)


@pytest.fixture
def restore_threads():
    previous = core.cpu_threads()
    yield
    core.set_cpu_threads(previous)


def test_paths_are_consistent():
    paths = core.gemm_paths()
    assert paths and paths[-1] == "baseline" and set(paths) <= set(core.GEMM_PATHS)
    assert set(paths) <= set(ops.build_info()["cpu_gemm_paths"])
    assert core.gemm_path() in paths
    info = core.cpu_info()
    assert info == {"gemm_path": core.gemm_path(), "gemm_paths": paths,
                    "threads": core.cpu_threads()}


@DTYPES
@pytest.mark.parametrize("case", CASES, ids=conv_case_id)
def test_conv2d_matches_reference_on_every_path(gemm_path, case, dtype):
    assert core.gemm_path() == gemm_path
    check_against_reference(case, dtype)


@DTYPES
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=conv_case_id)
def test_conv2d_matches_reference_for_thread_counts(restore_threads, threads, case, dtype):
    """1 thread, and 3: more than this machine's cores and not a divisor of the batch sizes."""
    core.set_cpu_threads(threads)
    assert core.cpu_threads() == threads
    check_against_reference(case, dtype, seed=1)


# Widths narrower than the stride: with the image split into column phases (a strided conv that
# reads most of the image), some phases hold no input column at all. A draw of test_conv2d's
# hypothesis sweep found the first: gx's last row was written one value past its end.
NARROW_CASES = [
    (1, 2, 5, 1, 3, (3, 1), 2, 0, 1, False),  # width 1, stride 2: phase 1 empty
    (2, 2, 4, 1, 3, (3, 3), 3, 1, 1, True),  # width 1, stride 3, padded: phase 2 empty
    (3, 1, 1, 1, 2, (1, 1), 2, 0, 1, False),  # one pixel, stride 2
    (2, 3, 7, 2, 2, (2, 2), (1, 4), 0, 1, True),  # width 2, stride 4
    (2, 3, 9, 33, 5, (3, 3), 2, 1, 1, True),  # the 2-phase split's vector loop and its tail
]
GUARD = 64  # values of sentinel before and after every output
SENTINEL = 12345.0


def guarded(shape, dtype):
    """(an output array of `shape`, the buffer around it, guarded by SENTINEL on both sides)."""
    size = int(np.prod(shape))
    buffer = np.full(size + 2 * GUARD, SENTINEL, dtype)
    return buffer[GUARD:GUARD + size].reshape(shape), buffer


@DTYPES
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", CASES + NARROW_CASES, ids=conv_case_id)
def test_conv2d_writes_only_its_outputs(gemm_path, restore_threads, threads, case, dtype):
    """Every direction on every path writes inside its output and nowhere around it (a write
    past an output corrupts the heap: the process then aborts later, elsewhere), and right."""
    core.set_cpu_threads(threads)
    x, w, b, gy, params = conv_case_inputs(case, dtype, seed=2)
    params = pairs(params)
    y, y_buffer = guarded(gy.shape, dtype)
    gx, gx_buffer = guarded(x.shape, dtype)
    gw, gw_buffer = guarded(w.shape, dtype)
    core.conv2d_forward(x, w, b, y, **params)
    core.conv2d_backward_data(gy, w, gx, **params)
    core.conv2d_backward_weight(x, gy, gw, **params)
    for name, buffer in (("y", y_buffer), ("gx", gx_buffer), ("gw", gw_buffer)):
        assert np.all(buffer[:GUARD] == SENTINEL), f"{name}: written before its start"
        assert np.all(buffer[-GUARD:] == SENTINEL), f"{name}: written past its end"
    assert_conv2d_matches_reference((y, gx, gw, None), x, w, b, gy, params)


def test_thread_count_is_process_wide(restore_threads):
    """Set on the main thread, seen by (and used for) kernels called from another thread, as a
    framework's worker thread would call them; OpenMP's own setting is per thread."""
    core.set_cpu_threads(3)
    seen = {}

    def worker():
        seen["threads"] = core.cpu_threads()
        x, w, b, gy, params = conv_case_inputs(IMAGE_SPLIT_CASE, np.float64)
        params = pairs(params)
        try:
            assert_conv2d_matches_reference(conv2d_all(x, w, b, gy, **params), x, w, b, gy,
                                            params)
        except AssertionError as error:
            seen["error"] = error

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen.get("threads") == 3 and "error" not in seen


@pytest.mark.parametrize("bad", [0, -2, 2 ** 31])
def test_set_cpu_threads_refuses_counts_out_of_range(bad):
    before = core.cpu_threads()
    with pytest.raises(ValueError, match=r"set_cpu_threads: n: expected an int .*got "):
        core.set_cpu_threads(bad)
    assert core.cpu_threads() == before
    with pytest.raises(ValueError, match=r"set_cpu_threads: n: expected an int >= 1, got 0"):
        _C.set_cpu_threads(0)  # the kernel library checks too: the op libraries share it


@pytest.mark.parametrize("bad", [1.0, True, "2", None])
def test_set_cpu_threads_refuses_non_ints(bad):
    with pytest.raises(TypeError, match="set_cpu_threads: n: expected an int >= 1"):
        core.set_cpu_threads(bad)


@pytest.mark.parametrize("bad", ["auto", "AVX2", "sse", ""])
def test_set_gemm_path_refuses_unknown_names(bad):
    before = core.gemm_path()
    with pytest.raises(ValueError, match=r"set_gemm_path: name: expected one of '.*' \(the GEMM "
                                         rf"paths this CPU runs\), got '{bad}'$"):
        core.set_gemm_path(bad)
    assert core.gemm_path() == before
    with pytest.raises(TypeError, match="set_gemm_path: name: expected a str"):
        core.set_gemm_path(None)


CPU_KINDS = {"avx512": ["avx512", "avx2", "baseline"], "avx2": ["avx2", "baseline"],
             "baseline": ["baseline"]}


def test_what_each_setting_chooses():
    """The decision behind OPS_CPU_GEMM for CPUs with AVX-512F, with AVX2 + FMA only and with
    neither, the others included although this machine is only one of them: a path the CPU
    does not run must be refused, never run."""
    resolve = _C._resolve_cpu_gemm_path
    for best, runnable in CPU_KINDS.items():
        for setting in ("auto", "", "  Auto\n"):
            assert resolve(setting, runnable) == best
        for path in runnable:
            assert resolve(path, runnable) == path
            assert resolve(path.upper(), runnable) == path
        for path in set(core.GEMM_PATHS) - set(runnable):
            allowed = " or ".join(f"'{p}'" for p in ["auto"] + runnable)
            allowed = allowed.replace(" or ", ", ", len(runnable) - 1)
            with pytest.raises(ValueError, match=rf"OPS_CPU_GEMM: expected {allowed} \(the GEMM "
                                                 rf"paths this CPU runs; this (CPU lacks|build has only) .*\), "
                                                 rf"got '{path}'"):
                resolve(path, runnable)
        for bad in ("avx1024", "sse4", "x86-64-v4"):
            with pytest.raises(ValueError, match=r"OPS_CPU_GEMM: expected 'auto', 'avx512', "
                                                 rf"'avx2' or 'baseline', got '{bad}'"):
                resolve(bad, runnable)
    with pytest.raises(ValueError, match="runnable: expected the paths a CPU runs"):
        resolve("auto", ["avx2"])


# ---- the environment variable, in fresh processes ----------------------------------------------

def run_python(code, env_value, **extra_env):
    """Runs ``code`` in a fresh interpreter with OPS_CPU_GEMM=env_value (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OPS_CPU_GEMM"}
    if env_value is not None:
        env["OPS_CPU_GEMM"] = env_value
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("setting", [None, "auto", "avx512", "avx2", "baseline", " Baseline "])
def test_env_var_picks_the_path_of_ops_C(setting):
    expected = core.gemm_paths()[0] if setting in (None, "auto") else setting.strip().lower()
    if expected not in core.gemm_paths():
        pytest.skip(f"this CPU does not run the {expected!r} GEMM path")
    result = run_python("""
        from ops import core
        from tests.test_cpu_paths import check_against_reference, IMAGE_SPLIT_CASE
        check_against_reference(IMAGE_SPLIT_CASE, __import__("numpy").float32)
        print(core.gemm_path())
        """, setting)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected]


@pytest.mark.parametrize("setting", ["avx1024", "yes"] + [
    path for path in core.GEMM_PATHS if path not in core.gemm_paths()])
def test_bad_env_var_is_a_value_error_at_import(setting):
    result = run_python("import ops", setting)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: OPS_CPU_GEMM: expected '"), result.stderr
    assert last_line.endswith(f"got '{setting}'"), result.stderr


def test_env_var_reaches_the_torch_operators():
    """OPS_CPU_GEMM is obeyed by torch.ops.deepprof (its own copy of the kernels): the library
    reports the path it ran, and its forward is bit for bit ops._C's on that path."""
    pytest.importorskip("torch")
    from ops.torch.loader import native_unavailable_reason
    reason = native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no native torch ops: {reason}")
    code = """
        import ctypes
        import numpy as np
        import torch
        from ops import core
        from ops import torch as ot
        from ops.torch.loader import LIBRARY
        from tests.kernel_calls import conv_case_inputs, pairs
        from tests.test_cpu_paths import IMAGE_SPLIT_CASE

        x, w, b, gy, params = conv_case_inputs(IMAGE_SPLIT_CASE, np.float32)
        params = pairs(params)
        y_native = ot.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                             impl="native", **params).numpy()
        query = ctypes.CDLL(str(LIBRARY)).deepprof_cpu_gemm_path
        query.restype = ctypes.c_char_p
        y_ours = np.empty_like(y_native)
        core.conv2d_forward(x, w, b, y_ours, **params)
        print(query().decode(), core.gemm_path(), bool(np.array_equal(y_native, y_ours)))
        """
    for path in core.gemm_paths():
        result = run_python(code, path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [path, path, "True"], result.stdout


def test_torch_operators_refuse_a_bad_env_var_without_ops():
    """Loaded on their own (no ``import ops`` to fail first), the torch operators refuse a bad
    OPS_CPU_GEMM with an error naming it instead of running a GEMM."""
    pytest.importorskip("torch")
    from ops.torch.loader import LIBRARY, native_unavailable_reason
    reason = native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no native torch ops: {reason}")
    result = run_python(f"""
        import torch
        torch.ops.load_library({str(LIBRARY)!r})
        x, w = torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3)
        try:
            torch.ops.deepprof.conv2d(x, w, None, [1, 1], [0, 0], [1, 1])
        except Exception as error:
            print(type(error).__name__, str(error).splitlines()[0])
        """, "sse4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ValueError OPS_CPU_GEMM: expected 'auto', 'avx512', "
                                    "'avx2' or 'baseline', got 'sse4'"), result.stdout


@pytest.mark.parametrize("omp_threads", ["1", "3"])
def test_thread_count_defaults_to_omp_num_threads(omp_threads):
    result = run_python("from ops import core; print(core.cpu_threads())", None,
                        OMP_NUM_THREADS=omp_threads)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [omp_threads]


def test_torch_operator_library_has_its_own_thread_count():
    """The torch operator library's copy of the kernels starts from the same OpenMP default as
    ops._C's (torch itself resets OpenMP's count at import: it caps OMP_NUM_THREADS at the
    cores), is set through its exported setter without touching ops._C's, and gives reference
    results for 1 and 3 threads, batch 1 and 4."""
    pytest.importorskip("torch")
    from ops.torch.loader import native_unavailable_reason
    reason = native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no native torch ops: {reason}")
    result = run_python("""
        import ctypes
        import numpy as np
        import torch
        from ops import core
        from ops import torch as ot
        from ops.torch.loader import LIBRARY, native_unavailable_reason
        from tests.kernel_calls import assert_conv2d_matches_reference, conv_case_inputs, pairs
        from tests.test_cpu_paths import COLUMN_SPLIT_CASE, IMAGE_SPLIT_CASE

        assert native_unavailable_reason() is None
        library = ctypes.CDLL(str(LIBRARY))
        default = core.cpu_threads()
        assert library.deepprof_cpu_threads() == default
        assert library.deepprof_set_cpu_threads(0) == -1
        for threads in (1, 3):
            assert library.deepprof_set_cpu_threads(threads) == 0
            assert library.deepprof_cpu_threads() == threads
            assert core.cpu_threads() == default
            for case in (IMAGE_SPLIT_CASE, COLUMN_SPLIT_CASE):
                x, w, b, gy, params = conv_case_inputs(case, np.float64)
                params = pairs(params)
                xt = torch.from_numpy(x).requires_grad_()
                wt = torch.from_numpy(w).requires_grad_()
                bt = torch.from_numpy(b).requires_grad_()
                y = ot.conv2d(xt, wt, bt, impl="native", **params)
                y.backward(torch.from_numpy(gy))
                ours = (y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy())
                assert_conv2d_matches_reference(ours, x, w, b, gy, params)
        print("ok")
        """, None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok"]
