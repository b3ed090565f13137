"""Image discovery and decoding: the folder walk, RGB conversion, EXIF orientation, failures.

Image ids are POSIX paths relative to the image folder, extension included, so ``a.jpg``
and ``a.png`` stay two images. Decoding never enables Pillow's truncated-image loading:
a file that cannot be decoded completely becomes an :class:`ImageLoadError` whose message
the runner records as the image's failure reason, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Transparent pixels are composited on opaque white, the background that most image
# viewers and web pages show them on.
ALPHA_BACKGROUND = (255, 255, 255)

# Pillow modes that contain one channel of unsigned 16-bit samples (or 32-bit integers
# read from 16-bit files); they are scaled to 8 bits by dividing by 257, so 65535 -> 255.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageLoadError(Exception):
    """An image file could not be decoded; the message is the reason recorded in the store."""


def discover_images(root: str | Path) -> list[str]:
    """List the image files under ``root`` as sorted POSIX paths relative to ``root``.

    A file counts as an image when its extension, in any case, is one of
    :data:`IMAGE_EXTENSIONS`. Hidden files and folders (names starting with ``.``) are
    skipped. The order is the sorted order of the relative path strings, so it does not
    depend on the file system.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_folder = Path(folder).relative_to(root)
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append((relative_folder / name).as_posix())
    return sorted(found)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file completely into an 8-bit RGB image with EXIF orientation applied.

    Raises :class:`ImageLoadError` with a one-line reason for an empty, truncated,
    corrupt or unsupported file. Multi-frame files (GIF, TIFF) give their first frame.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageLoadError("file not found")
        if path.stat().st_size == 0:
            raise ImageLoadError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns about large images and bad EXIF blocks but still reads them.
            # The warnings would repeat in every DataLoader worker process.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError("not an image file, or a format Pillow cannot identify") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"image too large: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        # Pillow reports truncated data as OSError ("image file is truncated") and
        # broken headers or streams as SyntaxError, ValueError or struct.error.
        raise ImageLoadError(f"cannot decode image: {type(error).__name__}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any common mode to 8-bit RGB.

    Alpha (LA, RGBA, PA, and P or L with a transparency entry) is composited on
    :data:`ALPHA_BACKGROUND`. 16-bit grey levels are scaled to 8 bits, not clipped.
    CMYK uses Pillow's conversion, which ignores embedded ICC profiles.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(levels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("LA", "RGBA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
