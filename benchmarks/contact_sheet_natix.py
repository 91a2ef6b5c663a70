"""Save a contact sheet of synthetic scenes through the NATIX challenge levels 0-3 to look at them.

Each row is one scene (roadwork and not, alternating): the original, then the 224 x 224 challenge image a validator
would send at level 0, and two seeded draws each of levels 1, 2 and 3.

Usage:
    python benchmarks/contact_sheet_natix.py --out runs/contact_sheet_natix.png --scenes 4 --seed 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageDraw

from roadwork_cli.data.natix import CHALLENGE_SIZE
from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.data.synthetic import render_scene, scene_seed
from roadwork_cli.data.transforms import augment_seed, create_augmentation

COLUMNS = [("original", None), ("level 0", 0)] + [(f"level {k} #{d}", k) for k in (1, 2, 3) for d in (1, 2)]
HEADER = 18


def contact_sheet(scenes: int, seed: int, size: tuple[int, int]) -> tuple[Image.Image, float]:
    """The grid and the mean milliseconds per challenge image."""
    tile = CHALLENGE_SIZE
    levels = {k: create_augmentation("natix", Preprocessing(size=tile), level=k) for k in range(4)}
    sheet = Image.new("RGB", (len(COLUMNS) * (tile + 4), HEADER + scenes * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, (title, _) in enumerate(COLUMNS):
        draw.text((c * (tile + 4) + 4, 3), title, fill=(0, 0, 0))
    seconds, made = 0.0, 0
    for row in range(scenes):
        label = 1 - row % 2
        scene = render_scene(scene_seed(seed, row), label, size)
        y = HEADER + row * (tile + 4)
        for c, (_, level) in enumerate(COLUMNS):
            if level is None:
                shown = scene.copy()
                shown.thumbnail((tile, tile))
            else:
                started = time.perf_counter()
                shown = levels[level].challenge(scene, augment_seed(f"scene{row}", view=c))
                seconds += time.perf_counter() - started
                made += 1
            sheet.paste(shown, (c * (tile + 4), y))
        draw.text((4, y + 4), "ROADWORK" if label else "none", fill=(255, 0, 255))
    return sheet, seconds / max(made, 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/contact_sheet_natix.png")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args()
    sheet, ms = contact_sheet(args.scenes, args.seed, (args.width, args.height))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"wrote {out}: {args.scenes} scenes x levels 0-3, {ms:.1f} ms per challenge image")


if __name__ == "__main__":
    main()
