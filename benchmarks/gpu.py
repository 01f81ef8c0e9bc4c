"""The benchmark suite sized for one GPU (H100/H200 class), in under 8 minutes.

    python benchmarks/gpu.py                 # writes benchmarks/gpu/RESULTS.md + results.json

Same sections and method as ``benchmarks/run.py`` (variants alternate, medians of repeats, ratios within
the run), with GPU-sized batches: vgg16 batch 32 at 224 px, resnet18 batch 64, distortions on
64x3x224x224 on the GPU (OpenCV and PIL stay per image on the CPU, as users run them). Peak memory is
``torch.cuda.max_memory_allocated`` of a fresh subprocess per variant; the glibc allocator section is
CPU-only and skipped. The GPU's name is written into RESULTS.md beside every number.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device; use benchmarks/run.py on CPU")
    torch.backends.cudnn.benchmark = True
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [
        "--device", "cuda",
        "--repeats", "7",
        "--vgg16-batch", "32",
        "--small-batch", "64",
        "--distortion-batch", "64",
        "--sections", "train,loss,memory,distortions,data,eval",
        "--out", str(Path(__file__).resolve().parent / "gpu"),
        "--note", f"GPU: {torch.cuda.get_device_name(0)}.",
    ]  # fmt: skip
    return run.main(defaults + argv)  # later flags given by the user win


if __name__ == "__main__":
    main()
