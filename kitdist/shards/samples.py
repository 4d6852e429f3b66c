"""From a source item to WebDataset samples: probe (size, tiles), check, copy or cut and encode.

Blocks of MATLAB arrays (`matblocks`, SIDD's validation set) are stored whole as PNG (lossless).
Untiled JPEG and PNG sources are stored byte-for-byte after a structural check (PNG: every chunk's CRC
and the closing IEND; JPEG: start and end markers and a readable header), which is what a read+hash
costs. Other formats, and every tile, are decoded and stored as PNG (lossless, deterministic bytes).
`decode_check` additionally decodes every copied image, which also catches damage inside JPEG data.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kitdist.shards.headers import PNG_SIGNATURE, image_size
from kitdist.shards.recipes import SourceItem

Box = tuple[int, int, int, int]  # left, top, right, bottom (PIL crop order)
COPIED_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}


class RejectError(ValueError):
    """This source item cannot become a sample; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class EncodeOptions:
    tile: int | None = None
    stride: int | None = None
    png_level: int = 1  # zlib level of re-encoded PNGs: 1 is ~4x faster to write than 6, ~10% larger
    decode_check: bool = False


@dataclass(frozen=True)
class ProbedItem:
    """A source item with what planning needs: its size, its tiles and an estimate of its bytes."""

    item: SourceItem
    size: tuple[int, int]  # width, height
    file_bytes: tuple[int, ...]  # per role, in `item.paths` order
    boxes: tuple[Box, ...] | None  # None: stored whole

    @property
    def num_samples(self) -> int:
        return 1 if self.boxes is None else len(self.boxes)

    def estimated_bytes(self) -> int:
        if self.boxes is None:
            return sum(self.file_bytes) + 512
        width, height = self.size
        fraction = sum((r - left) * (b - top) for left, top, r, b in self.boxes) / (width * height)
        return int(sum(self.file_bytes) * fraction * 1.5) + 1024 * len(self.boxes)


def tile_boxes(width: int, height: int, tile: int, stride: int) -> tuple[Box, ...]:
    """Tiles of `tile` px every `stride` px, row by row; the last row and column end at the border."""
    return tuple(
        (x, y, x + tile, y + tile)
        for y in _starts(height, tile, stride)
        for x in _starts(width, tile, stride)
    )


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def probe(item: SourceItem, src: Path, options: EncodeOptions) -> ProbedItem:
    """Reads sizes and headers only; raises RejectError for empty, unreadable or mismatched files."""
    if item.block is not None:  # a MATLAB block: its array's shape was checked when listing
        from kitdist.shards.matblocks import block_shape

        height, width = block_shape(src, item.paths[0][1])[2:]
        return ProbedItem(item, (width, height), tuple(width * height * 3 for _ in item.paths), None)
    sizes, file_bytes = [], []
    for _, relative in item.paths:
        path = src / relative
        try:
            num_bytes = path.stat().st_size
            sizes.append(image_size(path) if num_bytes else None)
        except (OSError, ValueError, struct.error, Image.DecompressionBombError) as err:
            raise RejectError(f"{relative}: cannot read image header ({_short(err)})") from None
        if num_bytes == 0:
            raise RejectError(f"{relative}: empty file (0 bytes)")
        file_bytes.append(num_bytes)
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{role} {w}x{h}" for (role, _), (w, h) in zip(item.paths, sizes, strict=True))
        raise RejectError(f"size mismatch: {shown}")
    width, height = sizes[0]
    boxes = None
    if options.tile:
        if min(width, height) < options.tile:
            raise RejectError(f"{width}x{height} is smaller than the {options.tile} px tile")
        boxes = tile_boxes(width, height, options.tile, options.stride or options.tile)
    return ProbedItem(item, (width, height), tuple(file_bytes), boxes)


def encode(
    probed: ProbedItem, src: Path, dataset: str, options: EncodeOptions
) -> list[dict[str, bytes | str]]:
    """The WebDataset samples of one probed item: {"__key__": ..., "clean.png": bytes, ...}."""
    item = probed.item
    if item.block is not None:
        from kitdist.shards.matblocks import block_pixels

        pixels = {role: block_pixels(src, source, item.block) for role, source in item.paths}
        files = {
            role: ("png", _png(Image.fromarray(block), options.png_level)) for role, block in pixels.items()
        }
        return [_sample(probed, dataset, item.key, files, None)]
    if probed.boxes is None:
        files = {role: _stored_whole(src / path, path, options) for role, path in item.paths}
        return [_sample(probed, dataset, item.key, files, None)]
    images = {role: _decode(src / path, path) for role, path in item.paths}
    samples = []
    for box in probed.boxes:
        key = f"{item.key}__y{box[1]}_x{box[0]}"
        files = {role: ("png", _png(image.crop(box), options.png_level)) for role, image in images.items()}
        samples.append(_sample(probed, dataset, key, files, box))
    return samples


def _sample(
    probed: ProbedItem, dataset: str, key: str, files: dict[str, tuple[str, bytes]], box: Box | None
) -> dict[str, bytes | str]:
    item = probed.item
    provenance = {
        "dataset": dataset,
        "source": dict(item.paths),
        "size": list(probed.size),
        "box": None if box is None else list(box),
    }
    if item.block is not None:
        provenance.update(image=item.block[0], block=item.block[1])
    sample: dict[str, bytes | str] = {"__key__": key}
    if item.cls is not None:
        sample["cls"] = str(item.cls).encode()
        provenance.update(cls=item.cls, label=item.label)
    for role, (extension, data) in files.items():
        sample[f"{role}.{extension}"] = data
    sample["json"] = json.dumps(provenance, sort_keys=True).encode()
    return sample


def _stored_whole(path: Path, relative: str, options: EncodeOptions) -> tuple[str, bytes]:
    extension = COPIED_SUFFIXES.get(path.suffix.lower())
    if extension is None:
        return "png", _png(_decode(path, relative), options.png_level)
    data = _read(path, relative)
    check = check_png if extension == "png" else check_jpeg
    try:
        check(data)
        if options.decode_check:
            decode_bytes(data)
    except (ValueError, OSError) as err:
        raise RejectError(f"{relative}: corrupt image ({_short(err)})") from None
    return extension, data


def check_png(data: bytes) -> None:
    """Every chunk's CRC, IHDR first and IEND last: catches truncation and flipped bytes."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("no PNG signature")
    view, position = memoryview(data), len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, chunk_type = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if end > len(data):
            raise ValueError(f"truncated inside chunk {chunk_type!r}")
        if position == len(PNG_SIGNATURE) and chunk_type != b"IHDR":
            raise ValueError("first chunk is not IHDR")
        if zlib.crc32(view[position + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise ValueError(f"CRC mismatch in chunk {chunk_type!r} at byte {position}")
        if chunk_type == b"IEND":
            return
        position = end
    raise ValueError("truncated: no IEND chunk")


def check_jpeg(data: bytes) -> None:
    """Start-of-image marker and an end-of-image marker near the end (the header was read by `probe`)."""
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG start marker")
    if b"\xff\xd9" not in data[-4096:].rstrip(b"\x00"):
        raise ValueError("truncated: no JPEG end marker")


def decode_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _decode(path: Path, relative: str) -> Image.Image:
    data = _read(path, relative)
    try:
        image = decode_bytes(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RejectError(f"{relative}: corrupt image ({_short(err)})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def _read(path: Path, relative: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RejectError(f"{relative}: cannot read ({_short(err)})") from None
    if not data:
        raise RejectError(f"{relative}: empty file (0 bytes)")
    return data


def _png(image: Image.Image, level: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def _short(err: BaseException) -> str:
    return (str(err) or type(err).__name__).splitlines()[0][:200]
