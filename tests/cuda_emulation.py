"""Build a CUDA kernel file for its host emulation: g++ compiles ``source`` (a C++ harness that
defines the device primitives and ``#include``s the .cu file named by ``macro``) against the
CUDA toolkit's headers into a shared library loaded with ctypes. Skips, printing why, when g++
or the toolkit's headers are missing."""

import ctypes
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build(tmp_dir, name: str, source: str, macro: str, std: str = "c++17",
          defines=()) -> ctypes.CDLL:  # fmt: skip
    """``csrc/cuda/<name>.cu`` compiled through ``source`` (``-D<macro>="<path of the .cu>"``)."""
    from lmkernels.cuda_resources import _nvcc_toolkit_bin

    gxx = shutil.which("g++")
    nvcc_bin = _nvcc_toolkit_bin()
    if gxx is None or nvcc_bin is None:
        pytest.skip("the emulation needs g++ and the CUDA toolkit's headers (nvcc)")
    incs = [d for d in (nvcc_bin.parent / "include", nvcc_bin.parent / "targets" / "x86_64-linux"
                        / "include") if (d / "cuda_fp16.h").is_file()]  # fmt: skip
    if not incs:
        pytest.skip(f"cuda_fp16.h not found next to {nvcc_bin}")
    cpp, lib = tmp_dir / f"{name}_emu.cpp", tmp_dir / f"{name}_emu.so"
    cpp.write_text(source)
    cu = ROOT / "csrc" / "cuda" / f"{name}.cu"
    cmd = [gxx, f"-std={std}", "-O2", "-fPIC", "-shared", f"-I{incs[0]}",
           f"-I{ROOT / 'csrc' / 'include'}", f'-D{macro}="{cu}"', *defines, "-x", "c++",
           str(cpp), "-o", str(lib)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return ctypes.CDLL(str(lib))
