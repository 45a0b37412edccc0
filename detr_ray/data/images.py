"""Encoded image bytes -> pixels, one rule for conversion (shards.py) and training (decode.py).

- Size limit: `stored_size` reads only the header (Pillow), so an image declaring more pixels
  than a limit is refused before any pixel buffer is allocated; Pillow itself refuses more than
  2 x `PIL.Image.MAX_IMAGE_PIXELS` (~179 MP) as a decompression bomb.
- Colour: grayscale, gray + alpha, palette, RGBA, CMYK and 16-bit images all decode to uint8
  [3, H, W] (alpha dropped, 16 bits scaled to 8), so every image of a batch has one layout.
- EXIF orientation, decided by the annotation's width and height (the pixels the boxes were
  drawn on): when the pixels as stored are width x height, they are used as stored (the tag is
  ignored); only when the stored pixels are height x width is the EXIF orientation applied
  (which must then turn them into width x height). Conversion keeps an image only when one of
  the two holds, and training decodes it with the same rule from the row's width and height, so
  the boxes stay on the pixels they were drawn on. (An orientation that keeps the dimensions,
  e.g. 180 degrees, cannot be told apart this way: such images are used as stored.)
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_MAX_PIXELS = 50_000_000  # 150 MB as RGB uint8; COCO's images are at most 640 px a side


class ImageTooLarge(ValueError):
    """The header declares more pixels than allowed."""


def stored_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the pixels as stored, from the header alone. ImageTooLarge above
    `max_pixels`; ValueError when the header cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that; the caller's limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    except Exception as e:  # hostile bytes make Pillow's parsers raise many kinds of errors
        raise ValueError(f"unreadable image header: {type(e).__name__}: {e}") from e
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, limit {max_pixels}")
    return width, height


def decode_rgb(data: bytes, height: int, width: int) -> Tensor:
    """uint8 [3, H, W] pixels of an encoded image whose annotation says `width` x `height`,
    oriented by the module's EXIF rule. The result can still have another size (the file does
    not match its annotation): the caller checks. RuntimeError when it cannot be decoded."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = decode_image(encoded, mode=ImageReadMode.RGB)
    if height != width and tuple(image.shape[-2:]) == (width, height):
        image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = to_dtype(image, torch.uint8, scale=True)
    return image
