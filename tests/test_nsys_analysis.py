"""Known-input tests of profiler.nsys: synthetic Nsight Systems SQLite exports in the 2022.4
and 2025.x flavours, with ranges, CPU samples, kernels and memcpys placed by hand so every
expected attribution can be checked with pencil and paper. No nsys needed.

The run: pid 100, main thread 100 (steps and phases), an OpenMP worker 101 (no ranges), an
autograd thread 102 (layer backward ranges). Two steps of 20 ms; the first is the warm-up.
Step at b: data_wait [0,1) forward [1,9) (conv1 fwd [2,6), fc fwd [6,8)) loss_forward [9,10)
loss_backward [10,11) backward [11,17) (thread 102: fc bwd [12,14), conv1 bwd [14,16.5))
optimizer [17,19); the step's last ms is in no phase. Samples every 100 us.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import types
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

import profiler.nsys as nsys
from profiler.nsys import api, attribution, reader as cap, flame, libraries, summary
from profiler.nsys.reader import Frame
from profiler.nsys.errors import ProfilerNsysError

US = 1_000
MS = 1_000_000
PID, MAIN, WORKER, AUTOGRAD = 100, 100, 101, 102
STEP_MS = 20

TORCH_CPU = "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
OPENBLAS = "/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-ff651d7f.so"
NUMPY = "/venv/lib/python3.11/site-packages/numpy/core/_multiarray_umath.cpython-311.so"
PYTHON = "/usr/bin/python3.11"
OURS = "/work/main/ops/_C.cpython-311-x86_64-linux-gnu.so"

DNNL = [("dnnl::impl::cpu::x64::jit_avx2_conv_fwd_t::execute", TORCH_CPU),
        ("at::native::mkldnn_convolution", TORCH_CPU), ("_PyEval_EvalFrameDefault", PYTHON)]
BLAS_MEMCPY = [("__memcpy_avx_unaligned", LIBC), ("sgemm_kernel_HASWELL", OPENBLAS),
               ("_PyEval_EvalFrameDefault", PYTHON)]
NUMPY_MATMUL = [("DOUBLE_matmul", NUMPY), ("_PyEval_EvalFrameDefault", PYTHON)]
INTERP = [("_PyEval_EvalFrameDefault", PYTHON)]
OURS_BWD = [("deepprof::conv2d_backward_input", OURS), ("_PyEval_EvalFrameDefault", PYTHON)]
LONE_LIBC = [("__libc_write", LIBC)]


def gt(pid, tid):
    return (pid << 24) | tid


def step_ranges(k):
    """(label, start_ms, end_ms, tid, eventType) of step k."""
    b = k * STEP_MS
    return [("step", b, b + 20, MAIN, 59), ("data_wait", b, b + 1, MAIN, 59),
            ("forward", b + 1, b + 9, MAIN, 59),
            ("conv1 (forward)", b + 2, b + 6, MAIN, 59), ("fc (forward)", b + 6, b + 8, MAIN, 59),
            ("loss_forward", b + 9, b + 10, MAIN, 59),
            ("loss_backward", b + 10, b + 11, MAIN, 60), ("backward", b + 11, b + 17, MAIN, 60),
            ("fc (backward)", b + 12, b + 14, AUTOGRAD, 60),
            ("conv1 (backward)", b + 14, b + 16.5, AUTOGRAD, 60),
            ("optimizer", b + 17, b + 19, MAIN, 59)]


def step_samples(k):
    """(time_ms, tid, frames leaf first) of step k."""
    b = k * STEP_MS
    out = [(b + 1 + i / 10, MAIN, INTERP) for i in range(5)]                    # forward self
    out += [(b + 2 + i / 10, MAIN, DNNL if i < 20 else BLAS_MEMCPY) for i in range(30)]  # conv1
    out += [(b + 2 + i / 10, WORKER, DNNL) for i in range(5)]                   # worker, conv1
    out += [(b + 6 + i / 10, MAIN, NUMPY_MATMUL) for i in range(10)]            # fc forward
    out += [(b + 14 + i / 10, AUTOGRAD, OURS_BWD) for i in range(8)]            # conv1 bwd
    return out


def kernels():
    """(kind, name, start_ms, end_ms, corr, launch_ms, launch_tid, pid) in the measured step
    (b = 20), the warm-up step, outside every range, and in another process."""
    b = STEP_MS
    return [("kernel", "implicit_gemm_fwd", b + 2.2, b + 3.2, 1, b + 2.1, MAIN, PID),
            # launched in conv1 forward, runs while fc forward is open: still conv1's
            ("memcpy", 1, b + 7.0, b + 7.5, 2, b + 2.5, MAIN, PID),
            ("kernel", "gemm_bwd", b + 12.6, b + 13.6, 3, b + 12.5, AUTOGRAD, PID),
            ("kernel", "stray_kernel", 42.1, 42.2, 4, 42.0, MAIN, PID),
            ("kernel", "implicit_gemm_fwd", 2.2, 3.2, 5, 2.1, MAIN, PID),
            ("kernel", "other_process", b + 2.2, b + 3.0, 1, b + 2.1, MAIN, 200)]


def build_capture(path, flavour="2022", *, domain="deepprof", gpu=False, with_ranges=True):
    """A synthetic nsys export. 2022: NVTX text inline (as nsys 2022.4 writes unregistered
    strings). 2025: text through StringIds (textId), extra columns and enum tables, an
    unclosed range (end NULL)."""
    con = sqlite3.connect(path)
    strings = {}

    def sid(value):
        if value not in strings:
            strings[value] = len(strings) + 1
        return strings[value]

    extra = ", jsonTextId INTEGER, jsonText TEXT, binaryData BLOB" if flavour == "2025" else ""
    con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
    con.execute(f"CREATE TABLE NVTX_EVENTS (start INTEGER NOT NULL, end INTEGER, eventType "
                f"INTEGER NOT NULL, rangeId INTEGER, category INTEGER, color INTEGER, text TEXT, "
                f"globalTid INTEGER, endGlobalTid INTEGER, textId INTEGER, domainId INTEGER, "
                f"uint64Value INTEGER, int64Value INTEGER, doubleValue REAL, uint32Value INTEGER,"
                f" int32Value INTEGER, floatValue REAL{extra})")
    con.execute("CREATE TABLE ThreadNames (nameId INTEGER NOT NULL, priority INTEGER, "
                "globalTid INTEGER)")
    con.execute("CREATE TABLE COMPOSITE_EVENTS (id INTEGER NOT NULL PRIMARY KEY, start INTEGER "
                "NOT NULL, cpu INTEGER NOT NULL, threadState INTEGER NOT NULL, globalTid "
                "INTEGER NOT NULL, cpuCycles INTEGER NOT NULL)")
    con.execute("CREATE TABLE SAMPLING_CALLCHAINS (id INTEGER NOT NULL, symbol INTEGER NOT NULL,"
                " module INTEGER NOT NULL, kernelMode INTEGER NOT NULL, thumbCode INTEGER NOT "
                "NULL, stackDepth INTEGER NOT NULL, unresolved INTEGER NOT NULL, specialEntry "
                "INTEGER, originalIP INTEGER, PRIMARY KEY (id, stackDepth))")
    con.execute("CREATE TABLE EXPORT_META_DATA (name TEXT, value TEXT)")
    con.execute("INSERT INTO EXPORT_META_DATA VALUES ('EXPORT_PRODUCT_VERSION', ?)",
                ("2025.3.1.90" if flavour == "2025" else "2022.4.2.1",))
    if flavour == "2025":
        con.execute("CREATE TABLE ENUM_NSYS_EVENT_TYPE (id INTEGER PRIMARY KEY, name TEXT, "
                    "label TEXT)")
        con.executemany("INSERT INTO ENUM_NSYS_EVENT_TYPE VALUES (?, ?, ?)",
                        [(59, "NvtxPushPopRange", "NVTX push/pop"),
                         (60, "NvtxStartEndRange", "NVTX start/end")])
        con.execute("CREATE TABLE TARGET_INFO_SESSION_START_TIME (utcEpochNs INTEGER, "
                    "utcTime TEXT, localTime TEXT)")

    def nvtx(start, end, etype, label, tid, domain_id, pid=PID):
        if flavour == "2025":
            row = (start, end, etype, None, None, None, None, gt(pid, tid), None, sid(label),
                   domain_id)
        else:
            row = (start, end, etype, None, None, None, label, gt(pid, tid), None, None,
                   domain_id)
        con.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, rangeId, category, color, "
                    "text, globalTid, endGlobalTid, textId, domainId) VALUES "
                    "(?,?,?,?,?,?,?,?,?,?,?)", row)

    nvtx(0, None, 75, domain, MAIN, 1)
    nvtx(0, None, 75, "somebody_else", MAIN, 2)
    if with_ranges:
        for k in (0, 1):
            for label, s, e, tid, etype in step_ranges(k):
                nvtx(int(s * MS), int(e * MS), etype, label, tid, 1)
        nvtx(5 * MS, 6 * MS, 59, "step", MAIN, 2)          # another domain: not ours
        nvtx(5 * MS, 6 * MS, 59, "forward", MAIN, 0)       # the default domain: not ours
        nvtx(3 * MS, 4 * MS, 59, "step", MAIN, 1, pid=200)  # domain id 1 in another process
        if flavour == "2025":
            nvtx(41 * MS, None, 59, "step", MAIN, 1)         # still open at the end
    for tid, name in ((MAIN, "python3"), (WORKER, "omp_worker"), (AUTOGRAD, "autograd")):
        con.execute("INSERT INTO ThreadNames VALUES (?, 0, ?)", (sid(name), gt(PID, tid)))

    samples = step_samples(0) + step_samples(1)
    samples += [(45 + i / 10, MAIN, LONE_LIBC) for i in range(2)]   # after every range
    samples += [(STEP_MS + 2.0, 7, DNNL)]                           # other process (pid 200)
    for i, (t_ms, tid, frames) in enumerate(samples, start=1):
        pid = 200 if tid == 7 else PID
        con.execute("INSERT INTO COMPOSITE_EVENTS VALUES (?, ?, 0, 1, ?, 0)",
                    (i, int(round(t_ms * MS)), gt(pid, tid)))
        for depth, (sym, mod) in enumerate(frames):
            con.execute("INSERT INTO SAMPLING_CALLCHAINS VALUES (?, ?, ?, 0, 0, ?, 0, 0, 0)",
                        (i, sid(sym), sid(mod), depth))
    if gpu:
        con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER NOT NULL, end "
                    "INTEGER NOT NULL, eventClass INTEGER NOT NULL, globalTid INTEGER, "
                    "correlationId INTEGER, nameId INTEGER NOT NULL, returnValue INTEGER NOT "
                    "NULL, callchainId INTEGER)")
        con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER NOT NULL, end "
                    "INTEGER NOT NULL, deviceId INTEGER NOT NULL, contextId INTEGER NOT NULL, "
                    "streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER, "
                    "demangledName INTEGER NOT NULL, shortName INTEGER NOT NULL, mangledName "
                    "INTEGER, gridX INTEGER)")
        con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INTEGER NOT NULL, end "
                    "INTEGER NOT NULL, deviceId INTEGER NOT NULL, contextId INTEGER NOT NULL, "
                    "streamId INTEGER NOT NULL, correlationId INTEGER, globalPid INTEGER, "
                    "bytes INTEGER NOT NULL, copyKind INTEGER NOT NULL)")
        if flavour == "2025":
            con.execute("CREATE TABLE ENUM_CUDA_MEMCPY_OPER (id INTEGER PRIMARY KEY, name TEXT,"
                        " label TEXT)")
            con.execute("INSERT INTO ENUM_CUDA_MEMCPY_OPER VALUES (1, 'CUDA_MEMCPY_HTOD', "
                        "'Host-to-Device')")
        launch_name = sid("cudaLaunchKernel_v7000")
        for kind, name, s, e, corr, launch, tid, pid in kernels():
            con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, 0, ?, ?, ?, 0, 0)",
                        (int(launch * MS), int(launch * MS) + 5 * US, gt(pid, tid), corr,
                         launch_name))
            if kind == "kernel":
                con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES "
                            "(?, ?, 0, 1, 7, ?, ?, ?, ?, NULL, 1)",
                            (int(s * MS), int(e * MS), corr, pid << 24,
                             sid(name + "(float const*)"), sid(name)))
            else:
                con.execute("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY VALUES "
                            "(?, ?, 0, 1, 7, ?, ?, 4096, ?)",
                            (int(s * MS), int(e * MS), corr, pid << 24, name))
    con.executemany("INSERT INTO StringIds VALUES (?, ?)",
                    [(i, v) for v, i in strings.items()])
    con.commit()
    con.close()
    return path


REPORT = {"tool": "deepprof", "warmup": 1, "iters": 1,
          "step_ms": {"mean": 20.0},
          "phases_ms": {"data_wait": {"mean": 1.04}, "h2d": {"mean": 0.0},
                        "forward": {"mean": 8.3}, "loss_forward": {"mean": 1.0},
                        "loss_backward": {"mean": 1.0}, "backward": {"mean": 6.0},
                        "optimizer": {"mean": 2.5}, "other": {"mean": 1.0}},
          "layers": [{"name": "conv1", "forward_ms": 4.1, "backward_ms": 2.5},
                     {"name": "fc", "forward_ms": 2.0, "backward_ms": 3.0},
                     {"name": "bn", "forward_ms": 1.5, "backward_ms": 0.2}]}


@pytest.fixture(params=["2022", "2025"])
def flavour(request):
    return request.param


def by_name(rows, name, direction=None):
    return next(r for r in rows if r["name"] == name and
                (direction is None or r.get("direction") == direction))


# ----------------------------------------------------------------------------- reading

def test_reads_only_our_domain_and_process(tmp_path, flavour):
    c = cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour))
    assert len(c.ranges) == 22                          # 11 per step, nothing from elsewhere
    assert {r.pid for r in c.ranges} == {PID}
    assert {r.name for r in c.ranges} >= {"step", "conv1 (forward)", "fc (backward)"}
    assert c.schema["nvtx_text"] == ("string-ids" if flavour == "2025" else "inline-text")
    assert c.schema["nsys_version"] == ("2025.3.1.90" if flavour == "2025" else "2022.4.2.1")
    assert len(c.samples) == 2 * 58 + 2                 # the other process's sample is dropped
    assert c.samples[0].frames[0] == Frame("_PyEval_EvalFrameDefault", PYTHON)
    assert c.thread_names[(PID, AUTOGRAD)] == "autograd"
    if flavour == "2025":
        assert any("still open" in w for w in c.warnings)


def test_ranges_nest_by_thread_and_take_step_and_phase_from_time(tmp_path, flavour):
    c = cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour))
    att = attribution.attribute(c)
    assert att.main_thread == (PID, MAIN)
    assert len(att.steps) == 2
    fc_bwd = next(n for n in att.ranges if n.label == "fc (backward)" and n.step == 1)
    # On the autograd thread, with no phase range of its own: step and phase come from time.
    assert fc_bwd.parent is None and fc_bwd.phase == "backward" and fc_bwd.thread == "autograd"
    assert fc_bwd.frames == ("step", "backward", "fc", "backward")
    conv = next(n for n in att.ranges if n.label == "conv1 (forward)" and n.step == 1)
    assert conv.frames == ("step", "forward", "conv1", "forward")
    assert att.ranges[conv.parent].name == "forward"


# ----------------------------------------------------------------------------- CPU

def test_cpu_samples_split_a_layer_by_native_library(tmp_path, flavour):
    a = api.analyze(cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour)), REPORT)
    assert a["sampling_period_ns"] == 100 * US
    assert a["steps"] == {"in_capture": 2, "warmup": 1, "measured": 1}
    conv = by_name(a["layers"], "conv1", "forward")
    # 30 samples x 100 us = 3 ms of the 4 ms layer: 20 oneDNN, 10 a libc memcpy under
    # OpenBLAS (charged to OpenBLAS, its caller); the last ms had no sample.
    assert conv["samples"] == 30
    assert conv["libraries_ms"] == pytest.approx({"onednn": 2.0, "openblas": 1.0,
                                                  attribution.UNSAMPLED: 1.0})
    assert conv["ms"] == pytest.approx(4.0)
    assert conv["worker_thread_samples"] == {"onednn": 5}
    assert conv["top_functions"][0]["library"] == "onednn"
    assert conv["top_functions"][0]["share"] == pytest.approx(20 / 30)
    fc = by_name(a["layers"], "fc", "forward")
    assert fc["libraries_ms"] == pytest.approx({"numpy": 1.0, attribution.UNSAMPLED: 1.0})
    conv_bwd = by_name(a["layers"], "conv1", "backward")
    assert conv_bwd["libraries_ms"] == pytest.approx({"ours": 0.8, attribution.UNSAMPLED: 1.7})
    assert conv_bwd["threads"] == ["autograd"]
    # The forward phase: its own 5 interpreter samples plus both layers, summing to 8 ms.
    fwd = by_name(a["phases"], "forward")
    assert fwd["samples"] == 45
    assert sum(fwd["libraries_ms"].values()) == pytest.approx(8.0)
    assert fwd["libraries_ms"]["python"] == pytest.approx(0.5)


def test_time_outside_our_ranges_is_reported(tmp_path, flavour):
    a = api.analyze(cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour)), REPORT)
    # forward [1,9) minus conv1 [2,6) and fc [6,8): 2 ms no layer covers.
    assert by_name(a["phases"], "forward")["outside_ms"] == pytest.approx(2.0)
    # backward [11,17) minus the autograd thread's fc [12,14) and conv1 [14,16.5).
    assert by_name(a["phases"], "backward")["outside_ms"] == pytest.approx(1.5)
    # the step's last ms is in no phase
    assert by_name(a["phases"], "step")["outside_ms"] == pytest.approx(1.0)
    assert a["outside_ranges"]["samples"] == 2
    assert a["outside_ranges"]["samples_by_library"] == {"system": 2}
    assert a["outside_ranges"]["samples_by_when"] == {"after the last step": 2}


def test_cpu_flame_total_equals_the_ranges_total(tmp_path, flavour):
    a = api.analyze(cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour)))
    total = 2 * (STEP_MS + 2 + 2.5) * MS               # main thread steps + autograd ranges
    assert a["flame"]["kind"] == "cpu"
    assert a["flame"]["ranges_total_ns"] == total
    assert a["flame"]["total_ns"] == total
    assert sum(int(line.rsplit(" ", 1)[1]) for line in a["flame"]["folded"]) == total
    assert ("step;forward;conv1;forward;_PyEval_EvalFrameDefault;at::native::mkldnn_convolution;"
            "dnnl::impl::cpu::x64::jit_avx2_conv_fwd_t::execute "
            f"{2 * 20 * 100 * US}") in a["flame"]["folded"]


def test_allocate_self_time_is_exact():
    # Samples cover less than the range: one period each, the rest unsampled.
    assert attribution.allocate_self_time(1000, {("a",): 3, ("b",): 1}, 100) == {
        ("a",): 300, ("b",): 100, (attribution.UNSAMPLED,): 600}
    # More samples than the range holds: proportional, integers adding up exactly.
    got = attribution.allocate_self_time(1000, {("a",): 2, ("b",): 1}, 500)
    assert sum(got.values()) == 1000 and got[("a",)] == 667 and got[("b",)] == 333
    assert attribution.allocate_self_time(50, {}, 10) == {(attribution.UNSAMPLED,): 50}


@pytest.mark.parametrize("frames, expected", [
    (DNNL, "onednn"), (BLAS_MEMCPY, "openblas"), (NUMPY_MATMUL, "numpy"), (INTERP, "python"),
    (OURS_BWD, "ours"), (LONE_LIBC, "system"),
    ([("at::native::add_kernel", TORCH_CPU)], "framework"),
    ([("foo", "/venv/lib/python3.11/site-packages/torch/_C.cpython-311.so")], "framework"),
    ([("gomp_barrier_wait", "/venv/site-packages/torch/lib/libgomp-a34b3233.so.1"),
      ("mkl_blas_sgemm", "/x/libmkl_core.so")], "mkl"),
    ([("tensorflow::Conv2DOp::Compute", "/x/tensorflow/libtensorflow_framework.so.2")],
     "framework"),
    ([("0x7f00", "")], "other"),
    # Generated code (oneDNN's JIT kernels) is charged to the primitive that ran it; with no
    # caller outside generated or runtime code it stays "jit", also under an OpenMP worker.
    ([("0x7fc07403c01d", "//anon"), ("0x7fc07403c000", "//anon"),
      ("dnnl::impl::cpu::x64::jit_avx2_convolution_fwd_t::execute_forward", TORCH_CPU)],
     "onednn"),
    ([("0x7fc07403c01d", "//anon")], "jit"),
    ([("0x7fc07403c01d", "[anon:jit]"),
      ("gomp_thread_start", "/venv/site-packages/torch/lib/libgomp-a34b3233.so.1")], "jit"),
    ([("gomp_barrier_wait", "/venv/site-packages/torch/lib/libgomp-a34b3233.so.1")], "openmp"),
])
def test_library_classification(frames, expected):
    assert libraries.sample_library([Frame(s, m) for s, m in frames]) == expected


# ----------------------------------------------------------------------------- GPU

def test_kernels_join_to_the_launching_range(tmp_path, flavour):
    c = cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour, gpu=True))
    assert len(c.gpu) == 5                              # the other process's kernel dropped
    memcpy = next(g for g in c.gpu if g.kind == "memcpy")
    assert memcpy.name == ("[memcpy Host-to-Device]" if flavour == "2025" else "[memcpy HtoD]")
    att = attribution.attribute(c)
    conv = next(n for n in att.ranges if n.label == "conv1 (forward)" and n.step == 1)
    # The memcpy ran during fc forward but was launched inside conv1 forward: conv1's.
    assert sorted(g.correlation_id for g in conv.gpu) == [1, 2]
    fc_bwd = next(n for n in att.ranges if n.label == "fc (backward)" and n.step == 1)
    assert [g.name for g in fc_bwd.gpu] == ["gemm_bwd"]
    assert [g.correlation_id for g in att.outside_gpu] == [4]


def test_gpu_per_range_device_busy_idle_and_latency(tmp_path, flavour):
    a = api.analyze(cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour, gpu=True)),
                    REPORT)
    g = by_name(a["layers"], "conv1", "forward")["gpu"]
    assert g["kernels_per_step"] == 1 and g["memcpys_per_step"] == 1
    assert g["device_ms"] == pytest.approx(1.5)        # 1 ms kernel + 0.5 ms memcpy
    assert g["busy_in_range_ms"] == pytest.approx(1.0)  # the memcpy ran after the layer
    assert g["idle_ms"] == pytest.approx(3.0)           # [2,6) minus the kernel [2.2,3.2)
    assert g["launch_to_start_us_mean"] == pytest.approx((100 + 4500) / 2)
    assert g["top"][0] == {"name": "implicit_gemm_fwd", "count_per_step": 1, "ms": 1.0}
    assert by_name(a["phases"], "forward")["gpu"]["device_ms"] == pytest.approx(1.5)
    assert by_name(a["phases"], "backward")["gpu"]["device_ms"] == pytest.approx(1.0)
    assert a["outside_ranges"]["gpu_activities"] == 1
    # GPU flame graph: device time, every activity once, the stray one outside our ranges.
    assert a["flame"]["kind"] == "gpu"
    # 2 x 1 ms conv1 kernels (warm-up and measured), the memcpy, gemm_bwd and the stray one
    assert a["flame"]["total_ns"] == a["flame"]["ranges_total_ns"] == int(3.6 * MS)
    assert f"step;forward;conv1;forward;implicit_gemm_fwd {2 * MS}" in a["flame"]["folded"]
    assert f"{flame.OUTSIDE};stray_kernel {100 * US}" in a["flame"]["folded"]
    assert a["flame"]["cpu_folded"]                     # the CPU view is kept beside it


# ----------------------------------------------------------------------------- agreement

def test_agreement_with_the_profilers_clocks(tmp_path, flavour):
    a = api.analyze(cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour)), REPORT)
    rows = {r["name"]: r for r in a["agreement"]["rows"]}
    assert rows["forward"]["nsys_ms"] == pytest.approx(8.0)
    assert rows["forward"]["diff_ms"] == pytest.approx(-0.3)
    assert rows["forward"]["agrees"]                   # 3.6% < 5%
    assert rows["data_wait"]["agrees"]                 # 40 us < 50 us
    assert not rows["optimizer"]["agrees"] and rows["optimizer"]["checked"]   # 0.5 ms, 20%
    assert rows["other"]["nsys_ms"] == pytest.approx(1.0) and rows["other"]["agrees"]
    assert rows["conv1 (forward)"]["agrees"] and rows["conv1 (backward)"]["agrees"]
    assert not rows["fc (backward)"]["agrees"]          # 2 ms vs 3 ms
    assert rows["bn (forward)"]["nsys_ms"] is None and not rows["bn (forward)"]["agrees"]
    assert rows["bn (backward)"]["checked"]            # missing rows are always checked
    listed = {r["name"] for r in a["agreement"]["disagreements"]}
    assert listed == {"optimizer", "fc (backward)", "bn (forward)", "bn (backward)"}


def test_agreement_row_rule():
    assert summary._agree("phase", "x", 10.0, 10.49)["agrees"]
    assert not summary._agree("phase", "x", 10.0, 10.6)["agrees"]
    assert summary._agree("phase", "x", 0.5, 0.549)["agrees"]     # 49 us
    small = summary._agree("phase", "x", 0.5, 0.8)
    assert not small["agrees"] and not small["checked"]           # under 1 ms: not checked


# ----------------------------------------------------------------------------- outputs

def test_write_outputs_and_render(tmp_path, flavour):
    a = api.analyze(cap.read_capture(build_capture(tmp_path / "c.sqlite", flavour)), REPORT)
    paths = nsys.write_outputs(a, tmp_path / "out")
    assert sorted(paths) == sorted(api.OUTPUT_FILES)
    folded = (tmp_path / "out" / "nsys.folded").read_text().splitlines()
    assert folded == a["flame"]["folded"]
    doc = json.loads((tmp_path / "out" / "nsys.speedscope.json").read_text())
    assert sum(doc["profiles"][0]["weights"]) == a["flame"]["total_ns"]
    assert doc["profiles"][0]["endValue"] == a["flame"]["total_ns"]
    assert json.loads((tmp_path / "out" / "nsys_analysis.json").read_text())["layers"]
    svg = ET.parse(tmp_path / "out" / "nsys.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    titles = [t.text for t in svg.iter(f"{ns}title")]
    assert titles[0].startswith("all (49.000 ms, 100.00%)")
    assert any(t.startswith("conv1 (") for t in titles)
    assert not any("href" in k for el in svg.iter() for k in el.attrib)   # nothing to fetch
    console = Console(record=True, width=200)
    nsys.render_tables(a, console)
    text = console.export_text()
    assert "conv1" in text and "onednn 50%" in text and "DISAGREES" in text
    assert "[not sampled] 25%" in text                  # brackets survive rich markup


def test_svg_widths_follow_weights():
    svg = flame.render_svg({("a", "b"): 3, ("a", "c"): 1}, title="t")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    widths = {g.find(f"{ns}title").text.split(" (")[0]: float(g.find(f"{ns}rect").get("width"))
              for g in root.iter(f"{ns}g")}
    assert widths["all"] == widths["a"] == pytest.approx(1180)
    assert widths["b"] == pytest.approx(3 * widths["c"])


def test_cli_table_json_and_out(tmp_path, capsys):
    path = build_capture(tmp_path / "c.sqlite")
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    from profiler.nsys.__main__ import main
    assert main([str(path), "--format", "json", "--report", str(tmp_path / "report.json"),
                 "--out", str(tmp_path / "o")]) == 0
    assert json.loads(capsys.readouterr().out)["agreement"]["disagreements"]
    assert (tmp_path / "o" / "nsys.svg").exists()
    assert main([str(tmp_path / "missing.sqlite")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

def test_missing_file(tmp_path):
    with pytest.raises(ProfilerNsysError, match="no such file"):
        nsys.analyze_capture(tmp_path / "nope.sqlite")


def test_not_a_sqlite(tmp_path):
    p = tmp_path / "x.sqlite"
    p.write_text("this is a text file, long enough to have a header of a hundred bytes " * 3)
    with pytest.raises(ProfilerNsysError, match="not a SQLite database"):
        nsys.analyze_capture(p)


def test_truncated_sqlite(tmp_path):
    p = build_capture(tmp_path / "c.sqlite")
    data = p.read_bytes()
    assert len(data) > 8192
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(ProfilerNsysError, match="truncated"):
        nsys.analyze_capture(p)


def test_capture_without_our_domain(tmp_path, flavour):
    p = build_capture(tmp_path / "c.sqlite", flavour, domain="not_ours")
    with pytest.raises(ProfilerNsysError, match=r"no NVTX domain 'deepprof'.*not_ours"):
        nsys.analyze_capture(p)


def test_domain_without_ranges(tmp_path):
    p = build_capture(tmp_path / "c.sqlite", with_ranges=False)
    with pytest.raises(ProfilerNsysError, match="holds no ranges"):
        nsys.analyze_capture(p)


def test_sqlite_without_nvtx(tmp_path):
    p = tmp_path / "c.sqlite"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
    con.commit()
    con.close()
    with pytest.raises(ProfilerNsysError, match="no NVTX_EVENTS table"):
        nsys.analyze_capture(p)


def test_nsys_rep_without_nsys(tmp_path, monkeypatch):
    rep = tmp_path / "profile.nsys-rep"
    rep.write_bytes(b"not really a report")

    class NsysNotFound(Exception):
        pass

    def export_sqlite(*args, **kwargs):
        raise NsysNotFound("nsys not on PATH, $NSYS or the usual places")

    stub = types.ModuleType("profiler.nsys.tool")
    stub.NsysNotFound, stub.export_sqlite = NsysNotFound, export_sqlite
    monkeypatch.setitem(sys.modules, "profiler.nsys.tool", stub)
    monkeypatch.setattr(nsys, "tool", stub, raising=False)
    with pytest.raises(ProfilerNsysError, match=r"profile\.nsys-rep.*nsys was not found"):
        nsys.analyze_capture(rep)


def test_bad_report(tmp_path):
    p = build_capture(tmp_path / "c.sqlite")
    with pytest.raises(ProfilerNsysError, match="report .*no such file"):
        nsys.analyze_capture(p, tmp_path / "missing.json")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ProfilerNsysError, match="not a deepprof report"):
        nsys.analyze_capture(p, tmp_path / "r.json")
