"""Each benchmark's protocol, stated once: how papers measure on it, and what the KiT paper published.

Restoration papers measure each test set their own way: real-noise denoising (SIDD) and deblurring (GoPro,
HIDE, REDS) on RGB, deraining (Rain100H, Rain100L, Test100, Test1200, Test2800) on the Y channel (BT.601
luma, MATLAB's rgb2ycbcr). `python -m kitdist.evaluate --benchmark NAME` measures that way and reports
the benchmark's headline PSNR/SSIM beside the paper's; the coordinator's results table prints them per
benchmark. Every benchmark here is scored on 8-bit rounded images (as saved files are), whole images,
mean over images of per-image values, no border cropped (`crop_border` says otherwise where a set needs it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Published:
    """A number a paper printed for a method on a benchmark, and where."""

    method: str
    psnr: float
    ssim: float
    source: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str  # the coordinator's task (kitdist.coordinator.spec.TASKS)
    space: Literal["rgb", "y"]  # the colour space of the headline PSNR/SSIM
    images: int  # the test set's size, as papers use it
    shards: str  # how the test shards are built (recipe and split)
    crop_border: int = 0
    published: tuple[Published, ...] = field(default_factory=tuple)

    @property
    def psnr_key(self) -> str:
        return f"psnr_{self.space}"

    @property
    def ssim_key(self) -> str:
        return f"ssim_{self.space}"

    def convention(self) -> str:
        """The protocol in words, as the results tables print it."""
        space = "RGB" if self.space == "rgb" else "Y (BT.601 luma)"
        return f"{space}, border {self.crop_border} px, 8-bit rounded, whole images, mean of {self.images}"

    def paper(self) -> Published | None:
        """The KiT paper's number for this benchmark (its best variant), if it published one."""
        return self.published[-1] if self.published else None


_SUPP = "KiT supplementary, Table 1"

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "SIDD",
            "denoise",
            "rgb",
            1280,
            "sidd recipe, split val: the 40 x 32 validation blocks of 256x256",
            published=(
                Published("KiT", 39.80, 0.972, _SUPP),
                Published("KiT† (ImageNet pre-trained)", 39.85, 0.974, _SUPP),
            ),
        ),
        Benchmark("GoPro", "deblur", "rgb", 1111, "gopro recipe, split test: whole 1280x720 frames"),
        Benchmark("HIDE", "deblur", "rgb", 2025, "hide recipe, split test: whole 1280x720 frames"),
        Benchmark("REDS", "deblur_jpeg", "rgb", 3000, "reds recipe, split val: whole 1280x720 frames"),
        Benchmark("Rain100H", "derain", "y", 100, "rain13k recipe, split Rain100H"),
        Benchmark("Rain100L", "derain", "y", 100, "rain13k recipe, split Rain100L"),
        Benchmark("Test100", "derain", "y", 100, "rain13k recipe, split Test100"),
        Benchmark("Test1200", "derain", "y", 1200, "rain13k recipe, split Test1200"),
        Benchmark("Test2800", "derain", "y", 2800, "rain13k recipe, split Test2800"),
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; a ValueError listing the known ones otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
