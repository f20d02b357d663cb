"""python -m lmkernels {info, gpu-report}"""

from __future__ import annotations

import json
import sys


def _info() -> int:
    import lmkernels

    data = lmkernels.info()
    print(f"lmkernels {lmkernels.__version__}")
    for key in ("torch", "torch_cuda", "triton", "triton_interpret", "cpu_capability",
                "cpu_kernels", "cuda_devices", "selected"):  # fmt: skip
        print(f"  {key:<17} {data.get(key)}")
    if "cuda_module" in data:
        print(f"  {'cuda_module':<17} {json.dumps(data['cuda_module'])}")
    for mod, status in data["modules"].items():
        print(f"  module {mod:<10} {status}")
    print("backends:")
    for name, per_device in data["backends"].items():
        for device, status in per_device.items():
            print(f"  {name:<10} {device:<5} {status}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("  info        versions, devices, each backend's availability and why not")
        print("  gpu-report  registers / spills / shared memory of every GPU kernel build")
        return 0
    if argv[0] == "info":
        return _info()
    if argv[0] == "gpu-report":
        from lmkernels.gpu_report import main as report

        return report(argv[1:])
    print(f"unknown command {argv[0]!r}; try --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
