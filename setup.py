"""Builds ops._C through CMake (CMakeLists.txt) and installs the Python packages.

Environment knobs, read at build time:
  OPS_CUDA       auto (default: build the CUDA kernels when nvcc is found), 1/on, 0/off
  OPS_CUDA_ARCH  CUDA architectures, CMake style (default "80;90")
  OPS_BUILD_TYPE CMake build type (default Release)
  OPS_BUILD_JOBS parallel compile jobs (default: CPU count)
  OPS_TORCH      auto (default: build the deepprof:: PyTorch operator library when torch
                 imports at build time), 1/on (required), 0/off
  OPS_TF         the same for the TensorFlow op library (libdeepprof_tf.so)
  OPS_MXNET      the same for the MXNet external operator library (libdeepprof_mxnet.so)
  OPS_NVTX       auto (default: emit the profiler's NVTX ranges through the NVTX C API when the
                 nvtx3 headers are found: beside nvcc, CUDA_HOME, /usr/local/cuda), 1/on, 0/off

Works with build isolation (pyproject.toml names the build requirements) and without it
(`pip install --no-build-isolation --no-deps -e .`, as on the GPU machine against its own torch).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Framework op libraries CMakeLists.txt builds beside ops._C when the framework is found.
FRAMEWORK_LIBRARIES = ["libdeepprof_torch.so", "libdeepprof_tf.so", "libdeepprof_mxnet.so"]


def _switch(variable):
    value = os.environ.get(variable, "auto").strip().lower()
    mapping = {"auto": "AUTO", "": "AUTO", "1": "ON", "on": "ON", "true": "ON",
               "0": "OFF", "off": "OFF", "false": "OFF"}
    if value not in mapping:
        raise SystemExit(f"{variable}: expected auto, 1/on or 0/off, got {value!r}")
    return mapping[value]


def _torch_args():
    """CMake arguments for the PyTorch operator library, from the torch this Python imports."""
    if _switch("OPS_TORCH") == "OFF":
        return []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if _switch("OPS_TORCH") == "ON":
            raise SystemExit("OPS_TORCH=1 but torch does not import in this build environment "
                             "(build with --no-build-isolation)")
        print("setup.py: torch not importable here; skipping libdeepprof_torch")
        return []
    return [f"-DOPS_TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DOPS_TORCH_LIBRARY_DIR={cpp_extension.library_paths()[0]}",
            f"-DOPS_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _tensorflow_args():
    """CMake arguments for the TensorFlow op library, from tf.sysconfig."""
    if _switch("OPS_TF") == "OFF":
        return []
    try:
        import tensorflow as tf
    except ImportError:
        if _switch("OPS_TF") == "ON":
            raise SystemExit("OPS_TF=1 but tensorflow does not import in this build environment")
        print("setup.py: tensorflow not importable here; skipping libdeepprof_tf")
        return []
    return [f"-DOPS_TF_COMPILE_FLAGS={';'.join(tf.sysconfig.get_compile_flags())}",
            f"-DOPS_TF_LINK_FLAGS={';'.join(tf.sysconfig.get_link_flags())}",
            f"-DOPS_TF_CUDA={'ON' if tf.test.is_built_with_cuda() else 'OFF'}"]


def _mxnet_args():
    """CMake arguments for the MXNet operator library: the package folder, found without
    importing mxnet (its wheel ships include/mxnet/lib_api.h and src/lib_api.cc)."""
    if _switch("OPS_MXNET") == "OFF":
        return []
    spec = importlib.util.find_spec("mxnet")
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / "src" / "lib_api.cc").is_file():
        if _switch("OPS_MXNET") == "ON":
            raise SystemExit("OPS_MXNET=1 but no mxnet with src/lib_api.cc is installed")
        print("setup.py: no mxnet wheel with lib_api.cc here; skipping libdeepprof_mxnet")
        return []
    return [f"-DOPS_MXNET_DIR={folder}"]


def _find_nvcc():
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # Prefer the cmake installed beside this Python (the pinned one) over the system's.
        beside = Path(sys.executable).parent / "cmake"
        cmake = str(beside) if beside.is_file() else shutil.which("cmake")
        if cmake is None:
            raise SystemExit("cmake was not found on PATH: `pip install cmake` (see requirements/)")
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed build folder per interpreter keeps rebuilds incremental across pip runs.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DOPS_OUTPUT_DIR={target.parent}",
            f"-DOPS_EXTENSION_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DOPS_CUDA={_switch('OPS_CUDA')}",
            f"-DOPS_CUDA_ARCHITECTURES={os.environ.get('OPS_CUDA_ARCH', '80;90')}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('OPS_BUILD_TYPE', 'Release')}",
        ]
        try:
            import pybind11
            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            raise SystemExit("pybind11 is not installed: `pip install pybind11` "
                             "(see requirements/)")
        nvcc = _find_nvcc()
        args += _torch_args() + _tensorflow_args() + _mxnet_args()
        args.append(f"-DOPS_NVTX={_switch('OPS_NVTX')}")
        if nvcc:
            # The nvtx3 headers ship in the toolkit nvcc belongs to (header-only: needed even
            # where the CUDA half is not built).
            args.append(f"-DOPS_NVTX_HINTS={Path(nvcc).resolve().parent.parent / 'include'}")
        if nvcc and _switch("OPS_CUDA") != "OFF":
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        jobs = os.environ.get("OPS_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        self._place_framework_libraries(target.parent)

    def _place_framework_libraries(self, built_dir):
        """An editable install copies the outputs setuptools knows about (ops._C) into the
        source tree; the framework op libraries are ours to copy (or to remove when stale)."""
        if not (self.inplace or getattr(self, "editable_mode", False)):
            return
        for name in FRAMEWORK_LIBRARIES:
            built, in_tree = built_dir / name, ROOT / "ops" / name
            if built.resolve() == in_tree.resolve():
                continue
            if built.exists():
                shutil.copy2(built, in_tree)
            elif in_tree.exists():
                in_tree.unlink()


setup(
    name="deepprof",
    version="0.2.0",
    description="Hand-written C++/CUDA loss and conv kernels swapped into every framework, "
                "and a profiler that tells framework overhead from kernel time",
    packages=find_packages(include=["ops", "ops.*", "profiler", "profiler.*",
                                    "experiments", "experiments.*"]),
    ext_modules=[CMakeExtension("ops._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    package_data={"ops": FRAMEWORK_LIBRARIES},
    zip_safe=False,
)
