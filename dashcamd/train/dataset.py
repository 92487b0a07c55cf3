"""Training samples: plate labels + teacher face labels, dev split, and dashcam-like augmentations.

Boxes everywhere here are float32 (N, 4) xyxy in pixels of the image they belong to, classes int64
(N,) with 0 = plate, 1 = face (the detector's class order). Images are RGB uint8 (H, W, 3).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from dashcamd.detect.infer import PAD_LEVEL  # letterbox grey: train as the detector pads

CLASS_NAMES = ("plate", "face")
PLATE, FACE = 0, 1


@dataclass(frozen=True)
class Sample:
    """One labelled photo. boxes_xyxy (N, 4) float32 px, classes (N,) int64."""

    image_path: Path
    boxes_xyxy: np.ndarray
    classes: np.ndarray


def _in_dev(name: str, dev_fraction: float) -> bool:
    """Stable split by name hash, so resumed runs and later sessions see the same dev images."""
    return (zlib.crc32(name.encode()) % 1000) < dev_fraction * 1000


def load_samples(plates_dir: Path, faces_dir: Path, labels_dir: Path, face_min_score: float,
                 dev_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Merge human plate labels with cached teacher face labels; return (train, dev).

    plates_dir holds annotations.json + images/; faces_dir holds images/ only; labels_dir is the
    cache written by tools/label_faces.py (<set>.json: {"images/x.jpg": [[x1,y1,x2,y2,score]]}).
    Teacher boxes below face_min_score are not used as labels.
    """

    def faces_of(set_name: str) -> dict[str, list[list[float]]]:
        path = labels_dir / f"{set_name}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run tools/label_faces.py first")
        return json.loads(path.read_text())

    def make(root: Path, rel: str, plates: list, faces: list) -> Sample:
        boxes = [p[:4] for p in plates] + [f[:4] for f in faces if f[4] >= face_min_score]
        classes = [PLATE] * len(plates) + [FACE] * (len(boxes) - len(plates))
        return Sample(root / rel, np.asarray(boxes, np.float32).reshape(-1, 4),
                      np.asarray(classes, np.int64))

    samples = []
    plate_faces = faces_of(plates_dir.name)
    for rec in json.loads((plates_dir / "annotations.json").read_text()):
        plates = [b for b in rec["boxes"] if b[4] == "plate"]
        samples.append(make(plates_dir, rec["image"], plates, plate_faces.get(rec["image"], [])))
    for rel, faces in sorted(faces_of(faces_dir.name).items()):
        samples.append(make(faces_dir, rel, [], faces))
    train = [s for s in samples if not _in_dev(s.image_path.name, dev_fraction)]
    dev = [s for s in samples if _in_dev(s.image_path.name, dev_fraction)]
    return train, dev


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot decode {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit the long side to `size` and pad to (size, size), image centred.

    Returns (image (size, size, 3), scale, (pad_x, pad_y)); a box maps as box * scale + pad.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.full((size, size, 3), PAD_LEVEL, np.uint8)
    px, py = (size - nw) // 2, (size - nh) // 2
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out[py:py + nh, px:px + nw] = cv2.resize(image, (nw, nh), interpolation=interp)
    return out, scale, (px, py)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; defaults aim at 1080p dashcam frames seen at ~0.4-1.2x native."""

    crop_px: int = 384
    scale_min: float = 0.4
    scale_max: float = 1.2
    p_whole: float = 0.2  # whole photo letterboxed: context and small objects
    p_object_crop: float = 0.7  # crop placed around a random labelled box
    p_flip: float = 0.5
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (25, 75)
    p_motion_blur: float = 0.25
    p_night: float = 0.2
    p_colour: float = 0.8
    min_visible: float = 0.45  # keep a cropped box if this share of its area remains
    min_side_px: float = 3.0


def _crop_and_scale(image, boxes, rng, cfg: AugmentConfig):
    """Random scale in [scale_min, scale_max] of native, then a crop_px square crop (padded).

    Returns (crop (S, S, 3) uint8, boxes (N, 4) in crop px before visibility filtering).
    """
    s = cfg.crop_px
    h, w = image.shape[:2]
    if rng.random() < cfg.p_whole:
        out, scale, (px, py) = letterbox(image, s)
        return out, boxes * scale + np.array([px, py, px, py], np.float32)
    scale = float(np.exp(rng.uniform(np.log(cfg.scale_min), np.log(cfg.scale_max))))
    # Crop in source pixels, resize only the crop (cheap at any scale).
    src = s / scale
    if len(boxes) and rng.random() < cfg.p_object_crop:
        b = boxes[rng.integers(len(boxes))]
        cx = rng.uniform(b[2] - src * 0.9, b[0] + src * 0.9) if b[2] - b[0] < src else (b[0] + b[2]) / 2
        cy = rng.uniform(b[3] - src * 0.9, b[1] + src * 0.9) if b[3] - b[1] < src else (b[1] + b[3]) / 2
        # Keep the window inside the photo (or the photo inside the window): less padding.
        x0 = float(np.clip(cx - src / 2, min(0.0, w - src), max(0.0, w - src)))
        y0 = float(np.clip(cy - src / 2, min(0.0, h - src), max(0.0, h - src)))
    else:
        x0 = rng.uniform(min(0.0, w - src), max(0.0, w - src))
        y0 = rng.uniform(min(0.0, h - src), max(0.0, h - src))
    # Affine from source to crop: translate by -(x0, y0), scale; pixels outside get the pad grey.
    m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float32)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = cv2.warpAffine(image, m, (s, s), flags=interp, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(PAD_LEVEL,) * 3)
    return out, (boxes - np.array([x0, y0, x0, y0], np.float32)) * scale


def _keep_visible(boxes, classes, size, cfg: AugmentConfig):
    """Clip boxes to the crop; drop those mostly cut away or too thin to learn from."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = np.clip(boxes, 0, size)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (w >= cfg.min_side_px) & (h >= cfg.min_side_px) & (w * h >= cfg.min_visible * area)
    return clipped[keep].astype(np.float32), classes[keep]


def _motion_blur(image, rng):
    """Linear blur along a random direction: camera shake and fast passing cars."""
    k = int(rng.integers(3, 10)) | 1
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0 / k
    rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k))
    return cv2.filter2D(image, -1, kernel / max(kernel.sum(), 1e-6))


def _night(image, rng):
    """Dark exposure: gamma > 1 crushes shadows, then sensor noise that a dark frame amplifies."""
    x = (image.astype(np.float32) / 255.0) ** rng.uniform(1.5, 3.0)
    x = x * 255.0 + rng.normal(0, rng.uniform(2, 10), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _colour(image, rng):
    """Brightness/contrast/saturation jitter (white balance and exposure differ per camera)."""
    x = image.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.5, 1.4)
    x = (x - 128) * rng.uniform(0.7, 1.3) + 128 + rng.uniform(-30, 30)
    return np.clip(x, 0, 255).astype(np.uint8)


def _jpeg(image, rng, quality):
    """Re-encode at low quality: blocking and ringing similar to h264 dashcam streams."""
    q = int(rng.integers(quality[0], quality[1] + 1))
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else image


def augment(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometric then photometric augmentation of one RGB uint8 image.

    Returns (image (S, S, 3) uint8, boxes (M, 4) xyxy px in it, classes (M,)).
    Photometric steps never move pixels, so boxes stay valid after them.
    """
    out, boxes = _crop_and_scale(image, boxes, rng, cfg)
    boxes, classes = _keep_visible(boxes, classes, cfg.crop_px, cfg)
    if rng.random() < cfg.p_flip:
        out = out[:, ::-1].copy()
        boxes = np.stack([cfg.crop_px - boxes[:, 2], boxes[:, 1], cfg.crop_px - boxes[:, 0], boxes[:, 3]], 1)
    if rng.random() < cfg.p_colour:
        out = _colour(out, rng)
    if rng.random() < cfg.p_motion_blur:
        out = _motion_blur(out, rng)
    if rng.random() < cfg.p_night:
        out = _night(out, rng)
    if rng.random() < cfg.p_jpeg:
        out = _jpeg(out, rng, cfg.jpeg_quality)
    return out, boxes.reshape(-1, 4).astype(np.float32), classes


class TrainDataset(torch.utils.data.Dataset):
    """Augmented crops, keyed by (epoch, sample index): a fresh but reproducible crop of each photo per
    epoch. The epoch travels in the key, not in the dataset, because loader workers hold their own copy
    of the dataset for the whole run. Item: (image uint8 (3, S, S) RGB, targets (M, 5) [cls, x1, y1, x2, y2]).
    Images stay uint8 until the trainer's device: a quarter of the bytes through the loader's shared
    memory, pinning and the copy to a GPU."""

    def __init__(self, samples: list[Sample], cfg: AugmentConfig, seed: int = 0):
        self.samples, self.cfg, self.seed = samples, cfg, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        rng = np.random.default_rng((self.seed, epoch, i))
        s = self.samples[i]
        image, boxes, classes = augment(read_rgb(s.image_path), s.boxes_xyxy, s.classes, rng, self.cfg)
        targets = np.concatenate([classes[:, None].astype(np.float32), boxes], 1)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(targets)


def collate(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images (B, 3, S, S); targets (T, 6) [image_index, cls, x1, y1, x2, y2] px."""
    images = torch.stack([b[0] for b in batch])
    targets = [torch.cat([torch.full((len(t), 1), float(i)), t], 1) for i, (_, t) in enumerate(batch)]
    return images, torch.cat(targets) if targets else torch.zeros((0, 6))
