"""Save a grid of synthetic scenes (top half roadwork, bottom half not) to eyeball the generator.

Usage:
    python benchmarks/contact_sheet.py --out /tmp/contact_sheet.png --per-class 12 --seed 0
"""

from __future__ import annotations

import argparse
import time

from PIL import Image, ImageDraw

from roadwork_cli.data.synthetic import render_scene, scene_seed


def contact_sheet(per_class: int, seed: int, columns: int, size: tuple[int, int]) -> tuple[Image.Image, float]:
    """The grid and the mean render time in milliseconds."""
    tiles = []
    started = time.perf_counter()
    for label in (1, 0):
        for i in range(per_class):
            tiles.append((label, render_scene(scene_seed(seed, 2 * i + label), label, size)))
    ms = (time.perf_counter() - started) / len(tiles) * 1000
    width, height = size
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (width + 4), rows * (height + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (label, tile) in enumerate(tiles):
        x, y = (k % columns) * (width + 4), (k // columns) * (height + 4)
        sheet.paste(tile, (x, y))
        draw.text((x + 3, y + 3), "ROADWORK" if label else "none", fill=(255, 0, 255))
        side = (width - height) // 2  # the centre square the backbone sees
        draw.rectangle((x + side, y, x + width - side, y + height - 1), outline=(255, 0, 255))
    return sheet, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/contact_sheet.png")
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args()
    sheet, ms = contact_sheet(args.per_class, args.seed, args.columns, (args.width, args.height))
    sheet.save(args.out)
    print(f"wrote {args.out}: {2 * args.per_class} scenes, {ms:.1f} ms per scene")


if __name__ == "__main__":
    main()
