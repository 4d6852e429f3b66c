"""PSNR against forward GMACs at 256x256, in the style of the KiT paper's figure 1 (supplementary section 1).

Left panel: the published SIDD denoising numbers of KiT and of the methods it is compared with, each with
its source, marked by where the number comes from (a paper's table or a repository's README). Right panel:
what we measured (`results.json` written by `python -m kitdist.evaluate`), on our own test set. The two
panels have separate PSNR axes on purpose: a PSNR is only comparable on the same test images.

    python -m kitdist.report.chart runs/eval/results.json --out chart.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kitdist import storage


@dataclass(frozen=True)
class PublishedPoint:
    method: str
    gmacs: float  # forward GMACs at 256x256, as the source reports them
    psnr: float  # SIDD sRGB test set, dB, the source's own protocol
    source: str  # where both numbers are printed
    origin: str  # "paper" (a table or text of a publication) or "repo" (a repository README / code)


# Sources as collected in research/perf.md section 1: [S1] KiT supplementary (Lee et al., CVPR 2022);
# [N6] NAFNet, Chen et al., arXiv:2204.04676, Table 6 (SIDD); [U] ZhendongWang6/Uformer README (Uformer32)
# and its model.py flops().
PUBLISHED_SIDD: tuple[PublishedPoint, ...] = (
    PublishedPoint(
        "KiT", 43.08, 39.80, "KiT supp. Sec. 1, Fig. 1 and Tab. 1 (Lee et al. CVPR 2022)", "paper"
    ),
    PublishedPoint("MPRNet", 588.0, 39.71, "NAFNet Tab. 6 (arXiv:2204.04676)", "paper"),
    PublishedPoint("Uformer-B", 89.5, 39.89, "NAFNet Tab. 6 (arXiv:2204.04676)", "paper"),
    PublishedPoint("HINet", 170.7, 39.99, "NAFNet Tab. 6 (arXiv:2204.04676)", "paper"),
    PublishedPoint(
        "Uformer-S (32)", 43.86, 39.77, "Uformer README + model.py flops() (ZhendongWang6/Uformer)", "repo"
    ),
)


@dataclass(frozen=True)
class MeasuredPoint:
    label: str
    gmacs: float
    psnr: float
    test_set: str

    @classmethod
    def from_results(cls, results: dict) -> MeasuredPoint:
        """A point from an evaluate `results.json` body."""
        ensemble = " x8 self-ensemble" if results.get("self_ensemble") else ""
        label = f"{results['model_size']}{ensemble} ({results['images']} images)"
        return cls(label, results["macs"] / 1e9, results["psnr_rgb"], results["shards"])


def draw_chart(
    measured: Sequence[MeasuredPoint], published: Sequence[PublishedPoint] = PUBLISHED_SIDD
) -> bytes:
    """PNG bytes of the two-panel chart."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    for point in published:
        is_kit = point.method == "KiT"
        marker, colour = ("*", "red") if is_kit else ("o", "green")
        face = colour if point.origin == "paper" else "none"
        left.scatter(
            point.gmacs, point.psnr, marker=marker, s=260 if is_kit else 80, c=face, edgecolors=colour
        )
        left.annotate(
            f"{point.method} [{point.origin}]",
            (point.gmacs, point.psnr),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8,
        )
    _style(left, "Published: SIDD denoising (each source's protocol)")
    left.text(
        0.01,
        0.01,
        "\n".join(f"{p.method}: {p.source}" for p in published),
        transform=left.transAxes,
        fontsize=6,
        va="bottom",
        color="dimgray",
    )
    for point in measured:
        right.scatter(point.gmacs, point.psnr, marker="D", s=70, c="tab:blue")
        right.annotate(
            point.label, (point.gmacs, point.psnr), xytext=(6, 4), textcoords="offset points", fontsize=8
        )
    sets = sorted({point.test_set for point in measured}) or ["(no results given)"]
    _style(right, "Measured here (kitdist evaluate)")
    right.text(
        0.01,
        0.01,
        "test set: " + "; ".join(sets),
        transform=right.transAxes,
        fontsize=7,
        va="bottom",
        color="dimgray",
    )
    figure.suptitle("PSNR vs. forward GMACs at 256x256 (as KiT supp. Fig. 1); filled = paper, hollow = repo")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()  # fmt: skip


def _style(axes, title: str) -> None:
    axes.set_xscale("log")
    axes.set_xlabel("GMACs (256x256 input, forward)")
    axes.set_ylabel("PSNR (dB, RGB)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(0.25)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kitdist.report.chart",
        description="Draw the PSNR-vs-GMACs chart: published SIDD points (cited) beside our measured points, "
        "taken from results.json files written by `python -m kitdist.evaluate`.",
    )
    parser.add_argument("results", nargs="*", help="results.json URLs (local path, file://, s3://)")
    parser.add_argument("--out", required=True, help="PNG file URL to write")
    args = parser.parse_args(argv)
    try:
        points = [MeasuredPoint.from_results(json.loads(storage.read_text(url))) for url in args.results]
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot read a results file: {err}", file=sys.stderr)
        return 2
    storage.write_bytes(args.out, draw_chart(points))
    print(f"chart: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
