"""Synthetic dashcam-like street scenes, with and without roadwork, for offline demos and tests (PIL + numpy only).

A scene is a perspective street: a sky that depends on the time of day, a road converging on a vanishing point with
lane markings, sidewalks, building facades with windows, trees, poles, parked and moving cars, pedestrians and
ordinary signs, then optional fog or rain, sensor noise, blur and JPEG re-compression. Positive scenes (label 1) add
roadwork cues at a realistic scale and number: traffic cones, drums, barricades, orange diamond work signs, arrow
boards, workers in high-vis vests and excavators, sometimes small, distant or partly hidden behind a car. Both
classes draw the same distractors, including hard look-alikes (orange cars, autumn trees, orange billboards, barber
poles, striped awnings, red/white bollards, yellow warning signs), so colour alone doesn't give the label away.

Every roadwork cue lies inside the central square of the image (shrunk by the backbone's centre-crop margin), so the
label stays true after a square centre crop.

Example:
    >>> image = render_scene(7, label=1)
    >>> image.size
    (320, 240)
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2
"""Scenes are drawn at twice the size and box-downsampled, which anti-aliases edges cheaply."""
CENTRE_MARGIN = 0.875
"""Cues stay inside this fraction of the central square: timm's default centre crop keeps 87.5 % of the short side."""
CLASS_FOLDERS = {0: "no_roadwork", 1: "roadwork"}
TIMES_OF_DAY = ("day", "day", "day", "overcast", "dusk", "night")
CUE_KINDS = ("cone", "drum", "barricade", "work_sign", "arrow_board", "worker", "excavator")

_SKY = {
    "day": ((70, 130, 205), (185, 212, 238)),
    "overcast": ((140, 145, 152), (205, 206, 210)),
    "dusk": ((55, 50, 110), (250, 150, 85)),
    "night": ((8, 10, 28), (40, 42, 62)),
}
_LIGHT = {"day": 1.0, "overcast": 0.85, "dusk": 0.7, "night": 0.35}
_CAR_COLOURS = (
    (230, 230, 230),
    (30, 30, 32),
    (150, 152, 158),
    (180, 30, 30),
    (30, 60, 150),
    (20, 90, 50),
    (240, 120, 20),
    (245, 190, 20),
    (120, 120, 125),
    (90, 40, 30),
    (250, 250, 250),
    (200, 90, 30),
)
_ORANGE = (255, 110, 10)
_WHITE = (245, 245, 240)


@dataclass
class _Scene:
    """Perspective geometry in supersampled pixels: ground point (X metres, z depth) -> (x, y), scale ppm."""

    width: int
    height: int
    horizon: float
    vanish_x: float
    road_half: float  # road half-width in pixels at z = 1 (bottom row)
    crop: tuple[float, float, float, float]  # cue box: x0, y0, x1, y1

    def ppm(self, z: float) -> float:
        """Pixels per metre at depth z (z = 1 is the bottom row; the road is 7 m wide)."""
        return self.road_half / 3.5 / z

    def project(self, x_m: float, z: float, h_m: float = 0.0) -> tuple[float, float]:
        y = self.horizon + (self.height - self.horizon) / z
        return self.vanish_x + x_m * self.ppm(z), y - h_m * self.ppm(z)


def _jitter(rng: np.random.Generator, colour, amount: int = 14) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _grey_jitter(rng: np.random.Generator, colour, amount: int = 14, tint: int = 4) -> tuple[int, int, int]:
    """Brightness jitter with only a faint tint: asphalt and concrete stay grey."""
    shift = rng.integers(-amount, amount + 1)
    return tuple(int(np.clip(c + shift + rng.integers(-tint, tint + 1), 0, 255)) for c in colour)


def _sky(scene: _Scene, time_of_day: str, rng: np.random.Generator) -> Image.Image:
    top, bottom = (np.array(_jitter(rng, c, 10), dtype=np.float32) for c in _SKY[time_of_day])
    rows = np.clip(np.arange(scene.height, dtype=np.float32) / max(scene.horizon, 1.0), 0, 1)[:, None]
    column = top[None, :] * (1 - rows) + bottom[None, :] * rows  # (H, 3)
    array = np.broadcast_to(column[:, None, :], (scene.height, scene.width, 3)).astype(np.uint8)
    return Image.fromarray(array, "RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Objects. Each draws itself standing on the ground at (x, y) bottom-centre, with p pixels per metre.


def _quad(draw: ImageDraw.ImageDraw, x: float, y: float, p: float, x0, x1, h0, h1, fill) -> None:
    """An axis-aligned box from x0..x1 metres (relative to x) and h0..h1 metres above the ground."""
    left, right = sorted((x + x0 * p, x + x1 * p))
    draw.rectangle((left, y - h1 * p, right, y - h0 * p), fill=fill)


def _cone(draw, x, y, p, rng, light):
    orange, white = _shade(_jitter(rng, _ORANGE, 18), light), _shade(_WHITE, light)
    h = rng.uniform(0.5, 0.9)
    _quad(draw, x, y, p, -0.22, 0.22, 0, 0.05, _shade((25, 25, 25), light))

    def width(f: float) -> float:
        return 0.17 - 0.14 * f

    draw.polygon(
        [
            (x - width(0) * p, y - 0.05 * p),
            (x + width(0) * p, y - 0.05 * p),
            (x + width(1) * p, y - h * p),
            (x - width(1) * p, y - h * p),
        ],
        fill=orange,
    )
    for f0, f1 in ((0.35, 0.5), (0.62, 0.72))[: 1 + int(rng.random() < 0.6)]:
        draw.polygon(
            [
                (x - width(f0) * p, y - f0 * h * p),
                (x + width(f0) * p, y - f0 * h * p),
                (x + width(f1) * p, y - f1 * h * p),
                (x - width(f1) * p, y - f1 * h * p),
            ],
            fill=white,
        )


def _drum(draw, x, y, p, rng, light):
    orange, white = _shade(_jitter(rng, _ORANGE, 18), light), _shade(_WHITE, light)
    _quad(draw, x, y, p, -0.36, 0.36, 0, 0.08, _shade((20, 20, 20), light))
    draw.rounded_rectangle((x - 0.3 * p, y - 1.0 * p, x + 0.3 * p, y - 0.06 * p), radius=max(1, 0.06 * p), fill=orange)
    for h0, h1 in ((0.25, 0.38), (0.55, 0.68)):
        _quad(draw, x, y, p, -0.3, 0.3, h0, h1, white)


def _barricade(draw, x, y, p, rng, light):
    orange, white = _shade(_jitter(rng, _ORANGE, 18), light), _shade(_WHITE, light)
    half = rng.uniform(0.6, 1.0)
    legs = _shade((200, 200, 200), light)
    for side in (-1, 1):
        _quad(draw, x, y, p, side * half * 0.8 - 0.04, side * half * 0.8 + 0.04, 0, 1.0, legs)
    boards = ((0.75, 1.0),) if rng.random() < 0.5 else ((0.4, 0.6), (0.8, 1.0))
    for h0, h1 in boards:
        _quad(draw, x, y, p, -half, half, h0, h1, white)
        stripe = 0.25
        k = -half - (h1 - h0)
        while k < half:
            pts = [(k, h0), (k + stripe / 2, h0), (k + stripe / 2 + (h1 - h0), h1), (k + (h1 - h0), h1)]
            pts = [(min(max(a, -half), half), b) for a, b in pts]
            draw.polygon([(x + a * p, y - b * p) for a, b in pts], fill=orange)
            k += stripe


def _diamond(draw, cx, cy, r, fill, outline):
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=outline)
    r2 = r * 0.85
    draw.polygon([(cx, cy - r2), (cx + r2, cy), (cx, cy + r2), (cx - r2, cy)], fill=fill)


def _work_sign(draw, x, y, p, rng, light):
    legs = _shade((60, 60, 60), light)
    draw.line([(x - 0.35 * p, y), (x, y - 1.0 * p), (x + 0.35 * p, y)], fill=legs, width=max(1, int(0.05 * p)))
    r = rng.uniform(0.35, 0.5) * p
    cy = y - 1.0 * p - r
    _diamond(draw, x, cy, r, _shade(_jitter(rng, _ORANGE, 12), light), _shade((20, 20, 20), light))
    ink = _shade((15, 15, 15), light)
    draw.ellipse((x - 0.12 * r, cy - 0.45 * r, x + 0.06 * r, cy - 0.27 * r), fill=ink)  # a digging worker
    draw.line(
        [(x - 0.05 * r, cy - 0.25 * r), (x + 0.1 * r, cy + 0.2 * r), (x - 0.1 * r, cy + 0.5 * r)],
        fill=ink,
        width=max(1, int(0.08 * r)),
    )
    draw.line([(x + 0.1 * r, cy + 0.2 * r), (x + 0.3 * r, cy + 0.5 * r)], fill=ink, width=max(1, int(0.08 * r)))
    draw.polygon([(x + 0.2 * r, cy + 0.3 * r), (x + 0.55 * r, cy + 0.3 * r), (x + 0.45 * r, cy + 0.5 * r)], fill=ink)


def _arrow_board(draw, x, y, p, rng, light):
    dark = _shade((35, 35, 35), light)
    _quad(draw, x, y, p, -0.7, 0.7, 0.3, 0.7, _shade((230, 180, 20), light))
    for side in (-0.55, 0.55):
        draw.ellipse((x + (side - 0.18) * p, y - 0.36 * p, x + (side + 0.18) * p, y), fill=dark)
    _quad(draw, x, y, p, -0.05, 0.05, 0.7, 1.3, dark)
    _quad(draw, x, y, p, -1.0, 1.0, 1.3, 2.5, dark)
    lamp = (255, 200, 60)  # lamps shine: not darkened at night
    direction = 1 if rng.random() < 0.5 else -1
    points = [(-0.7, 0), (-0.35, 0), (0, 0), (0.35, 0), (0.7, 0), (0.45, 0.3), (0.45, -0.3), (0.2, 0.45), (0.2, -0.45)]
    for a, b in points:
        cx, cy = x + direction * a * p, y - (1.9 + b) * p
        r = max(1.0, 0.07 * p)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=lamp)


def _person(draw, x, y, p, rng, light, vest: bool):
    height = rng.uniform(1.6, 1.85)
    skin = _shade(_jitter(rng, (200, 160, 130), 30), light)
    trousers = _shade(_jitter(rng, (40, 45, 60), 20), light)
    shirt = _shade(_jitter(rng, _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], 20), light)
    _quad(draw, x, y, p, -0.17, -0.03, 0, 0.48 * height, trousers)
    _quad(draw, x, y, p, 0.03, 0.17, 0, 0.48 * height, trousers)
    _quad(draw, x, y, p, -0.22, 0.22, 0.46 * height, 0.84 * height, shirt)
    if vest:
        hi_vis = (210, 255, 40) if rng.random() < 0.5 else (255, 120, 20)
        hi_vis = _shade(hi_vis, max(light, 0.6))  # retro-reflective: stays bright in the dark
        _quad(draw, x, y, p, -0.21, 0.21, 0.5 * height, 0.82 * height, hi_vis)
        silver = _shade((225, 225, 225), max(light, 0.7))
        _quad(draw, x, y, p, -0.21, 0.21, 0.58 * height, 0.61 * height, silver)
        _quad(draw, x, y, p, -0.21, 0.21, 0.68 * height, 0.71 * height, silver)
    head = 0.11 * p
    cy = y - 0.92 * height * p
    draw.ellipse((x - head, cy - head, x + head, cy + head), fill=skin)
    if vest:
        hat = _shade(((250, 250, 250), (250, 210, 0), (255, 120, 10))[rng.integers(3)], light)
        draw.chord((x - 1.25 * head, cy - 1.3 * head, x + 1.25 * head, cy + 0.6 * head), 180, 360, fill=hat)


def _worker(draw, x, y, p, rng, light):
    _person(draw, x, y, p, rng, light, vest=True)


def _pedestrian(draw, x, y, p, rng, light):
    _person(draw, x, y, p, rng, light, vest=False)


def _excavator(draw, x, y, p, rng, light):
    yellow = _shade(_jitter(rng, (240, 180, 10), 15), light)
    dark = _shade((40, 40, 40), light)
    flip = 1 if rng.random() < 0.5 else -1
    _quad(draw, x, y, p, -1.6, 1.6, 0, 0.8, dark)
    _quad(draw, x, y, p, -1.3, 1.3, 0.8, 1.0, _shade((70, 70, 70), light))
    _quad(draw, x, y, p, -1.4, 1.2, 1.0, 2.0, yellow)
    cab = (-1.2, -0.2) if flip > 0 else (0.0, 1.0)
    _quad(draw, x, y, p, cab[0], cab[1], 2.0, 3.0, yellow)
    _quad(draw, x, y, p, cab[0] + 0.15, cab[1] - 0.15, 2.15, 2.85, _shade((60, 80, 100), light))
    base = (x + flip * 0.6 * p, y - 1.8 * p)
    elbow = (x + flip * 2.4 * p, y - 3.6 * p)
    tip = (x + flip * 3.2 * p, y - 0.9 * p)
    w = max(2, int(0.35 * p))
    draw.line([base, elbow], fill=yellow, width=w)
    draw.line([elbow, tip], fill=yellow, width=max(2, int(0.25 * p)))
    draw.polygon([tip, (tip[0] - flip * 0.6 * p, tip[1] + 0.1 * p), (tip[0], tip[1] + 0.7 * p)], fill=dark)


def _car(draw, x, y, p, rng, light, colour=None):
    colour = _shade(_jitter(rng, colour or _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], 12), light)
    width = rng.uniform(0.85, 1.0)
    wheel = _shade((15, 15, 15), light)
    _quad(draw, x, y, p, -width + 0.1, -width + 0.4, 0, 0.35, wheel)
    _quad(draw, x, y, p, width - 0.4, width - 0.1, 0, 0.35, wheel)
    draw.rounded_rectangle(
        (x - width * p, y - 0.95 * p, x + width * p, y - 0.2 * p), radius=max(1, 0.12 * p), fill=colour
    )
    roof = rng.uniform(1.35, 1.6)
    draw.polygon(
        [
            (x - 0.82 * width * p, y - 0.94 * p),
            (x + 0.82 * width * p, y - 0.94 * p),
            (x + 0.62 * width * p, y - roof * p),
            (x - 0.62 * width * p, y - roof * p),
        ],
        fill=colour,
    )
    draw.polygon(
        [
            (x - 0.72 * width * p, y - 0.98 * p),
            (x + 0.72 * width * p, y - 0.98 * p),
            (x + 0.58 * width * p, y - (roof - 0.08) * p),
            (x - 0.58 * width * p, y - (roof - 0.08) * p),
        ],
        fill=_shade((40, 50, 60), light),
    )
    tail = (230, 30, 30) if light > 0.5 else (255, 60, 50)
    _quad(draw, x, y, p, -width + 0.05, -width + 0.3, 0.6, 0.75, tail)
    _quad(draw, x, y, p, width - 0.3, width - 0.05, 0.6, 0.75, tail)
    _quad(draw, x, y, p, -0.25, 0.25, 0.35, 0.5, _shade((230, 230, 220), light))


def _orange_car(draw, x, y, p, rng, light):
    _car(draw, x, y, p, rng, light, colour=((245, 120, 15), (250, 150, 20), (230, 90, 20))[rng.integers(3)])


def _tree(draw, x, y, p, rng, light, autumn: bool | None = None):
    if autumn is None:
        autumn = rng.random() < 0.2
    trunk = _shade(_jitter(rng, (90, 60, 35), 15), light)
    _quad(draw, x, y, p, -0.15, 0.15, 0, 2.6, trunk)
    greens = ((50, 110, 40), (70, 130, 50), (35, 85, 35))
    autumns = ((215, 110, 20), (230, 150, 30), (190, 70, 25), (240, 180, 40))
    palette = autumns if autumn else greens
    r = rng.uniform(1.2, 2.0)
    for _ in range(4):
        cx = x + rng.uniform(-0.6, 0.6) * r * p
        cy = y - (2.6 + r * rng.uniform(0.5, 1.2)) * p
        rr = r * rng.uniform(0.6, 0.9) * p
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=_shade(_jitter(rng, palette[rng.integers(3)]), light))


def _autumn_tree(draw, x, y, p, rng, light):
    _tree(draw, x, y, p, rng, light, autumn=True)


def _lamp_post(draw, x, y, p, rng, light):
    grey = _shade((95, 98, 105), light)
    _quad(draw, x, y, p, -0.07, 0.07, 0, 6.5, grey)
    side = 1 if rng.random() < 0.5 else -1
    draw.line([(x, y - 6.4 * p), (x + side * 1.2 * p, y - 6.6 * p)], fill=grey, width=max(1, int(0.1 * p)))
    lamp = (255, 240, 200) if light < 0.5 else grey
    _quad(draw, x, y, p, side * 1.0, side * 1.0 + side * 0.4, 6.45, 6.6, lamp)


def _sign(draw, x, y, p, rng, light):
    grey = _shade((120, 120, 125), light)
    _quad(draw, x, y, p, -0.04, 0.04, 0, 2.1, grey)
    cy = y - 2.3 * p
    kind = rng.integers(5)
    r = 0.35 * p
    if kind == 0:  # speed limit
        draw.ellipse((x - r, cy - r, x + r, cy + r), fill=_shade((200, 20, 20), light))
        draw.ellipse((x - 0.75 * r, cy - 0.75 * r, x + 0.75 * r, cy + 0.75 * r), fill=_shade(_WHITE, light))
        draw.rectangle((x - 0.35 * r, cy - 0.3 * r, x + 0.35 * r, cy + 0.3 * r), fill=_shade((20, 20, 20), light))
    elif kind == 1:  # blue information sign
        draw.rectangle((x - 1.2 * r, cy - r, x + 1.2 * r, cy + r), fill=_shade((20, 70, 170), light))
        draw.rectangle((x - 0.6 * r, cy - 0.2 * r, x + 0.6 * r, cy + 0.2 * r), fill=_shade(_WHITE, light))
    elif kind == 2:  # yellow (not orange) warning diamond: a look-alike of the work sign
        _diamond(draw, x, cy, 1.2 * r, _shade((250, 210, 0), light), _shade((20, 20, 20), light))
        draw.polygon(
            [(x, cy - 0.5 * r), (x + 0.3 * r, cy + 0.4 * r), (x - 0.3 * r, cy + 0.4 * r)],
            fill=_shade((20, 20, 20), light),
        )
    elif kind == 3:  # stop
        points = [(x + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(math.pi / 8, 2 * math.pi, 8)]
        draw.polygon(points, fill=_shade((200, 20, 20), light))
    else:  # no entry
        draw.ellipse((x - r, cy - r, x + r, cy + r), fill=_shade((200, 20, 20), light))
        draw.rectangle((x - 0.7 * r, cy - 0.18 * r, x + 0.7 * r, cy + 0.18 * r), fill=_shade(_WHITE, light))


def _billboard(draw, x, y, p, rng, light):
    grey = _shade((80, 80, 85), light)
    for side in (-1.2, 1.2):
        _quad(draw, x, y, p, side - 0.06, side + 0.06, 0, 3.2, grey)
    colour = ((250, 120, 20), (240, 90, 30), (30, 90, 200), (230, 230, 230), (200, 30, 60))[rng.integers(5)]
    _quad(draw, x, y, p, -2.0, 2.0, 3.0, 5.0, _shade(_jitter(rng, colour), light))
    for i in range(rng.integers(1, 4)):
        ink = _shade(((255, 255, 255), (20, 20, 20), (250, 220, 0))[rng.integers(3)], light)
        _quad(draw, x, y, p, -1.7, rng.uniform(-0.5, 1.7), 4.5 - 0.45 * i, 4.7 - 0.45 * i, ink)


def _barber_pole(draw, x, y, p, rng, light):
    _quad(draw, x, y, p, -0.13, 0.13, 1.2, 2.3, _shade(_WHITE, light))
    colours = [_shade((200, 20, 30), light), _shade((30, 50, 170), light)]
    h = 1.2
    i = 0
    while h < 2.3:
        top = min(h + 0.12, 2.3)
        draw.polygon(
            [
                (x - 0.13 * p, y - h * p),
                (x + 0.13 * p, y - (h + 0.1) * p),
                (x + 0.13 * p, y - (top + 0.1) * p),
                (x - 0.13 * p, y - top * p),
            ],
            fill=colours[i % 2],
        )
        h += 0.25
        i += 1
    _quad(draw, x, y, p, -0.16, 0.16, 2.3, 2.4, _shade((200, 200, 200), light))
    _quad(draw, x, y, p, -0.16, 0.16, 1.1, 1.2, _shade((200, 200, 200), light))


def _awning(draw, x, y, p, rng, light):
    pair = (((200, 30, 30), _WHITE), ((245, 120, 20), _WHITE), ((30, 110, 60), _WHITE))[rng.integers(3)]
    width = rng.uniform(1.5, 2.5)
    _quad(draw, x, y, p, -width, width, 0, 2.2, _shade((60, 55, 50), light))  # shop front below
    _quad(draw, x, y, p, -width * 0.9, width * 0.9, 0.2, 1.9, _shade((90, 110, 120), light))
    stripe = 0.35
    k = -width
    i = 0
    while k < width:
        _quad(draw, x, y, p, k, min(k + stripe, width), 2.2, 2.9, _shade(pair[i % 2], light))
        k += stripe
        i += 1


def _bollards(draw, x, y, p, rng, light):
    red, white = _shade((210, 25, 25), light), _shade(_WHITE, light)
    for i in range(rng.integers(2, 5)):
        bx = x + i * 1.2 * p
        _quad(draw, bx, y, p, -0.09, 0.09, 0, 0.9, red)
        for h0 in (0.35, 0.65):
            _quad(draw, bx, y, p, -0.09, 0.09, h0, h0 + 0.12, white)


def _traffic_light(draw, x, y, p, rng, light):
    dark = _shade((40, 40, 40), light)
    _quad(draw, x, y, p, -0.06, 0.06, 0, 3.0, dark)
    _quad(draw, x, y, p, -0.22, 0.22, 3.0, 4.1, _shade((25, 25, 25), light))
    lit = rng.integers(3)
    for i, colour in enumerate(((230, 30, 30), (255, 170, 0), (30, 200, 80))):
        cy = y - (3.9 - 0.36 * i) * p
        r = 0.13 * p
        draw.ellipse((x - r, cy - r, x + r, cy + r), fill=colour if i == lit else _shade(colour, 0.3))


def _shade(colour, light: float) -> tuple[int, int, int]:
    return tuple(int(c * light) for c in colour)


# Real widths (half, metres) and heights of every object, for placement inside the cue box.
_CUES: dict[str, tuple[Callable, float, float]] = {
    "cone": (_cone, 0.25, 0.9),
    "drum": (_drum, 0.4, 1.0),
    "barricade": (_barricade, 1.0, 1.0),
    "work_sign": (_work_sign, 0.5, 2.0),
    "arrow_board": (_arrow_board, 1.0, 2.6),
    "worker": (_worker, 0.25, 1.9),
    "excavator": (_excavator, 3.5, 3.9),
}
_CUE_FUNCTIONS = frozenset(fn for fn, _, _ in _CUES.values())
# Extents of the non-cue objects that can stand in front of a cue (half width, height in metres): one that would
# hide a cue completely is left out, so a positive scene always shows its roadwork.
_OCCLUDER_EXTENTS: dict[Callable, tuple[float, float]] = {
    _car: (1.0, 1.6),
    _orange_car: (1.0, 1.6),
    _awning: (2.5, 2.9),
    _pedestrian: (0.25, 1.9),
    _tree: (0.2, 2.6),
    _autumn_tree: (0.2, 2.6),
}
LONE_CUE_SHARE = 0.1
"""Share of positive scenes with a single roadwork cue, the hardest ones: this sets the data's difficulty."""
LONE_CUE_DEPTH = (1.4, 2.8)
"""Depth range of a lone cue (z = 1 is the bottom row; a cone at z = 3 is about 12 pixels tall at 320x240)."""
_CUE_WEIGHTS = np.array([0.3, 0.16, 0.16, 0.12, 0.06, 0.12, 0.08])
_LOOKALIKES: dict[str, Callable] = {
    "orange_car": _orange_car,
    "autumn_tree": _autumn_tree,
    "billboard": _billboard,
    "barber_pole": _barber_pole,
    "awning": _awning,
    "bollards": _bollards,
    "pedestrian": _pedestrian,
}


def _facades(draw: ImageDraw.ImageDraw, scene: _Scene, rng: np.random.Generator, light: float, time: str) -> None:
    """Building facades on both sides, far to near, with windows (some lit at night)."""
    for side in (-1, 1):
        x_face = side * rng.uniform(7.5, 10.0)
        z = 40.0
        while z > 1.05:
            z_near = max(1.0, z - rng.uniform(2.0, 10.0))
            height = rng.uniform(6.0, 22.0)
            wall = _shade(
                _jitter(
                    rng,
                    ((170, 150, 130), (140, 140, 145), (190, 180, 160), (120, 90, 80), (200, 200, 195))[
                        rng.integers(5)
                    ],
                    18,
                ),
                light,
            )
            corners = [
                scene.project(x_face, z, 0),
                scene.project(x_face, z_near, 0),
                scene.project(x_face, z_near, height),
                scene.project(x_face, z, height),
            ]
            draw.polygon(corners, fill=wall)
            glass = _shade((70, 85, 105), light)
            lit = (255, 220, 140)
            floors = int(height // 3)
            depth_steps = max(1, int((z - z_near) // 1.6))
            if scene.ppm(z_near) * 3 > 6:  # windows only where they are at least a few pixels tall
                for f in range(floors):
                    for k in range(depth_steps):
                        za = z - k * (z - z_near) / depth_steps - 0.3
                        zb = za - (z - z_near) / depth_steps * 0.5
                        h0, h1 = 1.0 + 3 * f, 2.2 + 3 * f
                        colour = lit if time == "night" and rng.random() < 0.4 else glass
                        draw.polygon(
                            [
                                scene.project(x_face, za, h0),
                                scene.project(x_face, zb, h0),
                                scene.project(x_face, zb, h1),
                                scene.project(x_face, za, h1),
                            ],
                            fill=colour,
                        )
            z = z_near


def _in_cue_box(scene: _Scene, x: float, y: float, p: float, half_m: float, height_m: float) -> bool:
    x0, y0, x1, y1 = scene.crop
    return x - half_m * p >= x0 and x + half_m * p <= x1 and y - height_m * p >= y0 and y <= y1


def _box(scene: _Scene, x_m: float, z: float, half_m: float, height_m: float) -> tuple[float, float, float, float]:
    x, y = scene.project(x_m, z)
    p = scene.ppm(z)
    return x - half_m * p, y - height_m * p, x + half_m * p, y


def _place_cues(scene: _Scene, rng: np.random.Generator, objects: list) -> None:
    """Add roadwork cues inside the cue box: a lone cue (the hard positives), a few, or a work site whose cones and
    drums taper across a lane."""
    mode = rng.random()
    if mode < LONE_CUE_SHARE:
        count, z_range = 1, LONE_CUE_DEPTH
    elif mode < LONE_CUE_SHARE + 0.3:
        count, z_range = int(rng.integers(2, 6)), (1.3, 2.8)
    else:
        count, z_range = int(rng.integers(5, 13)), (1.2, 3.5)
    weights = _CUE_WEIGHTS / _CUE_WEIGHTS.sum()
    kind = rng.choice(len(CUE_KINDS), p=weights)
    lane = rng.uniform(-3.0, 3.0)
    drift = rng.uniform(-0.25, 0.25)  # metres of lateral shift per metre of depth: a taper
    for i in range(count):
        if i > 0 and rng.random() < 0.4:
            kind = rng.choice(len(CUE_KINDS), p=weights)
        draw_fn, half_m, height_m = _CUES[CUE_KINDS[kind]]
        for _ in range(12):
            z = float(np.exp(rng.uniform(np.log(z_range[0]), np.log(z_range[1]))))
            if rng.random() < 0.7:
                x_m = lane + drift * (z - z_range[0]) * 4 + rng.uniform(-0.6, 0.6)
            else:
                x_m = rng.uniform(-5.5, 5.5)
            x, y = scene.project(x_m, z)
            if _in_cue_box(scene, x, y, scene.ppm(z), half_m, height_m):
                objects.append((z, x_m, draw_fn))
                break
    if not any(fn in _CUE_FUNCTIONS for _, _, fn in objects):
        objects.append((2.5, 0.0, _cone))  # no placement fitted: a cone in the middle of the road, always inside


_CUE_EXTENTS = {fn: (half, height) for fn, half, height in _CUES.values()}


def _drop_full_occluders(scene: _Scene, objects: list) -> list:
    """Leave out any object nearer than a cue whose box would cover that cue's box completely."""
    cues = [_box(scene, x_m, z, *_CUE_EXTENTS[fn]) + (z,) for z, x_m, fn in objects if fn in _CUE_FUNCTIONS]
    kept = []
    for z, x_m, fn in objects:
        if fn in _OCCLUDER_EXTENTS:
            a0, b0, a1, b1 = _box(scene, x_m, z, *_OCCLUDER_EXTENTS[fn])
            if any(z < cz and a0 <= c0 and b0 <= d0 and c1 <= a1 and d1 <= b1 for c0, d0, c1, d1, cz in cues):
                continue
        kept.append((z, x_m, fn))
    return kept


def render_scene(
    rng_seed: int, label: int, size: tuple[int, int] = (320, 240), jpeg_quality: int | None = None
) -> Image.Image:
    """Render one street scene; the same ``(rng_seed, label, size, jpeg_quality)`` always gives the same pixels.

    Args:
        rng_seed: Seed of everything random in the scene.
        label: 1 adds roadwork cues, 0 does not (both get the same kinds of distractors and look-alikes).
        size: Output width and height.
        jpeg_quality: Re-compress through JPEG at this quality (None: no re-compression).

    Returns:
        An RGB image of ``size``.
    """
    return _render(rng_seed, label, size, jpeg_quality)[0]


def _render(
    rng_seed: int, label: int, size: tuple[int, int], jpeg_quality: int | None
) -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    """The scene and the boxes ``(x0, y0, x1, y1)`` of its roadwork cues in output pixels."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    rng = np.random.default_rng([int(rng_seed) & 0xFFFFFFFF, int(label)])
    out_w, out_h = size
    width, height = out_w * SUPERSAMPLE, out_h * SUPERSAMPLE
    square = min(width, height) * CENTRE_MARGIN
    crop = ((width - square) / 2, (height - square) / 2, (width + square) / 2, (height + square) / 2)
    scene = _Scene(
        width,
        height,
        height * rng.uniform(0.36, 0.5),
        width * rng.uniform(0.4, 0.6),
        width * rng.uniform(0.45, 0.75),
        crop,
    )
    time = TIMES_OF_DAY[rng.integers(len(TIMES_OF_DAY))]
    light = _LIGHT[time] * rng.uniform(0.85, 1.1)

    image = _sky(scene, time, rng)
    draw = ImageDraw.Draw(image)
    # Distant skyline, then ground: verge, sidewalks, road, markings.
    skyline = _shade(_jitter(rng, (120, 125, 135), 20), light * 0.9)
    x = 0.0
    while x < width:
        w = rng.uniform(0.04, 0.12) * width
        draw.rectangle((x, scene.horizon - rng.uniform(0.02, 0.12) * height, x + w, scene.horizon), fill=skyline)
        x += w
    draw.rectangle((0, scene.horizon, width, height), fill=_shade(_grey_jitter(rng, (95, 100, 90), 12), light))
    far = 60.0
    for x_in, x_out, colour in ((3.5, 7.5, (165, 160, 155)), (-3.5, -7.5, (165, 160, 155))):
        draw.polygon(
            [scene.project(x_in, far), scene.project(x_out, far), scene.project(x_out, 0.6), scene.project(x_in, 0.6)],
            fill=_shade(_grey_jitter(rng, colour, 12), light),
        )
    asphalt = _shade(_grey_jitter(rng, (78, 78, 82), 16), light)
    draw.polygon(
        [scene.project(-3.5, far), scene.project(3.5, far), scene.project(3.5, 0.6), scene.project(-3.5, 0.6)],
        fill=asphalt,
    )
    paint = _shade((235, 235, 225) if rng.random() < 0.8 else (240, 200, 40), light)
    for edge in (-3.3, 3.3):
        draw.polygon(
            [
                scene.project(edge - 0.08, far),
                scene.project(edge + 0.08, far),
                scene.project(edge + 0.08, 0.6),
                scene.project(edge - 0.08, 0.6),
            ],
            fill=paint,
        )
    z = 0.6
    while z < far:
        z_end = z + 1.5 * z * 0.25 + 0.5
        draw.polygon(
            [scene.project(-0.07, z_end), scene.project(0.07, z_end), scene.project(0.07, z), scene.project(-0.07, z)],
            fill=paint,
        )
        z = z_end + 1.0 * z * 0.3 + 0.6
    _facades(draw, scene, rng, light, time)

    # Objects, drawn far to near so that near ones occlude.
    objects: list[tuple[float, float, Callable]] = []
    for _ in range(rng.integers(0, 5)):  # cars on the road and parked
        objects.append(
            (
                float(np.exp(rng.uniform(np.log(1.4), np.log(25)))),
                rng.choice([-1.75, 1.75, -4.4, 4.4]) + rng.uniform(-0.3, 0.3),
                _car,
            )
        )
    for _ in range(rng.integers(1, 6)):
        objects.append((float(np.exp(rng.uniform(np.log(1.2), np.log(30)))), rng.choice([-6.0, 6.0]), _tree))
    for _ in range(rng.integers(0, 4)):
        objects.append(
            (
                float(np.exp(rng.uniform(np.log(1.3), np.log(30)))),
                rng.choice([-4.6, 4.6]),
                (_lamp_post, _sign, _traffic_light, _sign)[rng.integers(4)],
            )
        )
    for _ in range(rng.choice(3, p=[0.45, 0.4, 0.15])):  # hard look-alikes, in both classes alike
        name = list(_LOOKALIKES)[rng.integers(len(_LOOKALIKES))]
        lateral = rng.uniform(-2.5, 2.5) if name == "orange_car" else rng.choice([-1, 1]) * rng.uniform(4.0, 6.5)
        objects.append((float(np.exp(rng.uniform(np.log(1.5), np.log(14)))), lateral, _LOOKALIKES[name]))
    if label == 1:
        _place_cues(scene, rng, objects)
        objects = _drop_full_occluders(scene, objects)
    objects.sort(key=lambda o: -o[0])
    cue_boxes = [_box(scene, x_m, z, *_CUE_EXTENTS[fn]) for z, x_m, fn in objects if fn in _CUE_FUNCTIONS]
    for z, x_m, draw_fn in objects:
        x, y = scene.project(x_m, z)
        lit = max(light, 0.65) if draw_fn in _CUE_FUNCTIONS else light  # headlights on retro-reflective sheeting
        draw_fn(draw, x, y, scene.ppm(z), rng, lit)

    # Weather, optics and sensor.
    if rng.random() < 0.15:  # fog: fades with distance, i.e. towards the horizon
        rows = np.abs(np.arange(height, dtype=np.float32) - scene.horizon) / height
        alpha = np.clip(rng.uniform(0.5, 0.8) - rows * rng.uniform(1.0, 2.0), 0, 1)[:, None, None]
        fog = np.array(_shade((200, 200, 205), max(light, 0.4)), dtype=np.float32)
        array = np.asarray(image, dtype=np.float32) * (1 - alpha) + fog * alpha
        image = Image.fromarray(array.astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
    if rng.random() < 0.12:  # rain streaks
        streak = _shade((200, 205, 215), max(light, 0.5))
        slant = rng.uniform(-0.3, 0.3)
        for _ in range(int(rng.integers(80, 200))):
            sx, sy = rng.uniform(0, width), rng.uniform(0, height)
            length = rng.uniform(6, 18)
            draw.line([(sx, sy), (sx + slant * length, sy + length)], fill=streak, width=1)
    image = image.reduce(SUPERSAMPLE)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    array = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0, rng.uniform(1.0, 6.0), size=(out_h, out_w, 1)).astype(np.int16)
    image = Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8), "RGB")
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(jpeg_quality))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image, [tuple(v / SUPERSAMPLE for v in box) for box in cue_boxes]


def scene_seed(seed: int, index: int) -> int:
    """The render seed of image ``index`` of a synthetic set with ``seed`` (independent streams per image)."""
    return int.from_bytes(hashlib.sha256(f"synthetic:{seed}:{index}".encode()).digest()[:4], "big")


def render_dataset(out_dir: Path, count: int, settings, progress: bool = False) -> list[tuple[str, int]]:
    """Render ``count`` scenes (alternating labels, so half per class) as files under ``out_dir/<class>/``.

    Files already there are re-used, so a re-run (or a run resumed after a kill) renders only what is missing; each
    file is written atomically. The file names carry the seed, size and format so that changed settings never
    re-use stale images.

    Args:
        out_dir: Usually ``RunDir.synthetic``.
        count: Number of images.
        settings: ``DataSettings`` (seed, synthetic_size, synthetic_jpeg).
        progress: Show a progress bar on stderr.

    Returns:
        ``(path, label)`` of every image, in index order.
    """
    from roadwork_cli.io.atomic import atomic_write_bytes
    from roadwork_cli.io.progress import progress_bar

    width, height = settings.synthetic_size
    ext = "jpg" if settings.synthetic_jpeg else "png"
    items = []
    todo = []
    for index in range(count):
        label = index % 2
        path = out_dir / CLASS_FOLDERS[label] / f"syn{settings.seed}_{width}x{height}_{index:06d}.{ext}"
        items.append((str(path), label))
        if not (path.exists() and path.stat().st_size > 0):
            todo.append((index, label, path))
    if todo:
        with progress_bar("rendering synthetic scenes", len(todo), "img", progress) as step:
            for index, label, path in todo:
                seed = scene_seed(settings.seed, index)
                image = render_scene(seed, label, (width, height))
                buffer = io.BytesIO()
                if settings.synthetic_jpeg:
                    quality = 30 + seed % 66  # 30..95, like re-compressed uploads
                    image.save(buffer, "JPEG", quality=quality)
                else:
                    image.save(buffer, "PNG")
                os.makedirs(path.parent, exist_ok=True)
                atomic_write_bytes(path, buffer.getvalue())
                step(1)
    return items
