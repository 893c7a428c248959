"""Write jaxflow/assets/demo.png: the bundled demo image, a deterministic sample of the toy model's
world (`jaxflow.toy.data`): a red circle (top left), a blue square (top right) and a green triangle
(bottom centre) on the textured background, 112 x 112 px. Its boxes are `DEMO_OBJECTS`.

Run: python scripts/make_demo_image.py
"""
from __future__ import annotations

import os

from jaxflow.cli import run

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxflow", "assets", "demo.png")


def main(argv) -> None:
    del argv
    from jaxflow.tiny import make_demo_image

    make_demo_image().save(OUT, format="PNG", optimize=False)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    run(main)
