"""Builds ops._C through CMake (CMakeLists.txt) and installs the Python packages.

Environment knobs, read at build time:
  OPS_CUDA       auto (default: build the CUDA kernels when nvcc is found), 1/on, 0/off
  OPS_CUDA_ARCH  CUDA architectures, CMake style (default "80;90")
  OPS_BUILD_TYPE CMake build type (default Release)
  OPS_BUILD_JOBS parallel compile jobs (default: CPU count)
  OPS_TORCH      auto (default: build the deepprof:: PyTorch operator library when torch
                 imports at build time), 1/on (required), 0/off

Works with build isolation (pyproject.toml names the build requirements) and without it
(`pip install --no-build-isolation --no-deps -e .`, as on the GPU machine against its own torch).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
TORCH_LIBRARY = "libdeepprof_torch.so"  # built by CMakeLists.txt when torch is found


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
        args += _torch_args()
        if nvcc and _switch("OPS_CUDA") != "OFF":
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        jobs = os.environ.get("OPS_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        self._place_torch_library(target.parent)

    def _place_torch_library(self, built_dir):
        """An editable install copies the outputs setuptools knows about (ops._C) into the
        source tree; the torch operator library is ours to copy (or to remove when stale)."""
        if not (self.inplace or getattr(self, "editable_mode", False)):
            return
        built, in_tree = built_dir / TORCH_LIBRARY, ROOT / "ops" / TORCH_LIBRARY
        if built.resolve() == in_tree.resolve():
            return
        if built.exists():
            shutil.copy2(built, in_tree)
        elif in_tree.exists():
            in_tree.unlink()


setup(
    name="deepprof",
    version="0.1.0",
    description="Hand-written C++/CUDA loss and conv kernels swapped into every framework, "
                "and a profiler that tells framework overhead from kernel time",
    packages=find_packages(include=["ops", "ops.*", "profiler", "profiler.*",
                                    "experiments", "experiments.*"]),
    ext_modules=[CMakeExtension("ops._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    package_data={"ops": [TORCH_LIBRARY]},
    zip_safe=False,
)
