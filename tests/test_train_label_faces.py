"""The teacher labelling script's CenterFace decoding and NMS, on hand-made output maps."""

import math

import numpy as np

from tests.helpers import load_script

label_faces = load_script("tools/label_faces.py")


class _FakeCenterFace:
    """Returns one heatmap peak at map cell (y=8, x=10) for a 40 px wide, 48 px high face."""

    def __init__(self):
        self.input_shape = None

    def run(self, _outputs, feeds):
        blob = feeds["input.1"]
        self.input_shape = blob.shape
        h, w = blob.shape[2] // 4, blob.shape[3] // 4
        heat = np.zeros((1, 1, h, w), np.float32)
        scale = np.zeros((1, 2, h, w), np.float32)
        offset = np.zeros((1, 2, h, w), np.float32)
        heat[0, 0, 8, 10], heat[0, 0, 8, 11] = 0.9, 0.4  # a weaker duplicate next to the peak
        scale[0, :, 8, 10] = [math.log(48 / 4), math.log(40 / 4)]  # (h, w)
        scale[0, :, 8, 11] = [math.log(48 / 4), math.log(40 / 4)]
        offset[0, :, 8, 10] = [0.25, 0.5]  # (dy, dx) in map cells
        return heat, scale, offset, np.zeros((1, 10, h, w), np.float32)


def test_decode_pads_to_32_and_maps_peaks_to_pixel_boxes():
    fake = _FakeCenterFace()
    dets = label_faces.detect_faces(fake, np.zeros((100, 150, 3), np.uint8), low_thresh=0.3, nms_iou=0.3)
    assert fake.input_shape == (1, 3, 128, 160)
    assert dets.shape == (1, 5)  # the 0.4 neighbour overlaps the peak and is suppressed
    cx, cy = (10 + 0.5 + 0.5) * 4, (8 + 0.25 + 0.5) * 4
    np.testing.assert_allclose(dets[0], [cx - 20, cy - 24, cx + 20, cy + 24, 0.9], atol=1e-4)


def test_low_threshold_drops_everything_below_it():
    dets = label_faces.detect_faces(_FakeCenterFace(), np.zeros((64, 64, 3), np.uint8), low_thresh=0.95,
                                    nms_iou=0.3)
    assert dets.shape == (0, 5)


def test_nms_keeps_best_of_overlapping_and_all_disjoint():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keep = label_faces.nms_numpy(boxes, np.array([0.5, 0.9, 0.7]), 0.3)
    assert keep.tolist() == [1, 2]
