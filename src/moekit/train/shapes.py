"""An image-classification dataset drawn on the fly: ten kinds of shapes, no download, same images for a seed.

Legend: N images, C = 3 channels, H = W image size.

Each image is a dark noisy background with one shape of a random colour, size and position; the class is the
kind of shape. The classes differ in geometry that a patch-based model must put together across patches (a
filled square vs a hollow one, a ring vs a disc, + vs x, stripes vs a checkerboard), so a linear classifier on
pixels does poorly and the task needs the transformer. The generator is a pure function of (n, size, seed).
"""

from __future__ import annotations

import torch
from torch import Tensor

SHAPE_CLASSES = (
    "square", "hollow square", "disc", "ring", "triangle", "plus", "cross", "horizontal stripes",
    "vertical stripes", "checkerboard",
)


def make_shapes(n: int, image_size: int = 32, seed: int = 0, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """`n` images and their labels.

    Args:
        n: number of images (>= 0).
        image_size: H = W, at least 16 pixels.
        seed: the images are a function of (n, image_size, seed, noise); the first images of a larger n differ.
        noise: std of the Gaussian pixel noise.
    Returns:
        images [n, 3, H, W] float32 roughly in [-1, 1] (normalised), labels [n] int64 in [0, 10).
    Raises:
        ValueError: n < 0 or image_size < 16.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16 (shapes need room), got {image_size!r}")
    g = torch.Generator().manual_seed(seed)
    H = image_size
    labels = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=g)
    radius = (torch.rand(n, generator=g) * 0.15 + 0.2) * H  # half the shape's extent: 20-35% of the image
    cx = torch.rand(n, generator=g) * (H - 2 * radius - 2) + radius + 1
    cy = torch.rand(n, generator=g) * (H - 2 * radius - 2) + radius + 1
    period = torch.randint(2, 4, (n,), generator=g).float() * 2  # stripe/checker period 4 or 6 pixels
    colour = torch.rand(n, 3, generator=g) * 0.6 + 0.4
    background = torch.rand(n, 3, generator=g) * 0.25
    pixel_noise = torch.randn(n, 3, H, H, generator=g) * noise

    coords = torch.arange(H, dtype=torch.float32) + 0.5
    xs, ys = coords.view(1, 1, H), coords.view(1, H, 1)
    mask = torch.zeros(n, H, H)
    for start in range(0, n, 1024):  # bounded memory: ten [1024, H, W] masks at a time
        sl = slice(start, start + 1024)
        dx = xs - cx[sl].view(-1, 1, 1)
        dy = ys - cy[sl].view(-1, 1, 1)
        r = radius[sl].view(-1, 1, 1)
        p = period[sl].view(-1, 1, 1)
        box = (dx.abs() <= r) & (dy.abs() <= r)
        dist = (dx**2 + dy**2).sqrt()
        thick = (0.3 * r).clamp(min=1.5)
        shapes = torch.stack([
            box,
            box & ((dx.abs() > r - thick) | (dy.abs() > r - thick)),
            dist <= r,
            (dist <= r) & (dist > r - thick),
            (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2),  # apex up, base at the bottom
            box & ((dx.abs() <= thick / 2) | (dy.abs() <= thick / 2)),
            box & (((dx - dy).abs() <= thick / 1.4) | ((dx + dy).abs() <= thick / 1.4)),
            box & (torch.floor((dy + r) / (p / 2)) % 2 == 0),
            box & (torch.floor((dx + r) / (p / 2)) % 2 == 0),
            box & ((torch.floor((dx + r) / (p / 2)) + torch.floor((dy + r) / (p / 2))) % 2 == 0),
        ], dim=1)
        mask[sl] = shapes.gather(1, labels[sl].view(-1, 1, 1, 1).expand(-1, 1, H, H)).squeeze(1).float()
    images = background.view(n, 3, 1, 1) + mask.unsqueeze(1) * (colour - background).view(n, 3, 1, 1)
    images = (images + pixel_noise - 0.5) / 0.5
    return images, labels
