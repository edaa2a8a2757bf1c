"""Decode raw image bytes into an 8-bit RGB PIL image, or say clearly why not.

Web-scraped shards hold every mode PIL knows: palettes with and without transparency,
RGBA/LA, CMYK JPEGs, 16-bit grayscale PNGs, 1-bit images. Each becomes 8-bit RGB the way a
viewer would show it: transparency is composited on white (not dropped, which would turn
transparent pixels into whatever colour they happen to store, often black), 16-bit values are
scaled to 8 bits (not clipped, which PIL's own conversion does), CMYK is converted by PIL.

Every failure raises :class:`SkipSample` with a short ``code`` (for counting) and a reason a
person can act on; the caller records it in the error ledger and goes on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Modes whose pixel values span 16 bits (PIL opens 16-bit grayscale PNG/TIFF as these).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class SkipSample(Exception):
    """A sample that cannot be used. ``code`` names the category, ``str()`` gives the reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def set_pixel_limit(max_pixels: int) -> None:
    """Align PIL's own decompression-bomb check with our limit. PIL warns above its limit
    (ignored: :func:`decode_image` checks ``max_pixels`` itself, with a clearer message) and
    raises above twice it, inside ``Image.open``: a backstop, also turned into a skip. PIL
    reads a global, so call this once per decoding process."""
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, max_pixels: int, exif_transpose: bool = True) -> Image.Image:
    """Bytes of a JPEG/PNG/WebP/... -> a fully loaded 8-bit RGB image.

    Raises SkipSample for empty files, unrecognisable or truncated data, images above
    ``max_pixels`` (decompression bombs: checked on the header, before any pixel is decoded)
    and modes with no RGB conversion.
    """
    if len(data) == 0:
        raise SkipSample("empty_file", "image file is empty (0 bytes)")
    with warnings.catch_warnings():
        # PIL warns between MAX_IMAGE_PIXELS and twice it; our own check below decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise SkipSample(
                    "decompression_bomb",
                    f"decompression bomb: {width}x{height} = {width * height} pixels "
                    f"> max_image_pixels={max_pixels}",
                )
            img.load()
        except SkipSample:
            raise
        except Image.DecompressionBombError as exc:
            raise SkipSample("decompression_bomb", f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise SkipSample(
                "corrupt_image", f"not a recognisable image ({len(data)} bytes)"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
            # PIL signals truncated and corrupt data through all of these.
            raise SkipSample("corrupt_image", f"cannot decode image: {exc}") from None
    if exif_transpose:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the image
            raise SkipSample("corrupt_image", f"unreadable EXIF orientation: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited on white, 16 bits scaled to 8)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(_scale_to_8bit(np.asarray(img), sixteen=mode != "I"))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        # Float images hold [0, 1] (most TIFFs) or [0, 255]; pick by range.
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8))
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    try:
        return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as exc:
        raise SkipSample("unsupported_mode", f"cannot convert mode {mode} to RGB: {exc}") from None


def _scale_to_8bit(arr: np.ndarray, sixteen: bool) -> np.ndarray:
    arr = arr.astype(np.float64)
    # Mode "I" is 32-bit; PNG/TIFF put 16-bit data there too. Values above 255 mean 16-bit.
    if sixteen or (arr.size and arr.max() > 255):
        arr = arr / 257.0  # 65535 -> 255 exactly
    return np.clip(arr, 0, 255).round().astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
