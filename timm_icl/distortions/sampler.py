"""The training sampler: one condition per image, drawn uniformly over a distortion set, seeded, checkpointable."""

from __future__ import annotations

import torch

from .registry import distortion_names
from .sets import DistortionSet, apply_distortions, parse_distortions

__all__ = ["DistortionSampler"]


class DistortionSampler:
    """Draws one condition per image, uniformly over a distortion set, and applies it on the images' device.

    Args:
        distortions: a :class:`DistortionSet` or its text form; default the paper's ten conditions.
        clean_fraction: probability that an image is left clean (0 in the paper's protocol).
        seed: seed of the sampler's own generators (one per device); ``None`` draws from torch's global RNG.

    The draw is reproducible: the same seed and the same sequence of batch shapes give the same
    conditions and noise. ``state_dict()``/``load_state_dict()`` checkpoint the generators for resume.

    Example:
        >>> sampler = DistortionSampler("noise:20 blur:2", seed=0)
        >>> distorted, (kinds, sigmas) = sampler(torch.rand(4, 3, 16, 16))
    """

    def __init__(
        self,
        distortions: str | DistortionSet | None = None,
        clean_fraction: float = 0.0,
        seed: int | None = None,
    ):
        self.distortions = parse_distortions(distortions)
        if not 0.0 <= clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
        if any(c.kernel_size is not None for c in self.distortions):
            raise ValueError("the training sampler supports only the paper's blur kernel size (4*sigma - 1)")
        self.clean_fraction = float(clean_fraction)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        kind_index = [distortion_names().index(c.kind) for c in self.distortions]
        self._kinds = torch.tensor(kind_index, dtype=torch.long)
        self._sigmas = torch.tensor([c.sigma for c in self.distortions], dtype=torch.float32)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per device: copied once, not per step

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = (self._kinds.to(device), self._sigmas.to(device))
        return self._tables[key]

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            # A distinct stream per device type so CPU and CUDA runs are each reproducible.
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(kinds [B] long, sigmas [B] float32)`` on ``device``."""
        device = torch.device(device)
        gen = self._generator(device)
        choice = torch.randint(len(self.distortions), (batch_size,), generator=gen, device=device)
        kinds_table, sigmas_table = self._tables_on(device)
        kinds = kinds_table[choice]
        sigmas = sigmas_table[choice]
        if self.clean_fraction > 0:
            clean = torch.rand(batch_size, generator=gen, device=device) < self.clean_fraction
            kinds = torch.where(clean, torch.zeros_like(kinds), kinds)
            sigmas = torch.where(clean, torch.zeros_like(sigmas), sigmas)
        return kinds, sigmas

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Distort a clean batch ``[B, C, H, W]`` in [0, 1]; returns ``(distorted, (kinds, sigmas))``."""
        kinds, sigmas = self.sample(images.shape[0], images.device)
        distorted = apply_distortions(
            images, kinds, sigmas, generator=self._generator(images.device), conditions=self.distortions
        )
        return distorted, (kinds, sigmas)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        for key, gen_state in state["generators"].items():
            self._generator(torch.device(key)).set_state(gen_state)

    def __repr__(self) -> str:
        return (
            f"DistortionSampler({self.distortions.to_text()!r}, clean_fraction={self.clean_fraction}, seed={self.seed})"
        )
