"""Write a smaller copy of the training data (photos, plate annotations, teacher face labels).

Why: a lent GPU machine receives at most 64 MiB with the working tree; the training photos are ~145 MiB.
The copy has each photo's long side reduced to --max-side (area averaging) and re-encoded as JPEG at
--quality; every box is scaled with its photo. File names stay the same, so the dev split (a hash of the
name) is unchanged. Train on the copy with the scale jitter multiplied by the reduction, e.g. 640/960:
`--augment '{"scale_min": 0.6, "scale_max": 1.8}'`, so crops show objects at the sizes the full photos gave.

    python tools/shrink_train_data.py --out var/gpu_data [--max-side 640] [--quality 60]

Output: OUT/plates_openimages/{annotations.json,images/}, OUT/faces_unlabelled/images/, OUT/labels/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
PLATES, FACES = "plates_openimages", "faces_unlabelled"


def shrink_photo(src: Path, dst: Path, max_side: int, quality: int) -> float:
    """Write the reduced photo; return the factor its coordinates were multiplied by (<= 1)."""
    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"cannot decode {src}")
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    if not ok:
        raise OSError(f"cannot encode {dst}")
    dst.write_bytes(buf.tobytes())
    return scale


def _scaled(box: list, scale: float) -> list:
    """[x1, y1, x2, y2, extra...] with the coordinates scaled and the rest kept."""
    return [round(v * scale, 2) for v in box[:4]] + list(box[4:])


def shrink(data: Path, labels: Path, out: Path, max_side: int, quality: int) -> dict:
    scales: dict[str, dict[str, float]] = {PLATES: {}, FACES: {}}
    records = json.loads((data / PLATES / "annotations.json").read_text())
    for rec in records:
        scale = shrink_photo(data / PLATES / rec["image"], out / PLATES / rec["image"], max_side, quality)
        scales[PLATES][rec["image"]] = scale
        rec["width"], rec["height"] = round(rec["width"] * scale), round(rec["height"] * scale)
        rec["boxes"] = [_scaled(b, scale) for b in rec["boxes"]]
    (out / PLATES / "annotations.json").write_text(json.dumps(records))
    for path in sorted((data / FACES / "images").iterdir()):
        rel = f"images/{path.name}"
        scales[FACES][rel] = shrink_photo(path, out / FACES / rel, max_side, quality)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for set_name, set_scales in scales.items():
        faces = json.loads((labels / f"{set_name}.json").read_text())
        scaled = {rel: [_scaled(b, set_scales[rel]) for b in boxes] for rel, boxes in faces.items()}
        (out / "labels" / f"{set_name}.json").write_text(json.dumps(scaled))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"photos": sum(len(s) for s in scales.values()), "bytes": size, "max_side": max_side, "quality": quality}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/train"))
    ap.add_argument("--labels", type=Path, default=REPO / "var" / "labels", help="teacher face labels")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-side", type=int, default=640)
    ap.add_argument("--quality", type=int, default=60)
    args = ap.parse_args()
    print(json.dumps(shrink(args.data, args.labels, args.out, args.max_side, args.quality)))


if __name__ == "__main__":
    main()
