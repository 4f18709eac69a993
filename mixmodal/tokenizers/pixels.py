"""The pixel convention of the image tokenizers, checked at their boundary.

Images enter `encode` / `forward` as float tensors (B, 3, H, W) with values in [-1, 1]
(`x / 127.5 - 1` of 8-bit RGB) and H = W = the trained resolution. Anything else fails
here with a message that says how to fix it, rather than deeper with a shape error or,
worse, silently (uint8 input or [0, 1] floats would encode to garbage without complaint).

`images_to_tensor` is the explicit way in from PIL: centre-crop to a square, resize with
bicubic filtering (Pillow's resize antialiases when it shrinks), scale to [-1, 1].
`tensor_to_images` is the way out.

A converted Chameleon (generation.yaml `image_preprocessing: chameleon`) uses Meta's
pipeline instead (facebookresearch/chameleon, inference/image_tokenizer.py), here as
`chameleon_images_to_tensor` / `chameleon_tensor_to_images`:

    in   transparency blended onto white (`_whiten_transparency`: (1-a)*255 + a*rgb, truncated
         to uint8); the shortest side resized to the resolution with LANCZOS (new size
         `round(scale * side)`); centre-crop (offset `(side - R) // 2`); x / 255 * 2 - 1
         computed in float64, then float32
    out  clamp to [-1, 1], (x + 1) / 2 * 255, truncated to uint8 (`_pil_from_chw_tensor`)

`PIXEL_CONVENTIONS` maps the generation.yaml name to (to_rgb, to_tensor, to_images).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

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


# --- Meta's Chameleon pipeline ---------------------------------------------------------------

def whiten_transparency(image: PIL.Image.Image) -> PIL.Image.Image:
    """Meta's `_whiten_transparency`: RGB as is; otherwise RGBA, and where any pixel is not opaque,
    every pixel blended onto white as (1 - a) * 255 + a * rgb, truncated to uint8."""
    if image.mode == "RGB":
        return image
    rgba = np.array(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3] / 255.0
    rgb = (1 - alpha[:, :, None]) * 255 + alpha[:, :, None] * rgba[:, :, :3]
    return PIL.Image.fromarray(rgb.astype("uint8"), "RGB")


def chameleon_images_to_tensor(images: Sequence[PIL.Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> float (N, 3, resolution, resolution) in [-1, 1] as Meta's Chameleon prepares
    VQGAN input (`ImageTokenizer._vqgan_input_from` after `_whiten_transparency`)."""
    out = []
    for image in images:
        image = whiten_transparency(image)
        scale = resolution / min(image.size)
        image = image.resize((round(scale * image.size[0]), round(scale * image.size[1])),
                             PIL.Image.Resampling.LANCZOS)
        x0, y0 = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((x0, y0, x0 + resolution, y0 + resolution))
        out.append(torch.from_numpy(np.array(image) / 255.0 * 2 - 1).permute(2, 0, 1).float())
    if not out:
        return torch.empty(0, 3, resolution, resolution)
    return torch.stack(out)


def chameleon_tensor_to_images(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL RGB images as Meta's `_pil_from_chw_tensor`: clamped,
    (x + 1) / 2 * 255, truncated to 8 bit."""
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray((p * 255).astype(np.uint8)).convert("RGB") for p in pixels]


def _mixmodal_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.convert("RGB")


class PixelConvention(NamedTuple):
    to_rgb: Callable[[PIL.Image.Image], PIL.Image.Image]  # a prompt's PIL image -> the RGB image it holds
    to_tensor: Callable[[Sequence[PIL.Image.Image], int], torch.Tensor]  # -> tokenizer input in [-1, 1]
    to_images: Callable[[torch.Tensor], list[PIL.Image.Image]]  # decoder output -> PIL


PIXEL_CONVENTIONS = {
    "mixmodal": PixelConvention(_mixmodal_rgb, images_to_tensor, tensor_to_images),
    "chameleon": PixelConvention(whiten_transparency, chameleon_images_to_tensor, chameleon_tensor_to_images),
}


def pixel_convention(name: str) -> PixelConvention:
    if name not in PIXEL_CONVENTIONS:
        raise ValueError(f"image_preprocessing must be one of {', '.join(PIXEL_CONVENTIONS)}; got {name!r}")
    return PIXEL_CONVENTIONS[name]
