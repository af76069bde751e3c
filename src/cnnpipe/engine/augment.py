"""Batched image augmentation as tensor ops (no per-image Python).

Every random draw comes from an explicit ``torch.Generator`` on the CPU, so
the augmented stream depends only on the run's seed: the same images are
produced on a CPU or a GPU, and a resumed run continues the stream exactly.
Ops work on uint8 N x C x H x W tensors (before normalization), so a padded
border is black, as with torchvision's ``RandomCrop(padding=...)`` on images.
"""

from __future__ import annotations

import torch

AUGMENTS = ("none", "crop", "flip", "crop_flip")


def crop_padding(height: int) -> int:
    """Border for random crops: 2 px for 28 px images, 4 px for 32 px and up (the usual recipes)."""
    return 2 if height < 32 else 4


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut a random H x W window per image.

    One padded tensor plus two ``gather`` calls (rows, then columns) with
    per-image offsets: cost is a few passes over the batch whatever its size.
    """
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(images.device)
    rows = offsets[0].view(n, 1, 1, 1) + torch.arange(h, device=images.device).view(1, 1, h, 1)
    cols = offsets[1].view(n, 1, 1, 1) + torch.arange(w, device=images.device).view(1, 1, 1, w)
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.expand(n, c, h, w))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left-right (one mask, one ``where``)."""
    mask = torch.rand(images.shape[0], generator=generator) < 0.5
    mask = mask.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)


def augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Apply ``mode`` ('none' | 'crop' | 'flip' | 'crop_flip'); shape and dtype are kept."""
    if mode not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {mode!r} (resolve 'auto' with params.resolve_augment)")
    if mode in ("crop", "crop_flip"):
        images = random_crop(images, crop_padding(images.shape[2]), generator)
    if mode in ("flip", "crop_flip"):
        images = random_flip(images, generator)
    return images


def normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x / 255 - mean) / std`` as one multiply-add; scale/shift are C x 1 x 1."""
    return torch.addcmul(shift, images.float(), scale)


def norm_constants(mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = 1 / (255 std)``, ``shift = -mean / std`` shaped C x 1 x 1 for ``normalize``."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).clamp_min(1e-6).view(-1, 1, 1)
    return (1.0 / (255.0 * s)).to(device), (-m / s).to(device)
