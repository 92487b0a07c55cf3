"""Runtime detection: letterbox on the device, the model, per-class thresholds, class-aware NMS, unletterbox.

Boxes are xyxy floats. "Model px" are pixels of the letterboxed model input, "frame px" of the original
frame. Frames are RGB uint8 (H, W, 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
import torch.nn.functional as F

from dashcamd.boxes import Detection
from dashcamd.detect.checkpoint import load_model
from dashcamd.detect.errors import DetectorError

log = structlog.get_logger(__name__)

DEFAULT_THRESHOLD = 0.25  # for classes the thresholds mapping does not name
PAD_LEVEL = 114  # YOLOv5's letterbox grey (8-bit), the value the detector was trained with
PAD_VALUE = PAD_LEVEL / 255
STRIDE_PX = 32  # largest model stride: input sides must be multiples of it
MAX_NMS_CANDIDATES = 3000  # highest-scoring (box, class) pairs kept for NMS, bounds its O(n^2) memory
MAX_DETECTIONS = 300  # per frame


@dataclass(frozen=True)
class LetterboxGeometry:
    """How a frame of ``frame_h`` x ``frame_w`` maps into the model input of ``input_h`` x ``input_w``.

    The frame is resized to ``resized_h`` x ``resized_w`` (aspect kept) and placed at
    (``pad_left``, ``pad_top``); the rest is grey.
    """

    frame_h: int
    frame_w: int
    resized_h: int
    resized_w: int
    input_h: int
    input_w: int
    pad_top: int
    pad_left: int

    @property
    def scale_x(self) -> float:
        return self.resized_w / self.frame_w

    @property
    def scale_y(self) -> float:
        return self.resized_h / self.frame_h


def letterbox_geometry(frame_h: int, frame_w: int, inference_size: int,
                       input_hw: tuple[int, int] | None = None) -> LetterboxGeometry:
    """Long side to ``inference_size``; pad each side to the next multiple of 32 ("rect" as in YOLOv5
    detect.py), or, for a fixed-size model (ONNX), fit into ``input_hw`` = (height, width) and pad to it.
    Padding is split evenly between both sides.
    """
    if input_hw is None:
        scale = inference_size / max(frame_h, frame_w)
    else:
        scale = min(input_hw[0] / frame_h, input_hw[1] / frame_w)
    resized_h = max(1, round(frame_h * scale))
    resized_w = max(1, round(frame_w * scale))
    if input_hw is None:
        input_h = math.ceil(resized_h / STRIDE_PX) * STRIDE_PX
        input_w = math.ceil(resized_w / STRIDE_PX) * STRIDE_PX
    else:
        input_h, input_w = input_hw
    return LetterboxGeometry(frame_h, frame_w, resized_h, resized_w, input_h, input_w,
                             pad_top=(input_h - resized_h) // 2, pad_left=(input_w - resized_w) // 2)


def letterbox(frames_rgb: torch.Tensor, geometry: LetterboxGeometry, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB frames, on any device -> ``dtype`` (B, 3, input_h, input_w) in [0, 1].

    Frames at the geometry's frame size get a bilinear resize, antialiased when shrinking (so small
    faces and plate glyphs do not alias away); frames already at its resized size are only padded.
    """
    size = (geometry.resized_h, geometry.resized_w)
    x = frames_rgb.permute(0, 3, 1, 2)
    if size != tuple(x.shape[2:]):
        shrinking = geometry.resized_h < x.shape[2]
        x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                          antialias=shrinking).clamp_(0, 255)
    # 0..255 into the padded tensor, then one scaling pass: pre-shrunk frames (the decoder's scaler) need
    # no float copy of their own (~0.5 ms less a 640x384 frame on the 2-core CPU, the same values).
    out = torch.full((x.shape[0], 3, geometry.input_h, geometry.input_w), float(PAD_LEVEL), device=x.device)
    out[:, :, geometry.pad_top:geometry.pad_top + size[0], geometry.pad_left:geometry.pad_left + size[1]] = x
    out.div_(255)
    out = out.to(dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def letterbox_pixels(frames_rgb: Sequence[np.ndarray], geometry: LetterboxGeometry) -> np.ndarray:
    """uint8 (resized_h, resized_w, 3) RGB frames, already shrunk (the decoder's scaler) -> uint8 (B, input_h,
    input_w, 3), the frames in the grey frame: the int8 model's input (``OnnxRuntimeModel.forward_pixels``)."""
    out = np.full((len(frames_rgb), geometry.input_h, geometry.input_w, 3), PAD_LEVEL, np.uint8)
    rows = slice(geometry.pad_top, geometry.pad_top + geometry.resized_h)
    columns = slice(geometry.pad_left, geometry.pad_left + geometry.resized_w)
    for slot, frame in zip(out, frames_rgb):
        slot[rows, columns] = frame
    return out


def unletterbox_boxes(boxes_xyxy: torch.Tensor, geometry: LetterboxGeometry) -> torch.Tensor:
    """float (N, 4) model-px boxes -> frame-px boxes, clipped to the frame."""
    offset = boxes_xyxy.new_tensor([geometry.pad_left, geometry.pad_top] * 2)
    scale = boxes_xyxy.new_tensor([geometry.scale_x, geometry.scale_y] * 2)
    boxes = (boxes_xyxy - offset) / scale
    limit = boxes_xyxy.new_tensor([geometry.frame_w, geometry.frame_h] * 2)
    return torch.minimum(boxes.clamp(min=0), limit)


def box_iou(a_xyxy: torch.Tensor, b_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU, float (N, 4) x (M, 4) -> (N, M); empty boxes have IoU 0 with everything."""
    area_a = (a_xyxy[:, 2] - a_xyxy[:, 0]).clamp(min=0) * (a_xyxy[:, 3] - a_xyxy[:, 1]).clamp(min=0)
    area_b = (b_xyxy[:, 2] - b_xyxy[:, 0]).clamp(min=0) * (b_xyxy[:, 3] - b_xyxy[:, 1]).clamp(min=0)
    top_left = torch.maximum(a_xyxy[:, None, :2], b_xyxy[None, :, :2])
    bottom_right = torch.minimum(a_xyxy[:, None, 2:], b_xyxy[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-aware greedy NMS: indices (K,) int64 of kept boxes, highest score first.

    boxes_xyxy float (N, 4), scores float (N,), classes int (N,). A box is dropped when a higher-scoring
    box of the same class overlaps it with IoU > iou_threshold. Classes are kept apart by shifting each
    class's boxes beyond all others (the offset trick), so one IoU matrix serves all classes.
    """
    if boxes_xyxy.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes_xyxy.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes_xyxy[order].float()
    span = (boxes.max() - boxes.min()).abs() + 1
    boxes = boxes + (classes[order].to(boxes.dtype) * span)[:, None]
    overlaps = (box_iou(boxes, boxes) > iou_threshold).triu_(diagonal=1).cpu().numpy()
    # The greedy pass is inherently sequential: a numpy walk over a CPU copy of the overlap matrix.
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.int64, device=order.device)]


def xywh_to_xyxy(boxes_xywh: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> x1, y1, x2, y2."""
    centre, half = boxes_xywh[..., :2], boxes_xywh[..., 2:] / 2
    return torch.cat((centre - half, centre + half), dim=-1)


def postprocess(pred: torch.Tensor, class_thresholds: torch.Tensor, iou_threshold: float,
                max_detections: int = MAX_DETECTIONS) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decoded model output -> per image (boxes_xyxy float (K, 4) model px, scores (K,), classes int64 (K,)).

    pred: float (B, N, 5+nc) as ``YoloV5.forward`` returns in eval mode. Score = objectness x class
    score; every (box, class) pair at or above that class's threshold (float (nc,)) is a candidate, so
    a box that is both plausibly a face and a plate is kept as both (recall matters more than
    duplicates when anonymising).
    """
    results = []
    for image_pred in pred.float():
        class_scores = image_pred[:, 5:] * image_pred[:, 4:5]
        box_index, class_index = (class_scores >= class_thresholds.to(class_scores.device)).nonzero(as_tuple=True)
        scores = class_scores[box_index, class_index]
        if scores.numel() > MAX_NMS_CANDIDATES:
            top = scores.topk(MAX_NMS_CANDIDATES).indices
            box_index, class_index, scores = box_index[top], class_index[top], scores[top]
        boxes = xywh_to_xyxy(image_pred[box_index, :4])
        keep = nms(boxes, scores, class_index, iou_threshold)[:max_detections]
        results.append((boxes[keep], scores[keep], class_index[keep]))
    return results


def resolve_device(requested: str) -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit device must be usable. Logs the choice and why."""
    if requested == "auto":
        if torch.cuda.is_available():
            device, reason = torch.device("cuda"), "auto: cuda available"
        elif torch.backends.mps.is_available():
            device, reason = torch.device("mps"), "auto: mps available, no cuda"
        else:
            device, reason = torch.device("cpu"), "auto: neither cuda nor mps available"
    else:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise DetectorError(f"unknown device {requested!r}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DetectorError(f"device {requested!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DetectorError(f"device {requested!r} requested but MPS is not available")
        reason = "requested"
    log.info("detector_device", device=str(device), reason=reason)
    return device


def choose_precision(requested: str, device: torch.device, runtime: str = "torch", int8_ready: bool = False) -> str:
    """"auto": fp16 on CUDA; on the CPU int8 where onnxruntime runs weights that have measured int8 ranges
    (``int8_ready``, see ``dashcamd.detect.quantize``), else fp32. bf16 must be asked for (CPU, torch): it is
    about twice as fast on CPUs with native bf16 (AVX512-BF16, AMX) but moves scores slightly; see README
    for the recall of both."""
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        return "int8" if runtime == "onnxruntime" and int8_ready else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise DetectorError("precision fp16 needs a CUDA device")
    if requested == "bf16" and device.type != "cpu":
        raise DetectorError("precision bf16 is for the CPU (use fp16 on CUDA)")
    if requested == "int8" and runtime != "onnxruntime":
        raise DetectorError("precision int8 runs on onnxruntime on the CPU (runtime auto or onnxruntime)")
    if requested == "int8" and not int8_ready:
        raise DetectorError("precision int8 needs int8 ranges measured for these weights "
                            "(python -m dashcamd.train calibrate WEIGHTS)")
    if requested not in ("fp32", "fp16", "bf16", "int8"):
        raise DetectorError(f"unknown precision {requested!r}")
    if runtime == "onnxruntime" and requested not in ("fp32", "int8"):
        raise DetectorError(f"precision {requested} runs on torch, not onnxruntime")
    return requested


def choose_runtime(requested: str, device: torch.device, precision: str) -> str:
    """"auto": onnxruntime on the CPU when the ``onnx`` extra is installed and no bf16 was asked for
    (about twice torch's fp32 speed there, same numbers; int8 only runs there), torch everywhere else.
    Logs the choice."""
    from dashcamd.detect.onnx_backend import onnxruntime_available

    if requested == "auto":
        if device.type == "cpu" and precision in ("auto", "fp32", "int8") and onnxruntime_available():
            runtime, reason = "onnxruntime", "auto: cpu and onnxruntime installed"
        else:
            runtime, reason = "torch", "auto: " + ("not the cpu" if device.type != "cpu" else
                                                   f"precision {precision}" if precision not in ("auto", "fp32")
                                                   else "onnxruntime not installed")
    elif requested == "onnxruntime":
        if device.type != "cpu":
            raise DetectorError("runtime onnxruntime runs on the cpu; use torch for cuda/mps")
        if not onnxruntime_available():
            raise DetectorError("runtime onnxruntime needs the onnx extra: pip install 'dashcamd[onnx]'")
        runtime, reason = "onnxruntime", "requested"
    elif requested == "torch":
        runtime, reason = "torch", "requested"
    else:
        raise DetectorError(f"unknown runtime {requested!r}")
    log.info("detector_runtime", runtime=runtime, reason=reason)
    return runtime


class Detector:
    """Faces and plates in batches of frames. The one object the worker keeps for the process lifetime."""

    def __init__(self, weights: Path, device: str = "auto", thresholds: Mapping[str, float] | None = None,
                 inference_size: int = 640, batch_size: int = 4, iou_threshold: float = 0.45,
                 precision: str = "auto", runtime: str = "auto") -> None:
        """``weights``: any format ``load_model`` reads; ``.onnx`` runs on onnxruntime's CPU provider.

        ``thresholds``: minimum score per class name; classes not named use DEFAULT_THRESHOLD.
        ``precision``: "auto" (see ``choose_precision``), "fp32", "fp16" (CUDA) or "bf16" (CPU autocast).
        ``runtime``: "torch", "onnxruntime" (CPU, needs the ``onnx`` extra) or "auto" (see ``choose_runtime``).
        """
        if inference_size < STRIDE_PX or batch_size < 1:
            raise DetectorError(f"need inference_size >= {STRIDE_PX} and batch_size >= 1")
        model = load_model(weights)
        self._input_hw: tuple[int, int] | None = getattr(model, "input_hw", None)
        if self._input_hw is not None and device != "cpu":
            log.info("detector_device", device="cpu", reason="onnx weights run on onnxruntime's CPU provider")
            self.device = torch.device("cpu")
        else:
            self.device = resolve_device(device)
        self.names: list[str] = list(model.names)
        unknown = set(thresholds or {}) - set(self.names)
        if unknown:
            raise DetectorError(f"thresholds name unknown classes {sorted(unknown)}; the model has {self.names}")
        self._class_thresholds = torch.tensor(
            [(thresholds or {}).get(name, DEFAULT_THRESHOLD) for name in self.names], device=self.device)
        self.inference_size = inference_size
        self.batch_size = batch_size
        self.iou_threshold = iou_threshold
        self.runtime = "onnxruntime" if self._input_hw is not None else choose_runtime(runtime, self.device,
                                                                                         precision)
        int8_ranges = None
        if self.runtime == "onnxruntime" and self._input_hw is None and precision in ("auto", "int8"):
            from dashcamd.detect.quantize import load_ranges

            int8_ranges = load_ranges(Path(weights))
        self.precision = choose_precision(precision, self.device, self.runtime, int8_ready=int8_ranges is not None)
        if self.runtime == "onnxruntime" and self._input_hw is None:
            from dashcamd.detect.onnx_backend import OnnxRuntimeModel

            if self.precision == "int8":
                model, self.precision = self._int8_model(model, int8_ranges, weights, explicit=precision == "int8")
            else:
                model = OnnxRuntimeModel(model)
        # fp16 weights on CUDA; bf16 on CPU runs fp32 weights under autocast (convs in bf16).
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._channels_last = self.precision in ("fp16", "bf16")
        if self.runtime == "torch":
            model = model.to(self.device, dtype=self._dtype)
            if self._channels_last:
                model = model.to(memory_format=torch.channels_last)
        self._model = model
        log.info("detector_loaded", weights=str(weights), names=self.names, inference_size=inference_size,
                 precision=self.precision, runtime=self.runtime)

    def _int8_model(self, model, int8_ranges, weights: Path, explicit: bool) -> tuple[torch.nn.Module, str]:
        """(model, precision): the int8 onnxruntime model, with the usual dashcam shape (16:9) quantized now,
        so ranges that do not fit the export (a torch whose exporter names tensors differently) show at
        start-up, not on every clip. Then asked-for int8 is an error; "auto" logs why and runs fp32."""
        from dashcamd.detect.onnx_backend import OnnxRuntimeModel

        int8 = OnnxRuntimeModel(model, int8_ranges=int8_ranges)
        usual = letterbox_geometry(1080, 1920, self.inference_size)
        try:
            int8.prepare((usual.input_h, usual.input_w))
            return int8, "int8"
        except Exception as e:  # onnxruntime's quantizer raises untyped errors
            if explicit:
                raise DetectorError(f"int8 ranges of {weights} do not fit this model's export: {e}") from e
            log.warning("detector_int8_unavailable", weights=str(weights), error=str(e), running="fp32")
            return OnnxRuntimeModel(model), "fp32"

    def resized_size(self, frame_h: int, frame_w: int) -> tuple[int, int]:
        """(height, width) a frame of this size is shrunk to inside the letterbox: the size to hand
        ``detect`` pre-shrunk frames at (``source_hw``), e.g. from the video decoder's scaler."""
        geometry = letterbox_geometry(frame_h, frame_w, self.inference_size, self._input_hw)
        return geometry.resized_h, geometry.resized_w

    def detect(self, frames_rgb: Sequence[np.ndarray],
               source_hw: tuple[int, int] | None = None) -> list[list[Detection]]:
        """Detections per frame, in input order, in frame pixels. Frames: uint8 (H, W, 3) RGB, any count,
        any mix of sizes (frames of one size are batched together, ``batch_size`` at a time).

        ``source_hw``: the frames were already shrunk to ``resized_size(*source_hw)``; boxes come back in
        pixels of the (height, width) = ``source_hw`` original.
        """
        expected = self.resized_size(*source_hw) if source_hw is not None else None
        for frame in frames_rgb:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"expected uint8 (H, W, 3) RGB frames, got {frame.dtype} {frame.shape}")
            if expected is not None and frame.shape[:2] != expected:
                raise ValueError(f"frames of a {source_hw} source must be shrunk to {expected}, got {frame.shape[:2]}")
        results: list[list[Detection]] = []
        start = 0
        while start < len(frames_rgb):
            end = start + 1
            while (end < len(frames_rgb) and end - start < self.batch_size
                   and frames_rgb[end].shape == frames_rgb[start].shape):
                end += 1
            results.extend(self._detect_batch(frames_rgb[start:end], source_hw))
            start = end
        return results

    def _detect_batch(self, frames_rgb: Sequence[np.ndarray],
                      source_hw: tuple[int, int] | None) -> list[list[Detection]]:
        frame_h, frame_w = source_hw or frames_rgb[0].shape[:2]
        geometry = letterbox_geometry(frame_h, frame_w, self.inference_size, self._input_hw)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch.inference_mode(), autocast:
            shrunk = frames_rgb[0].shape[:2] == (geometry.resized_h, geometry.resized_w)
            if shrunk and getattr(self._model, "takes_pixels", False):  # int8 on onnxruntime: no float input
                pred = self._model.forward_pixels(letterbox_pixels(frames_rgb, geometry))
            else:
                batch = torch.from_numpy(np.stack(frames_rgb)).to(self.device, non_blocking=True)
                pred = self._model(letterbox(batch, geometry, self._dtype, channels_last=self._channels_last))
            per_frame = postprocess(pred, self._class_thresholds, self.iou_threshold)
            out = []
            for boxes, scores, classes in per_frame:
                boxes = unletterbox_boxes(boxes, geometry)
                inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not wholly in the padding
                out.append([Detection(*box, self.names[cls], score) for box, score, cls in zip(
                    boxes[inside].cpu().tolist(), scores[inside].cpu().tolist(), classes[inside].cpu().tolist())])
        return out
