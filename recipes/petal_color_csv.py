"""Write the petal_color labels of recipes/flowers_two_heads.yaml for a flower_photos class-per-folder copy.

petal_color is derived from the species folder (yellow: dandelion, sunflowers; other: daisy, roses, tulips),
so it adds no information: it shows a second head with its own CSV labels on real photos.

usage: python recipes/petal_color_csv.py DATA_DIR [OUT_CSV]   (default: recipes/flowers_petal_color.csv)
Rows name each image by its path relative to DATA_DIR, e.g. train/daisy/100080576_f52e8ee070_n.jpg.
"""
import csv
import sys
from pathlib import Path

PETAL_COLOR = {"dandelion": "yellow", "sunflowers": "yellow", "daisy": "other", "roses": "other", "tulips": "other"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}


def rows(root: Path) -> list[tuple[str, str]]:
    """(path relative to root, petal colour) for every image in a species folder, sorted by path."""
    return sorted((path.relative_to(root).as_posix(), PETAL_COLOR[path.parent.name])
                  for path in root.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.parent.name in PETAL_COLOR)


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).with_name("flowers_petal_color.csv")
    found = rows(root)
    with out.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("file", "petal_color"), *found])
    print(f"{out}: {len(found)} images labelled from {root}")


if __name__ == "__main__":
    main()
