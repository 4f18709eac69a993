"""Decoding untrusted image bytes into fully loaded RGB images, or a counted skip.

`decode_image` is the one door every image of every reader comes through. It

- refuses images whose header claims more than `max_pixels` pixels, before any pixel
  data is decoded (a 100 kB PNG can claim 10^10 pixels);
- tells missing, undecodable and truncated files apart, so a summary says which fix
  applies (the path, the download, the crawl);
- converts every other mode to RGB, counting each conversion in the log:

  | mode                        | conversion                                            |
  |-----------------------------|-------------------------------------------------------|
  | 1, L, CMYK, YCbCr, P, ...   | Pillow's `convert("RGB")` (CMYK: naive, no ICC)       |
  | RGBA, LA, PA, P/L/RGB+tRNS  | alpha composited onto white (models see no alpha,     |
  |                             | and white is what a viewer shows behind a logo)       |
  | I;16, I;16B, I;16L, I       | 16-bit grey scaled to 8 bit, v * 255 / 65535 rounded  |
  |                             | (I outside 0..65535: min-max scaled)                  |
  | F                           | values in [0, 1] scaled by 255, otherwise min-max     |
  | 16-bit RGB(A) PNG           | Pillow already reads these as 8-bit RGB(A)            |

  and applies the EXIF orientation, so the pixels are the way a viewer shows them.
  Animated images give their first frame.

Pillow's own decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) is global state;
we leave it alone, silence its warning for the duration of one decode (our
`max_pixels` is the policy) and turn its hard error into our TOO_MANY_PIXELS skip.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

from mixmodal.data.bad_input import (
    CORRUPT_IMAGE,
    MISSING_IMAGE,
    TOO_MANY_PIXELS,
    TRUNCATED_IMAGE,
    BadInputLog,
)

# 64 Mi pixels: an 8192 x 8192 image. Above any training resolution this library uses,
# below what a decompression bomb needs, and below Pillow's own warning threshold.
DEFAULT_MAX_PIXELS = 64 * 2**20

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(
    data: bytes | None,
    origin: str,
    *,
    log: BadInputLog,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    where: str | None = None,
) -> PIL.Image.Image | None:
    """Decode one image into a loaded RGB image, or record a skip and return None.

    `data` holds the encoded bytes; None means read the file at `origin`. Skips are
    reported to `log` as `where: reason: detail` with `where` defaulting to `origin`;
    in strict mode `log.skip` raises BadInputError instead of returning None.
    """
    where = where or origin
    if data is None:
        try:
            with open(origin, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            named = "" if origin in where else f": {origin}"
            log.skip(where, MISSING_IMAGE, f"no such file{named}; fix the path or drop the record")
            return None
        except OSError as e:  # a directory, no permission, an I/O error
            log.skip(where, MISSING_IMAGE, f"cannot read {origin}: {e.strerror or e}")
            return None

    # catch_warnings swaps process-wide state (before Python 3.14): fine for readers,
    # which decode in one thread per process (DataLoader workers are processes).
    with warnings.catch_warnings():
        # Our max_pixels check below is the policy; Pillow's warning would only repeat
        # it (or fire for images the user chose to allow by raising max_pixels).
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        try:
            image = PIL.Image.open(io.BytesIO(data))
        except PIL.Image.DecompressionBombError as e:
            log.skip(where, TOO_MANY_PIXELS, _pillow_bomb_detail(e, max_pixels))
            return None
        except PIL.UnidentifiedImageError:
            log.skip(where, CORRUPT_IMAGE, _unidentified_detail(data))
            return None
        except Exception as e:  # noqa: BLE001 - untrusted bytes can raise anything
            _skip_undecodable(log, where, e, "not a readable image")
            return None

        width, height = image.size
        if width * height > max_pixels:  # header only: no pixel data decoded yet
            log.skip(
                where,
                TOO_MANY_PIXELS,
                f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}; "
                "raise max_pixels (--max-pixels) if this image is legitimate",
            )
            return None
        if width == 0 or height == 0:
            log.skip(where, CORRUPT_IMAGE, f"image has size {width}x{height}")
            return None

        try:
            image.load()
        except PIL.Image.DecompressionBombError as e:  # some formats (ICO, frames) check on load
            log.skip(where, TOO_MANY_PIXELS, _pillow_bomb_detail(e, max_pixels))
            return None
        except Exception as e:  # noqa: BLE001
            _skip_undecodable(log, where, e, "pixel data cannot be decoded")
            return None

        try:
            rgb = to_rgb(_apply_exif_orientation(image, log), log)
        except Exception as e:  # noqa: BLE001 - exotic modes Pillow cannot convert
            log.skip(where, CORRUPT_IMAGE, f"cannot convert mode {image.mode!r} to RGB ({_describe(e)})")
            return None
    # An unconverted image still references the encoded bytes through its file object;
    # a copy is detached, so the caller holds pixels only.
    return rgb.copy() if rgb is image else rgb


def to_rgb(image: PIL.Image.Image, log: BadInputLog) -> PIL.Image.Image:
    """Convert a loaded image of any mode to RGB, counting the conversion in `log`."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _WIDE_GREY_MODES:
        log.convert(f"{mode}->RGB")
        return _wide_grey_to_rgb(image)
    if mode == "F":
        log.convert("F->RGB")
        return _float_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        label = mode if mode in _ALPHA_MODES else f"{mode}+transparency"
        log.convert(f"{label}->RGB (alpha on white)")
        return _composite_on_white(image.convert("RGBA"))
    log.convert(f"{mode}->RGB")
    return image.convert("RGB")


def _composite_on_white(rgba: PIL.Image.Image) -> PIL.Image.Image:
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")


def _wide_grey_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    values = np.asarray(image).astype(np.int64)  # (H, W); I;16B arrives native-endian
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi <= 65535:
        # Round, not truncate: 65535 -> 255 and 257 * k -> k exactly, 32768 -> 128.
        grey = (values * 255 + 32767) // 65535
    else:  # 32-bit data that is not 16-bit in disguise: use its own range
        grey = (values - lo) * 255 // max(hi - lo, 1)
    rgb = _grey_array_to_rgb(grey.astype(np.uint8))
    trns = image.info.get("transparency")
    if isinstance(trns, int):  # a 16-bit grey tRNS colour: pixels of that value are transparent
        alpha = np.where(np.asarray(image) == trns, 0, 255).astype(np.uint8)
        rgba = np.concatenate([np.asarray(rgb), alpha[..., None]], axis=-1)
        return _composite_on_white(PIL.Image.fromarray(rgba, "RGBA"))
    return rgb


def _float_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0.0 and hi <= 1.0:
        grey = values * 255.0
    else:
        grey = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    return _grey_array_to_rgb(np.clip(np.rint(grey), 0, 255).astype(np.uint8))


def _grey_array_to_rgb(grey: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")  # (H, W, 3)


def _apply_exif_orientation(image: PIL.Image.Image, log: BadInputLog) -> PIL.Image.Image:
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: the EXIF Orientation tag
    except Exception:  # noqa: BLE001 - broken EXIF is common in crawls; the pixels are fine
        log.convert("unreadable EXIF ignored")
        return image
    if orientation in (None, 1):
        return image
    try:
        rotated = PIL.ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        log.convert("unreadable EXIF ignored")
        return image
    log.convert("EXIF orientation applied")
    return rotated


def _pillow_bomb_detail(error: Exception, max_pixels: int) -> str:
    claimed = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{claimed.group(1)} pixels" if claimed else "the header size"
    if claimed and int(claimed.group(1)) <= max_pixels:  # allowed by us, refused by Pillow's global limit
        return (
            f"{size} is within max_pixels={max_pixels} but above Pillow's hard limit, "
            f"2 * PIL.Image.MAX_IMAGE_PIXELS = {2 * (PIL.Image.MAX_IMAGE_PIXELS or 0)}; raise that too"
        )
    return f"{size} exceeds max_pixels={max_pixels}; raise max_pixels (--max-pixels) if this image is legitimate"


def _skip_undecodable(log: BadInputLog, where: str, error: Exception, what: str) -> None:
    # Pillow reports a file that ends early as "image file is truncated" (on load) or
    # "Truncated File Read" (in the header); that is a download problem, not an encoding one.
    if "truncated" in str(error).lower():
        log.skip(where, TRUNCATED_IMAGE, f"file ends early ({_describe(error)}); re-download it")
    else:
        log.skip(where, CORRUPT_IMAGE, f"{what} ({_describe(error)}); re-download or re-encode it")


def _unidentified_detail(data: bytes) -> str:
    start = data.lstrip()[:1]
    if not data:
        return "empty file; re-download it"
    if start in (b"<", b"{"):  # crawls save error pages under image names
        return f"text, not an image (starts with {data[:24]!r}): probably a failed download"
    return f"not a recognised image format (starts with {data[:8]!r}); re-download or re-encode it"


def _describe(error: Exception) -> str:
    # Pillow names the in-memory file object ("<_io.BytesIO object at 0x...>"): noise.
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-f]+>", "", str(error)) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
