"""Per-kernel resource usage (registers, stack, shared/local memory, spills) of the built CUDA
module, read from the binary with ``cuobjdump -res-usage``, so it works on any already-built
``lmkernels/_cuda*.so`` without a GPU.

``cuobjdump`` reports, per kernel and per machine-code arch, ``REG`` (registers per thread),
``STACK`` (stack frame bytes), ``SHARED`` (static shared memory bytes) and ``LOCAL`` (local
memory bytes per thread). Spilled registers live in local memory through the stack frame, so
``stack == local == 0`` proves there are no spills. On sm_90 ``SHARED`` also counts the 1 KiB
that the system reserves per block (ptxas's own ``smem`` figure leaves it out). The exact spill
byte counts only appear in ptxas's ``-v`` log of the build (the CMake build passes
``-Xptxas=-v``); give that log as ``ptxas_log`` to add ``spill_stores`` / ``spill_loads``.

Run ``python -m lmkernels.cuda_resources [SO_PATH] [--ptxas-log FILE]`` for a Markdown table.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["cuda_kernel_resources", "find_cuobjdump", "format_resource_table", "parse_ptxas_log"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _default_so_path() -> Path:
    found = sorted(_PACKAGE_DIR.glob("_cuda*.so"))
    if not found:
        raise FileNotFoundError(
            f"no built CUDA module (_cuda*.so) in {_PACKAGE_DIR}; build it with "
            "`pip install -e . --no-build-isolation` on a machine with nvcc, or pass so_path"
        )
    return found[0]


def _nvcc_toolkit_bin() -> Path | None:
    """The real toolkit bin dir behind ``nvcc`` on PATH (which may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(nvcc).resolve()
    if (real.parent / "cuobjdump").is_file():
        return real.parent
    # A wrapper script: nvcc's dry run prints the directory it really lives in (_HERE_=...).
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return real.parent
    m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return Path(m.group(1).strip()) if m else real.parent


def _candidate_tools() -> list[Path]:
    cands: list[Path] = []
    if os.environ.get("LMKERNELS_CUOBJDUMP"):
        cands.append(Path(os.environ["LMKERNELS_CUOBJDUMP"]))
    on_path = shutil.which("cuobjdump")
    if on_path:
        cands.append(Path(on_path))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    nvcc_bin = _nvcc_toolkit_bin()
    if nvcc_bin is not None:
        cands.append(nvcc_bin / "cuobjdump")
    # Triton ships its own CUDA binutils; find_spec locates it without importing triton.
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump")
    cands.append(Path("/usr/local/cuda/bin/cuobjdump"))
    return cands


def find_cuobjdump() -> Path:
    """Locate ``cuobjdump``: $LMKERNELS_CUOBJDUMP, PATH, $CUDA_HOME/$CUDA_PATH, nvcc's toolkit,
    Triton's bundled copy, /usr/local/cuda. Raises FileNotFoundError naming where it looked."""
    cands = _candidate_tools()
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    looked = ", ".join(str(c) for c in cands) or "(no candidates)"
    raise FileNotFoundError(
        "cuobjdump not found (looked in: " + looked + "); install the CUDA toolkit or Triton, "
        "or set LMKERNELS_CUOBJDUMP"
    )


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled via one ``c++filt`` call; identity when c++filt is missing."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run(
            [tool],
            input="\n".join(names) + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    if len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out, strict=True))


def parse_ptxas_log(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """Parse ptxas ``-v`` output into {(mangled kernel, arch): {registers, stack_frame,
    spill_stores, spill_loads}}."""
    result: dict[tuple[str, str], dict[str, int]] = {}
    key: tuple[str, str] | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            key = (m.group(1), m.group(2))
            result[key] = {}
            continue
        if key is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            result[key].update(
                stack_frame=int(m.group(1)),
                spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)),
            )
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            result[key]["registers"] = int(m.group(1))
            key = None
    return result


def _parse_res_usage(text: str) -> list[dict]:
    rows: list[dict] = []
    arch = None
    pending: str | None = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            pending = m.group(1)
            continue
        if pending is not None and "REG:" in line:
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            rows.append(
                {
                    "mangled": pending,
                    "arch": arch,
                    "registers": int(fields.get("REG", 0)),
                    "stack": int(fields.get("STACK", 0)),
                    "shared": int(fields.get("SHARED", 0)),
                    "local": int(fields.get("LOCAL", 0)),
                    "constant": int(fields.get("CONSTANT[0]", 0)),
                }
            )
            pending = None
    return rows


def cuda_kernel_resources(
    so_path: str | os.PathLike | None = None, ptxas_log: str | os.PathLike | None = None
) -> list[dict]:
    """Resource usage of every kernel in the built CUDA module, per machine-code arch.

    Args:
        so_path: the module; default: ``lmkernels/_cuda*.so`` beside this file.
        ptxas_log: optional path of a saved ptxas ``-v`` log of the same build; adds exact
            ``spill_stores`` / ``spill_loads`` (bytes) to the rows it covers.

    Returns:
        One dict per (kernel, arch), sorted by kernel then arch: ``kernel`` (demangled when
        ``c++filt`` exists, else mangled), ``mangled``, ``arch`` ("sm_80"), ``registers``,
        ``stack``, ``shared`` (static smem bytes), ``local`` (bytes per thread), ``constant``
        (cmem[0] bytes), ``spill_stores`` / ``spill_loads`` (from the ptxas log, else None) and
        ``spills`` (True when anything indicates spilling: stack, local or spill bytes > 0).

    Raises:
        FileNotFoundError: the module or cuobjdump is missing.
        RuntimeError: cuobjdump failed or found no kernels.
    """
    so = Path(so_path) if so_path is not None else _default_so_path()
    if not so.is_file():
        raise FileNotFoundError(f"CUDA module not found: {so}")
    tool = find_cuobjdump()
    proc = subprocess.run(
        [str(tool), "-res-usage", str(so)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{tool} -res-usage {so} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    rows = _parse_res_usage(proc.stdout)
    if not rows:
        raise RuntimeError(f"{tool} found no kernels with machine code in {so}")

    spills = parse_ptxas_log(Path(ptxas_log).read_text()) if ptxas_log is not None else {}
    names = _demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["mangled"]]
        info = spills.get((r["mangled"], r["arch"]), {})
        r["spill_stores"] = info.get("spill_stores")
        r["spill_loads"] = info.get("spill_loads")
        r["spills"] = bool(r["stack"] or r["local"] or r["spill_stores"] or r["spill_loads"])
    rows.sort(key=lambda r: (r["kernel"], r["arch"]))
    return [
        {
            k: r[k]
            for k in (
                "kernel",
                "mangled",
                "arch",
                "registers",
                "stack",
                "shared",
                "local",
                "constant",
                "spill_stores",
                "spill_loads",
                "spills",
            )
        }
        for r in rows
    ]


def _short_name(kernel: str) -> str:
    """Drop namespaces and the parameter list: 'lmk::(anon)::k<float, 4>(...)' -> 'k<float, 4>'."""
    depth = 0
    for i, ch in enumerate(kernel):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0 and not kernel[:i].endswith("::"):
            kernel = kernel[:i]
            break
    kernel = re.sub(r"^(void )?", "", kernel)
    return re.sub(r"^.*::(?=[^:<]*(<|$))", "", kernel)


def format_resource_table(rows: list[dict]) -> str:
    """A Markdown table of cuda_kernel_resources() rows."""
    lines = [
        "| kernel | arch | registers | smem (B) | stack (B) | local (B) | spill st/ld (B) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spill = "-" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(
            f"| `{_short_name(r['kernel'])}` | {r['arch']} | {r['registers']} | {r['shared']} "
            f"| {r['stack']} | {r['local']} | {spill} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("so_path", nargs="?", default=None)
    parser.add_argument("--ptxas-log", default=None)
    args = parser.parse_args(argv)
    rows = cuda_kernel_resources(args.so_path, args.ptxas_log)
    print(format_resource_table(rows))
    bad = [r for r in rows if r["spills"]]
    print(f"\n{len(rows)} kernel/arch entries, {len(bad)} with possible spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
