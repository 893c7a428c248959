"""Write jaxflow/assets/demo.png: a deterministic 224x224 RGB demo image.

A soft textured background (smooth sinusoidal pattern, no randomness) with a red
circle (top left), a blue square (top right) and a green triangle (bottom centre).
Run: python scripts/make_demo_image.py
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxflow", "assets", "demo.png")


def make_demo_image(size: int = SIZE) -> Image.Image:
    """Build the demo image (deterministic: pure arithmetic, no RNG)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size  # (H, W) each, in [0, 1)
    texture = 0.5 + 0.25 * np.sin(2 * np.pi * (3 * x + 2 * y)) * np.cos(2 * np.pi * (2 * x - 3 * y))
    base = np.stack(
        [
            200 + 30 * texture + 10 * y,  # R
            195 + 30 * texture + 10 * x,  # G
            175 + 25 * texture,  # B
        ],
        axis=-1,
    )  # (H, W, 3)
    image = Image.fromarray(np.clip(np.round(base), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    s = size / 224
    draw.ellipse([20 * s, 20 * s, 100 * s, 100 * s], fill=(220, 30, 30), outline=(120, 10, 10), width=2)
    draw.rectangle([126 * s, 24 * s, 200 * s, 98 * s], fill=(30, 60, 210), outline=(10, 20, 110), width=2)
    draw.polygon([(112 * s, 118 * s), (182 * s, 204 * s), (42 * s, 204 * s)], fill=(30, 170, 50), outline=(10, 90, 20))
    return image


def main() -> None:
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    make_demo_image().save(OUT, format="PNG", optimize=False)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
