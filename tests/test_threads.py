"""ops.threads: one thread count reaches every framework, BLAS/OpenMP library and our kernels,
and the report says what each one then uses. Each case runs in a fresh interpreter, because a
framework's pools can be sized only before it starts work, and this suite's process has long
started them."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ops import threads


def run_fresh(code: str, **env: str) -> dict:
    """Runs ``code`` (which prints one JSON line last) in a new interpreter with ``env`` added
    to the environment; returns that line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("framework", threads.FRAMEWORKS)
@pytest.mark.parametrize("count", [1, 3])
def test_every_framework_reports_the_count_it_was_given(framework, count):
    """Before the framework's first operation: its intra-op threads, every BLAS and OpenMP
    library loaded and our kernels (ops._C and the framework's op library, where loaded) all
    report ``count``, after one operation as well; nothing is reported as ignored."""
    if framework != "chainer":   # Chainer computes with NumPy here: its BLAS is what counts
        pytest.importorskip(framework)
    run = {
        "torch": "import ops.torch as adapter; import torch; "
                 "adapter.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1), impl='native')",
        "tensorflow": "import ops.tensorflow as adapter; import tensorflow as tf; "
                      "adapter.conv2d(tf.ones((1, 1, 3, 3)), tf.ones((1, 1, 1, 1)), "
                      "impl='native')",
        "mxnet": "import ops.mxnet as adapter; import mxnet as mx; "
                 "adapter.conv2d(mx.nd.ones((1, 1, 3, 3)), mx.nd.ones((1, 1, 1, 1)), "
                 "impl='native').wait_to_read()",
        "chainer": "import numpy as np; np.ones((64, 64)) @ np.ones((64, 64))",
    }[framework]
    report = run_fresh(f"""
        import json, warnings
        warnings.simplefilter("error", RuntimeWarning)
        from ops import threads
        problems = threads.set_cpu_threads({count}, ["{framework}"])
        {run}
        print(json.dumps(dict(problems=problems,
                              report=threads.thread_report("{framework}", {count}))))
    """)
    assert report["problems"] == []
    got = report["report"]
    assert got["requested"] == count and got["ignored"] == [], got
    assert got["ours"]["ops._C"] == count, got
    if framework in ("torch", "tensorflow"):
        assert got["intra_op"] == count, got
    if framework != "chainer":
        assert any(name.startswith("libdeepprof_") for name in got["ours"]), got
    assert got["blas"] or got["openmp"], got   # something was read, not an empty report


def test_a_count_tensorflow_can_no_longer_take_is_reported_not_hidden():
    """TensorFlow sizes its pools when its runtime starts: a later count is refused, and the
    refusal is a returned problem and a RuntimeWarning, and the report lists it as ignored."""
    pytest.importorskip("tensorflow")
    report = run_fresh("""
        import json, warnings
        import tensorflow as tf
        tf.constant(1.0) + 1.0            # the runtime starts with its default pools
        from ops import threads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            problems = threads.set_cpu_threads(1, ["tensorflow"])
        print(json.dumps(dict(problems=problems, warned=[str(w.message) for w in caught],
                              report=threads.thread_report("tensorflow", 1))))
    """)
    assert len(report["problems"]) == 1 and "TensorFlow's intra-op threads" in \
        report["problems"][0], report
    assert report["warned"] == report["problems"]
    if report["report"]["intra_op"] != 1:
        assert "intra_op" in report["report"]["ignored"], report


def test_physical_cores_is_at_most_the_cpus_this_process_may_use():
    assert 1 <= threads.physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"set_cpu_threads: threads: expected a positive int, got 0"),
    (2.0, TypeError, r"threads: expected a positive int, got float 2.0"),
    (True, TypeError, r"threads: expected a positive int, got bool True"),
])
def test_bad_counts_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        threads.set_cpu_threads(value, [])


def test_bad_framework_names_are_refused():
    with pytest.raises(ValueError, match=r"frameworks: expected names from .*got \['jax'\]"):
        threads.set_cpu_threads(1, ["jax"])
    with pytest.raises(TypeError, match=r"frameworks: expected a sequence of names"):
        threads.set_cpu_threads(1, "torch")
    with pytest.raises(ValueError, match=r"thread_report: framework: expected one of"):
        threads.thread_report("jax")


@pytest.mark.parametrize("text, expected", [("3", 3), ("1", 1)])
def test_ops_cpu_threads_is_every_kernel_copys_default(text, expected):
    """OPS_CPU_THREADS sets the default of ops._C and of an op library loaded later."""
    pytest.importorskip("torch")
    report = run_fresh("""
        import json, torch
        import ops.torch
        ops.torch.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1), impl="native")
        from ops import threads
        print(json.dumps(threads.thread_report("torch")["ours"]))
    """, OPS_CPU_THREADS=text)
    assert report == {"ops._C": expected, "libdeepprof_torch.so": expected}


@pytest.mark.parametrize("text", ["0", "two", "-1", "1.5"])
def test_a_bad_ops_cpu_threads_fails_at_import(text):
    done = subprocess.run([sys.executable, "-c", "import ops"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OPS_CPU_THREADS": text})
    assert done.returncode != 0
    assert f"OPS_CPU_THREADS: expected a whole number of threads >= 1 (or unset), got " \
           f"{text!r}" in done.stderr
