"""The shapes world: a procedural text-to-image domain small enough to train and evaluate on a CPU.

A prompt names one object by four attributes::

    "a {size} {colour} {shape} {position phrase}"      e.g. "a small red circle on the left",
                                                             "a large blue diamond in the centre"

Vocabulary (``COLOURS``, ``SHAPES``, ``SIZES``, ``POSITIONS``): 6 colours x 4 shapes x 2 sizes x
5 positions = 240 attribute combinations. ``split("train" | "eval")`` is a fixed, deterministic partition
of the combinations (GenEval-style: the held-out split asks for combinations never seen in training,
while every single attribute value appears in both).

``render(attrs, rng=None)`` draws the image a prompt describes: an RGB image [3, H, W] float32 numpy
array in [0, 1] (channel-first, like the reward inputs), default 32 x 32, a plain light-grey background
and one flat-coloured object, drawn with PIL at 4x supersampling and box-downsampled (anti-aliased).
``rng=None`` gives the canonical image; a ``numpy.random.Generator`` jitters position (+-1.5 px), size
(+-8%), object colour (+-0.03) and background level (+-0.02) for training-data variety.

Geometry (fractions of the image width W): an object's bounding box is ``SIZES[size] * W`` on a side
(small 0.26, large 0.42), centred at ``POSITIONS[position]``. Triangles point up; diamonds are squares
turned 45 degrees inside the same box.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: name -> RGB in [0, 1] (chosen to be far apart from each other and from the background)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.13, 0.62, 0.22),
    "blue": (0.14, 0.30, 0.88),
    "yellow": (0.95, 0.83, 0.10),
    "purple": (0.56, 0.22, 0.72),
    "orange": (0.97, 0.52, 0.06),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
#: name -> side of the bounding box as a fraction of the image width
SIZES: dict[str, float] = {"small": 0.26, "large": 0.42}
#: name -> (x, y) centre as fractions of (W, H); y grows downwards
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
#: how a position is said in a prompt
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
BACKGROUND: tuple[float, float, float] = (0.90, 0.90, 0.90)
RESOLUTION = 32
SUPERSAMPLE = 4
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")

#: every word a prompt can contain (the tokenizer's vocabulary), in a fixed order
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ["a", *COLOURS, *SHAPES, *SIZES, *(w for p in POSITION_PHRASES.values() for w in p.split()), "center"]))

#: fraction of combinations held out for evaluation, and the seed of the partition
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 20261126
DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Attributes:
    """One object description."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, valid in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"

    def as_dict(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position}

    @staticmethod
    def from_mapping(m: Mapping[str, Any]) -> Attributes:
        missing = [a for a in ATTRIBUTES if a not in m]
        if missing:
            raise ValueError(f"shapes metadata lacks {missing}; expected keys {list(ATTRIBUTES)}")
        return Attributes(*(str(m[a]) for a in ATTRIBUTES))


def all_combinations() -> list[Attributes]:
    """All 240 combinations in a fixed order (colour-major)."""
    return [Attributes(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def split(name: str) -> list[Attributes]:
    """The deterministic train / held-out partition of the combinations ("train" or "eval").

    A fixed-seed permutation picks ``HELDOUT_FRACTION`` of the combinations for "eval"; the partition
    is redrawn (with the next seed) until every attribute value occurs in both splits."""
    if name not in ("train", "eval"):
        raise ValueError(f"unknown shapes split {name!r}; valid: train, eval")
    combos = all_combinations()
    n_eval = round(HELDOUT_FRACTION * len(combos))
    seed = SPLIT_SEED
    while True:
        perm = np.random.default_rng(seed).permutation(len(combos))
        held = set(perm[:n_eval].tolist())
        ev = [c for i, c in enumerate(combos) if i in held]
        tr = [c for i, c in enumerate(combos) if i not in held]
        if all({getattr(c, a) for c in ev} == {getattr(c, a) for c in tr} for a in ATTRIBUTES):
            return tr if name == "train" else ev
        seed += 1


_WORD = re.compile(r"[a-z]+")


def parse_prompt(prompt: str) -> Attributes:
    """Read the attributes back from a prompt: the first colour, shape, size and position word in it
    (``center`` is accepted for ``centre``). Raises ValueError naming what is missing."""
    words = _WORD.findall(prompt.lower())
    found: dict[str, str] = {}
    for w in words:
        w = "centre" if w == "center" else w
        for attr, valid in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
            if w in valid and attr not in found:
                found[attr] = w
    missing = [a for a in ATTRIBUTES if a not in found]
    if missing:
        raise ValueError(f"cannot read {', '.join(missing)} from prompt {prompt!r}; shapes prompts look like "
                         f"'a small red circle on the left'")
    return Attributes(found["colour"], found["shape"], found["size"], found["position"])


def _polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    h = s / 2
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    return None


def render(attrs: Attributes | Mapping[str, Any] | str, rng: np.random.Generator | None = None,
           resolution: int = RESOLUTION) -> np.ndarray:
    """The image [3, H, W] float32 in [0, 1] described by ``attrs`` (Attributes, a metadata mapping,
    or a prompt). ``rng=None``: canonical; else jittered (see the module docstring)."""
    from PIL import Image, ImageDraw

    if isinstance(attrs, str):
        attrs = parse_prompt(attrs)
    elif not isinstance(attrs, Attributes):
        attrs = Attributes.from_mapping(attrs)
    big = resolution * SUPERSAMPLE
    side = SIZES[attrs.size] * resolution
    cx, cy = POSITIONS[attrs.position][0] * resolution, POSITIONS[attrs.position][1] * resolution
    colour = np.asarray(COLOURS[attrs.colour])
    bg = np.asarray(BACKGROUND)
    if rng is not None:
        side *= 1.0 + rng.uniform(-0.08, 0.08)
        cx += rng.uniform(-1.5, 1.5)
        cy += rng.uniform(-1.5, 1.5)
        colour = colour + rng.uniform(-0.03, 0.03, size=3)
        bg = bg + rng.uniform(-0.02, 0.02)
    half = side / 2
    cx = float(np.clip(cx, half + 0.5, resolution - half - 0.5))
    cy = float(np.clip(cy, half + 0.5, resolution - half - 0.5))
    to8 = lambda c: tuple(round(float(v) * 255) for v in np.clip(c, 0, 1))
    img = Image.new("RGB", (big, big), to8(bg))
    draw = ImageDraw.Draw(img)
    S = SUPERSAMPLE
    X, Y, Z = cx * S, cy * S, side * S
    poly = _polygon(attrs.shape, X, Y, Z)
    box = [X - Z / 2, Y - Z / 2, X + Z / 2 - 1, Y + Z / 2 - 1]
    if attrs.shape == "circle":
        draw.ellipse(box, fill=to8(colour))
    elif attrs.shape == "square":
        draw.rectangle(box, fill=to8(colour))
    else:
        draw.polygon(poly, fill=to8(colour))
    img = img.resize((resolution, resolution), Image.BOX)
    return (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()


def render_batch(attrs: Iterable[Attributes | Mapping[str, Any] | str], rng: np.random.Generator | None = None,
                 resolution: int = RESOLUTION) -> np.ndarray:
    """Images [L, 3, H, W] float32 in [0, 1]."""
    return np.stack([render(a, rng, resolution) for a in attrs])


def prompt_records(name: str) -> list[dict[str, str]]:
    """The JSONL records of a split: {"prompt", "colour", "shape", "size", "position"}."""
    return [{"prompt": a.prompt, **a.as_dict()} for a in split(name)]


def prompt_file(name: str) -> Path:
    """Path of the shipped prompt file of a split (``data/train.jsonl`` or ``data/eval.jsonl``)."""
    if name not in ("train", "eval"):
        raise ValueError(f"unknown shapes split {name!r}; valid: train, eval")
    return DATA_DIR / f"{name}.jsonl"


def write_prompt_files(out_dir: Path = DATA_DIR) -> None:
    """(Re)write ``train.jsonl`` and ``eval.jsonl`` from ``split``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", "eval"):
        lines = [json.dumps(r) for r in prompt_records(name)]
        (out_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_prompt_files()
