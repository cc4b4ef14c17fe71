"""Redraw an image folder as pixel art in place: each image averaged over BLOCK×BLOCK cells, then enlarged back
with hard edges. The data of the style-LoRA run (train_gpu.sh lora-style): a look the base model never saw.

    python3 recipes/default/pixelate.py FOLDER [BLOCK]      # BLOCK in pixels, default 8
"""

import sys
from pathlib import Path

from PIL import Image


def main() -> None:
    folder, block = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        sys.exit(f"no PNG images in {folder}")
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            small = im.resize((im.width // block, im.height // block), Image.Resampling.BOX)
            small.resize(im.size, Image.Resampling.NEAREST).save(path)
    print(f"pixelated {len(files)} images in {folder} ({block}-pixel blocks)")


if __name__ == "__main__":
    main()
