"""Image discovery and decoding on files made in the tests."""

from __future__ import annotations

import numpy as np
import pytest
from dsran.extract.images import (
    ALPHA_BACKGROUND,
    ImageLoadError,
    discover_images,
    load_rgb,
)
from PIL import Image, ImageFile

EXIF_ORIENTATION = 0x0112


def make_bad_files(folder):
    """Write one file of every kind that must fail; returns {name: expected reason part}."""
    Image.new("RGB", (64, 48), (10, 200, 30)).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()

    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("these are not pixels\n")

    Image.new("RGB", (64, 48), (1, 2, 3)).save(folder / "corrupt.png")
    corrupt = bytearray((folder / "corrupt.png").read_bytes())
    corrupt[50:90] = b"\x00" * 40
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    return {
        "truncated.jpg": "truncated",
        "empty.png": "empty file",
        "notes.jpg": "not an image",
        "corrupt.png": "cannot decode",
    }


def make_good_files(folder):
    """Write one file per supported mode; returns {name: (size, pixel at (0, 0))}."""
    expected = {}
    Image.new("RGB", (30, 20), (200, 100, 50)).save(folder / "rgb.png")
    expected["rgb.png"] = ((30, 20), (200, 100, 50))

    Image.new("L", (30, 20), 77).save(folder / "grey.png")
    expected["grey.png"] = ((30, 20), (77, 77, 77))

    Image.new("LA", (30, 20), (0, 0)).save(folder / "grey_alpha.png")
    expected["grey_alpha.png"] = ((30, 20), ALPHA_BACKGROUND)

    Image.new("RGBA", (30, 20), (255, 0, 0, 255)).save(folder / "opaque.png")
    expected["opaque.png"] = ((30, 20), (255, 0, 0))

    Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(folder / "clear.PNG")
    expected["clear.PNG"] = ((30, 20), ALPHA_BACKGROUND)

    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    palette.save(folder / "palette.gif", transparency=1)
    expected["palette.gif"] = ((30, 20), ALPHA_BACKGROUND)

    palette.save(folder / "palette.bmp")
    expected["palette.bmp"] = ((30, 20), (10, 20, 30))

    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "cmyk.tiff")
    expected["cmyk.tiff"] = ((30, 20), (255, 0, 0))

    levels = np.full((20, 30), 257 * 100, dtype=np.uint16)
    Image.fromarray(levels).save(folder / "grey16.png")
    expected["grey16.png"] = ((30, 20), (100, 100, 100))

    Image.new("RGB", (30, 20), (0, 0, 255)).save(folder / "blue.webp", lossless=True)
    expected["blue.webp"] = ((30, 20), (0, 0, 255))

    rotated = Image.new("RGB", (30, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored landscape, shown rotated 90 degrees clockwise
    rotated.save(folder / "rotated.JPG", exif=exif, quality=95)
    expected["rotated.JPG"] = ((20, 30), None)
    return expected


def test_discover_images_sorted_relative(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("b/z.JPEG", "a.jpg", "a.png", "c.TIF", "b/x.webp", ".hidden/h.jpg", ".dot.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "a.jpg.json").write_text("{}")
    assert discover_images(tmp_path) == ["a.jpg", "a.png", "b/x.webp", "b/z.JPEG", "c.TIF"]


def test_discover_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        discover_images(tmp_path / "absent")


def test_load_rgb_modes(tmp_path):
    expected = make_good_files(tmp_path)
    for name, (size, pixel) in expected.items():
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB", name
        assert image.size == size, name
        if pixel is not None:
            got = image.getpixel((0, 0))
            assert max(abs(a - b) for a, b in zip(got, pixel, strict=True)) <= 2, (name, got)


def test_load_rgb_failures(tmp_path):
    reasons = make_bad_files(tmp_path)
    for name, reason in reasons.items():
        with pytest.raises(ImageLoadError, match=f"(?i){reason}"):
            load_rgb(tmp_path / name)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_rgb(tmp_path / "absent.jpg")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
