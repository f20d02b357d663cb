"""Thin setuptools wrapper: CMakeLists.txt is the one description of the C++/CUDA build.

    pip install -e . --no-build-isolation

Environment: LMKERNELS_SKIP_CUDA=1 (do not build the CUDA module), LMKERNELS_CUDA_ARCHS
(default "80;90"), MAX_JOBS / CMAKE_BUILD_PARALLEL_LEVEL (build parallelism).
"""

import glob
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(ROOT, "build", "cmake")  # fixed: editable rebuilds stay warm


def _cmake_binary() -> str:
    # pip does not put the venv's bin/ on PATH during a build: take the cmake package's binary
    # when it is installed, else the one on PATH.
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return "cmake"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if ext.name != "lmkernels._C":  # one CMake run builds every module
            return
        import pybind11
        import torch.utils

        pkg_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        # setuptools copies only the declared extension (_C) out of its build directory in an
        # editable install; _cuda is optional (no nvcc: not built), so for editable installs
        # CMake also installs straight into the source package.
        pkg_dirs = {pkg_dir}
        if getattr(self, "editable_mode", False) or self.inplace:
            pkg_dirs.add(os.path.join(ROOT, "lmkernels"))
        os.makedirs(BUILD_DIR, exist_ok=True)
        cmake = os.environ.get("CMAKE") or _cmake_binary()
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        configure = [
            cmake, "-S", ROOT, "-B", BUILD_DIR,
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        if not os.path.exists(os.path.join(BUILD_DIR, "CMakeCache.txt")):
            try:
                import ninja

                configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja.BIN_DIR}/ninja"]
            except ImportError:
                pass
        jobs = os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL")
        build = [cmake, "--build", BUILD_DIR] + (["-j", jobs] if jobs else [])
        # Remove modules of an earlier build that this build may not produce (e.g. _cuda after
        # LMKERNELS_SKIP_CUDA=1): two copies of one TORCH_LIBRARY in a process abort it.
        for d in [*pkg_dirs, BUILD_DIR]:
            for stale in glob.glob(os.path.join(d, "_cuda*.so")):
                os.remove(stale)
        subprocess.check_call(configure)
        subprocess.check_call(build)
        for d in pkg_dirs:
            subprocess.check_call([cmake, "--install", BUILD_DIR, "--prefix", os.path.dirname(d)])


setup(
    packages=["lmkernels", "lmkernels.ops", "lmkernels.triton_kernels", "lmkernels.bench"],
    ext_modules=[CMakeExtension("lmkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
