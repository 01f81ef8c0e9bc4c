"""ICLTask: fine-tuning on distorted images with a constraint toward a frozen reference, as a timm task.

One call, from clean images to the loss::

    clean [B, 3, H, W] uint8 (or float in [0, 1]) --> float / 255 on the device
      |-- sampler: one (kind, sigma) per image, on the device --> distorted --> normalise --> student
      |                                                           (hooks capture h_dist; logits)
      `-- normalise --> reference (frozen copy of the student at construction, no autograd,
                        stops after the last constrained layer) --> 1[h_ref > 0] (or h_ref for MSE)
    loss = CE(logits, target) + lambda * constraint(h_dist, reference targets)

The reference is deliberately *not* a registered submodule: it is not in ``state_dict()`` (so not in
checkpoints), not in ``parameters()`` (so not in the optimiser or DDP), and stays in eval mode.
``.to()``/``.cuda()`` on the task still move it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.task import TrainingTask
from timm.utils.model import unwrap_model
from torch import nn

from .capture import capture_preactivations, resolve_layers, run_until_captured
from .data.preprocess import check_unit_range, normalize, resolve_mean_std, to_unit_float
from .distortions import DistortionSampler, DistortionSet
from .layers import default_layers
from .losses import DEFAULT_LAMBDA, JSDConsistencyLoss, create_constraint

__all__ = ["ICLTask"]

_logger = logging.getLogger(__name__)


def _no_autocast(device: torch.device):
    """Leave any autocast region of ``device``'s type: what runs inside computes in its tensors' own dtypes."""
    return torch.autocast(device_type=device.type, enabled=False)


def _full_precision(images: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 images -> float32 (the distortions' precision); float32/float64 stay as they are."""
    return images.float() if images.dtype in (torch.float16, torch.bfloat16) else images


class ICLTask(TrainingTask):
    """Intermediate Constraint Loss fine-tuning task (and its baselines).

    Args:
        model: the timm student model (its weights at construction become the frozen reference).
        constraint: ``"icl"`` (paper), ``"mse"`` (paper's baseline), ``"ab"`` (activation boundary), ``"jsd"``
            (timm's AugMix consistency: JSD over a distorted, the clean and another distorted view, no reference),
            ``"icl+jsd"`` (both: ICL on the first distorted view, JSD over the three views) or ``"none"`` (plain
            fine-tuning on distorted images).
        constraint_weight: lambda; default 0.1 for icl, 0.05 for mse and ab, 12 for jsd, 0 for none (for icl+jsd:
            ICL's lambda, default 0.1).
        jsd_weight: the JSD weight of ``"icl+jsd"`` (default 12, AugMix's and timm's alpha); unused otherwise.
        layers: constrained layers (names, fnmatch patterns, ``name:input``); default the family preset.
        distortions: distortion set or its text; default the paper's ten conditions.
        clean_fraction: probability that a training image is left clean.
        alpha: ICL sigmoid gain (paper: 100). margin: AB margin.
        reference: an explicit frozen reference model (default: a deep copy of ``model``).
        reference_dtype: dtype of the reference copy (e.g. ``torch.bfloat16`` for a cheaper reference).
        reference_channels_last: run the reference in channels-last memory format (vgg16 reference forward
            on CPU: about 2x faster, the same bits in benchmarks/RESULTS.md; the student is unaffected).
        criterion: recognition loss; default cross-entropy.
        mean, std: input normalisation; default the model's ``pretrained_cfg``.
        seed: seed of the distortion sampler (use a different seed per rank).

    ``forward(images, target)`` returns ``{"loss", "output", "task_loss", "constraint_loss"}``.

    Precision: the distortions run in float32 and the reference in its own dtype (``reference_dtype``, default the
    student's), both outside any autocast region; only the student runs under the caller's autocast. So live
    targets are the bits a :class:`~timm_icl.target_cache.TargetCache` holds, at any mixed precision.

    Example:
        >>> task = ICLTask(timm.create_model("vgg_tiny"), constraint="icl", seed=0)
        >>> out = task(torch.rand(8, 3, 28, 28), torch.randint(0, 10, (8,)))
        >>> out["loss"].backward()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        constraint: str = "icl",
        constraint_weight: float | None = None,
        layers: str | Sequence[str] | None = None,
        distortions: str | DistortionSet | None = None,
        clean_fraction: float = 0.0,
        alpha: float = 100.0,
        margin: float = 1.0,
        reference: nn.Module | None = None,
        reference_dtype: torch.dtype | None = None,
        reference_channels_last: bool = False,
        criterion: Callable | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        jsd_weight: float = 12.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = False,
    ):
        if device is None:  # follow the model rather than timm's CPU default, so .to() never moves it back
            param = next(model.parameters(), None)
            device = param.device if param is not None else None
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        kwargs = {"icl": {"alpha": alpha}, "icl+jsd": {"alpha": alpha}, "ab": {"margin": margin}}.get(constraint, {})
        self.constraint_name = constraint
        self.constraint = create_constraint(constraint, **kwargs)
        self.constraint_weight = float(DEFAULT_LAMBDA[constraint] if constraint_weight is None else constraint_weight)
        # icl+jsd: the ICL constraint above, plus timm's JSD consistency over [distorted, clean, distorted']
        self.consistency = JSDConsistencyLoss(3) if constraint == "icl+jsd" else None
        self.jsd_weight = float(jsd_weight)
        if self.constraint_weight < 0 or self.jsd_weight < 0:
            raise ValueError(
                f"constraint_weight (lambda) and jsd_weight must be >= 0, got {self.constraint_weight}, "
                f"{self.jsd_weight}"
            )
        self.trainable_module = model
        self.layers = resolve_layers(model, default_layers(model) if layers is None else layers)
        self.sampler = DistortionSampler(distortions, clean_fraction=clean_fraction, seed=seed)
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

        mean, std = resolve_mean_std(model, mean, std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        # The reference exists only when a constraint uses it: plain fine-tuning pays nothing.
        ref = None
        if self.constraint is not None and getattr(self.constraint, "needs_reference", True):
            ref = reference if reference is not None else copy.deepcopy(unwrap_model(model))
            ref = ref.eval().requires_grad_(False)
            if reference_dtype is not None:
                ref = ref.to(reference_dtype)
            if reference_channels_last:
                ref = ref.to(memory_format=torch.channels_last)
            resolve_layers(ref, self.layers)  # fail early if the explicit reference lacks the layers
        self.reference_channels_last = bool(reference_channels_last)
        self._reference_holder: list[nn.Module | None] = [ref]  # a list hides it from nn.Module registration
        self.to(self.device)
        self._checked_input_range = False

    # -- the reference, outside nn.Module's bookkeeping -------------------------------------------------
    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model (``None`` for plain fine-tuning)."""
        return self._reference_holder[0]

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        ref = self._reference_holder[0] if hasattr(self, "_reference_holder") else None
        if ref is not None:
            ref_dtype = next(ref.parameters()).dtype
            ref._apply(fn)
            # keep a deliberately reduced-precision reference reduced (e.g. task.float() after bf16 copy)
            if next(ref.parameters()).dtype != ref_dtype and ref_dtype in (torch.bfloat16, torch.float16):
                ref.to(ref_dtype)
        return result

    def release_reference(self) -> None:
        """Free the frozen reference when every batch brings cached targets (see :mod:`timm_icl.target_cache`).

        Afterwards ``forward`` needs ``reference_targets=``; the memory of a whole model copy is returned.
        """
        self._reference_holder[0] = None
        self._reference_released = True

    def train(self, mode: bool = True) -> ICLTask:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- timm task API ----------------------------------------------------------------------------------
    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> ICLTask:
        """Wrap the student in DDP; the reference stays unwrapped (it has no gradients)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the student (hooks are registered on the unwrapped module and fire through compile)."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module:
        """The plain timm student, unwrapped from DDP / torch.compile."""
        if module is None:
            module = self.get_trainable_module(ema=ema)
        return unwrap_model(module)

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """State the task owns outside the model's weights: the distortion sampler's generators (per process)."""
        return {"sampler": self.sampler.state_dict()}

    def load_task_state(
        self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None, ema: bool = False
    ) -> None:
        """Restore :meth:`get_task_state`, so a resumed run draws the same conditions and noise."""
        if state is None:
            if strict:
                raise ValueError("no task state to load (a checkpoint without the sampler's state?)")
            return
        self.sampler.load_state_dict(state["sampler"])

    # -- the computation --------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` with the model's pretrained config (:func:`timm_icl.data.preprocess.normalize`);
        images ``[B, C, H, W]`` uint8 (0-255) or float in [0, 1]."""
        return normalize(images, self.mean, self.std)

    @torch.no_grad()
    def reference_targets(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reference targets for clean images ``[B, C, H, W]`` (uint8, or float in [0, 1]): ``{layer: bool bits}`` for
        ICL/AB (one bit per unit is all they use), ``{layer: float32 h_ref}`` for MSE.

        The forward stops after the last constrained layer (the head is never run).
        """
        ref = self.reference
        if ref is None:
            if getattr(self, "_reference_released", False):
                raise RuntimeError("the reference was released (release_reference()); pass reference_targets=")
            raise RuntimeError("plain fine-tuning (constraint='none') has no reference model")
        needs_values = getattr(self.constraint, "needs_reference_values", True)
        transform = (lambda h: h.float()) if needs_values else (lambda h: h > 0)
        ref_dtype = next(ref.parameters()).dtype
        # the precision policy: the reference runs in its own dtype, never under the caller's autocast, so live
        # targets are the bits a TargetCache built outside autocast holds
        with _no_autocast(images.device):
            x = self.normalize(images).to(ref_dtype)
            if self.reference_channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return run_until_captured(ref, x, self.layers, transform=transform)

    def _check_input(self, images: torch.Tensor) -> None:
        # The shape on every call (free); the float range once per task (one device sync): a normalised batch
        # passed by mistake would silently distort the wrong scale. uint8 batches cannot be out of range.
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"ICLTask expects a non-empty batch of images [B, C, H, W], got {tuple(images.shape)}")
        if self._checked_input_range or images.dtype == torch.uint8:
            return
        check_unit_range(images, "ICLTask")
        self._checked_input_range = True

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        reference_targets: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training forward.

        Args:
            input: clean images ``[B, C, H, W]``, uint8 (0-255, as the loaders yield them) or float in [0, 1]
                (not normalised); converted to float on their device.
            target: class indices ``[B]``.
            reference_targets: precomputed ``{layer: bits}`` (e.g. from a target cache); skips the reference.

        Returns:
            dict with ``loss`` (scalar), ``output`` (logits ``[B, num_classes]``), ``task_loss`` (CE on the
            distorted images) and ``constraint_loss`` (float32, unweighted; 0 for plain fine-tuning).
        """
        self._check_input(input)
        if isinstance(self.constraint, JSDConsistencyLoss) or self.consistency is not None:
            return self._forward_views(input, target, reference_targets)
        # the precision policy: distortions (and the reference) in float32 outside autocast; only the student
        # below runs under the caller's autocast
        with _no_autocast(input.device):
            input = _full_precision(to_unit_float(input))
            distorted, _ = self.sampler(input)
            if self.constraint is not None and reference_targets is None:
                reference_targets = self.reference_targets(input)

        student = self.get_eval_model()  # hooks go on the unwrapped module; the call goes through the wrapper
        if self.constraint is not None:
            with capture_preactivations(student, self.layers) as acts:
                logits = self.trainable_module(self.normalize(distorted))
            constraint_loss = self.constraint(acts, reference_targets)
        else:
            logits = self.trainable_module(self.normalize(distorted))
            constraint_loss = torch.zeros((), device=logits.device, dtype=torch.float32)
        task_loss = self.criterion(logits, target)
        loss = task_loss + self.constraint_weight * constraint_loss
        return {
            "loss": loss,
            "output": logits,
            "task_loss": task_loss.detach(),
            "constraint_loss": constraint_loss.detach(),
        }

    def _forward_views(
        self, input: torch.Tensor, target: torch.Tensor, reference_targets: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The JSD constraint (timm's AugMix recipe, no reference): views ``[distorted, clean, distorted']`` in one
        forward; ``CE(first view) + lambda * JSD(views)`` is timm's ``JsdCrossEntropy`` on these logits, with the
        cross-entropy on a distorted view like every other constraint's (timm puts the clean view first).
        ``icl+jsd``: ``CE(first view) + lambda * ICL(first view's pre-activations, reference on the clean image)
        + jsd_weight * JSD(views)``; ``constraint_loss`` is the ICL term, ``consistency_loss`` the JSD term."""
        combined = self.consistency is not None
        with _no_autocast(input.device):
            input = _full_precision(to_unit_float(input))
            views = [self.sampler(input)[0], input]
            views += [self.sampler(input)[0] for _ in range((self.consistency or self.constraint).num_views - 2)]
            if combined and reference_targets is None:
                reference_targets = self.reference_targets(input)
        batch = input.shape[0]
        if combined:
            with capture_preactivations(self.get_eval_model(), self.layers) as acts:
                logits_all = self.trainable_module(self.normalize(torch.cat(views)))
            constraint_loss = self.constraint({k: v[:batch] for k, v in acts.items()}, reference_targets)
            consistency_loss = self.consistency(logits_all)
            extra = self.jsd_weight * consistency_loss
        else:
            logits_all = self.trainable_module(self.normalize(torch.cat(views)))
            constraint_loss = self.constraint(logits_all)
            extra = 0.0
        logits = logits_all[:batch]
        task_loss = self.criterion(logits, target)
        out = {
            "loss": task_loss + self.constraint_weight * constraint_loss + extra,
            "output": logits,
            "task_loss": task_loss.detach(),
            "constraint_loss": constraint_loss.detach(),
        }
        if combined:
            out["consistency_loss"] = consistency_loss.detach()
        return out

    def extra_repr(self) -> str:
        return (
            f"constraint={self.constraint_name}, lambda={self.constraint_weight}, layers={self.layers}, "
            + (f"jsd_weight={self.jsd_weight}, " if self.consistency is not None else "")
            + f"sampler={self.sampler!r}"
        )
