"""The cost of content-verified checkpoints (issue 19): SHA-256 over vgg16-sized data (138.4M float32 parameters =
553 MB of weights; a momentum-SGD checkpoint holds the weights and one momentum buffer: 1.1 GB), in seconds per GB
on this machine. Prints one line per size.

    python benchmarks/checkpoint_hash.py
"""

import hashlib
import time

import torch

VGG16_PARAMS = 138_357_544


def seconds_per_gb(nbytes: int, repeats: int = 3) -> tuple[float, float]:
    data = memoryview(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy())
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        best = min(best, time.perf_counter() - tic)
    return best, best / (nbytes / 1e9)


if __name__ == "__main__":
    weights = VGG16_PARAMS * 4
    for name, nbytes in (("vgg16 weights", weights), ("vgg16 checkpoint (weights + momentum)", 2 * weights)):
        seconds, per_gb = seconds_per_gb(nbytes)
        print(f"{name}: {nbytes / 1e9:.2f} GB hashed in {seconds:.2f} s = {per_gb:.2f} s/GB (SHA-256, one core)")
