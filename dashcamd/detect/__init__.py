"""YOLOv5 face+plate detector: model, weights formats, inference, evaluation."""

from dashcamd.detect.arch import DEFAULT_ANCHORS_PX, Arch, yolov5_arch
from dashcamd.detect.checkpoint import load_checkpoint, load_model, save_checkpoint
from dashcamd.detect.errors import ArchitectureError, CheckpointError, DetectorError, UnsafeCheckpointError
from dashcamd.detect.infer import Detection, Detector
from dashcamd.detect.model import YoloV5, build_model, initialize_biases

__all__ = [
    "DEFAULT_ANCHORS_PX", "Arch", "ArchitectureError", "CheckpointError", "Detection", "Detector", "DetectorError",
    "UnsafeCheckpointError", "YoloV5", "build_model", "initialize_biases", "load_checkpoint", "load_model",
    "save_checkpoint", "yolov5_arch",
]
