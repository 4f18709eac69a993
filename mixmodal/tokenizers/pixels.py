"""The pixel convention of the image tokenizers, checked at their boundary.

Images enter `encode` / `forward` as float tensors (B, 3, H, W) with values in [-1, 1]
(`x / 127.5 - 1` of 8-bit RGB) and H = W = the trained resolution. Anything else fails
here with a message that says how to fix it, rather than deeper with a shape error or,
worse, silently (uint8 input or [0, 1] floats would encode to garbage without complaint).

`images_to_tensor` is the explicit way in from PIL: centre-crop to a square, resize with
bicubic filtering (Pillow's resize antialiases when it shrinks), scale to [-1, 1].
`tensor_to_images` is the way out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import torch

RANGE_TOLERANCE = 1e-3  # resampling and float error can overshoot [-1, 1] slightly
RESIZE_FILTER = PIL.Image.Resampling.BICUBIC


def check_images(images: torch.Tensor, resolution: int, factor: int, *, any_size: bool = False) -> None:
    """Raise ValueError unless `images` is float (B, 3, H, W) in [-1, 1] at the trained size.

    With `any_size`, any H and W divisible by the downsampling `factor` pass (the trunk is
    fully convolutional), at the cost of a code/latent grid of a different size.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (B, 3, H, W); got {type(images).__name__} "
                        "(use mixmodal.tokenizers.pixels.images_to_tensor for PIL images)")
    shape = tuple(images.shape)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, 3, H, W); got {shape}"
                         + (" (a single image: add a batch axis with images[None])" if images.ndim == 3 and shape[0] == 3 else ""))
    if images.shape[1] != 3:
        if images.shape[-1] == 3:
            raise ValueError(f"images must be channels-first (B, 3, H, W); got {shape}, which looks channels-last: "
                             "use images.permute(0, 3, 1, 2)")
        raise ValueError(f"images must have 3 (RGB) channels; got {images.shape[1]} in shape {shape} "
                         "(convert greyscale / RGBA to RGB first, e.g. with mixmodal.data.images.decode_image)")
    if not images.is_floating_point():
        hint = " convert with images.float() / 127.5 - 1" if images.dtype == torch.uint8 else ""
        raise ValueError(f"images must be a float tensor with values in [-1, 1]; got dtype {images.dtype};{hint}")
    H, W = shape[2], shape[3]
    if any_size:
        if H % factor or W % factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the downsampling factor {factor}")
    elif H != resolution or W != resolution:
        raise ValueError(f"images are {H}x{W} but this tokenizer was trained at {resolution}x{resolution}; resize them "
                         f"(mixmodal.tokenizers.pixels.images_to_tensor(pil_images, {resolution})) or pass any_size=True "
                         f"for sizes divisible by {factor}")
    low, high = torch.aminmax(images.detach())
    low, high = float(low), float(high)
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        hint = " (values in [0, 1]? use images * 2 - 1)" if low >= 0 and high <= 1 + RANGE_TOLERANCE else ""
        hint = " (8-bit values? use images / 127.5 - 1)" if high > 2 else hint
        raise ValueError(f"image values must lie in [-1, 1]; got [{low:.3g}, {high:.3g}]{hint}")


def images_to_tensor(images: Sequence[PIL.Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> float (N, 3, resolution, resolution) in [-1, 1]: centre-crop square, bicubic resize."""
    out = []
    for image in images:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != resolution:
            image = image.resize((resolution, resolution), RESIZE_FILTER)
        out.append(np.asarray(image, dtype=np.uint8))
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    pixels = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (N, 3, R, R) uint8
    return pixels.float() / 127.5 - 1


def tensor_to_images(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL RGB images (values clamped, rounded to 8 bit)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [PIL.Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
