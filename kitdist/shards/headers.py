"""Image sizes from file headers: PNG's IHDR and JPEG's frame header read directly, PIL for the rest.

Probing a million files is one small read each; parsing the two common formats here avoids PIL's
per-file plugin machinery, which costs more than the read itself.
"""

from __future__ import annotations

import struct
from pathlib import Path

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HEAD_BYTES = 1 << 16  # JPEG frame headers follow EXIF/ICC segments; 64 KiB covers nearly all


def image_size(path: Path) -> tuple[int, int]:
    """(width, height); raises ValueError or OSError when the header cannot be read."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if head.startswith(PNG_SIGNATURE):
        return _png_size(head)
    if head.startswith(b"\xff\xd8"):
        size = _jpeg_size(head)
        if size is not None:
            return size
    with Image.open(path) as image:  # other formats, and JPEGs with very large metadata
        return image.size


def _png_size(head: bytes) -> tuple[int, int]:
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR header")
    width, height = struct.unpack_from(">II", head, 16)
    if not (width and height):
        raise ValueError(f"PNG header says {width}x{height}")
    return width, height


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """Walks the marker segments to the frame header; None when it lies beyond `head`."""
    position = 2
    while position + 4 <= len(head):
        if head[position] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {position}")
        marker = head[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # segments without a length
            position += 2
            continue
        (length,) = struct.unpack_from(">H", head, position + 2)
        if marker in _JPEG_FRAME_MARKERS:
            if position + 9 > len(head):
                return None
            height, width = struct.unpack_from(">HH", head, position + 5)
            if not (width and height):
                raise ValueError(f"JPEG frame header says {width}x{height}")
            return width, height
        if marker in (0xD9, 0xDA):
            raise ValueError("JPEG without a frame header")
        position += 2 + length
    return None
