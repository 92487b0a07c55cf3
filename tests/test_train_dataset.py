"""Training data: label merging, the stable dev split, and augmentations that keep boxes on their pixels."""

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dashcamd.train.dataset import FACE, PLATE, AugmentConfig, TrainDataset, augment, collate, load_samples

GEOMETRY_ONLY = AugmentConfig(crop_px=128, p_jpeg=0, p_motion_blur=0, p_night=0, p_colour=0)


def _white_boxes_image(boxes, h=240, w=320):
    image = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = 255
    return image


@pytest.mark.parametrize("seed", range(12))
def test_geometric_augmentation_keeps_boxes_on_the_white_rectangles(seed):
    boxes = np.array([[40, 60, 100, 90], [200, 150, 260, 210]], np.float32)
    image = _white_boxes_image(boxes.astype(int))
    cfg = replace(GEOMETRY_ONLY, p_whole=0.3, min_visible=0.99)  # only whole boxes: easy to check
    out, out_boxes, classes = augment(image, boxes, np.array([PLATE, FACE]), np.random.default_rng(seed), cfg)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert len(out_boxes) == len(classes)
    white = out[..., 0] > 200
    for x1, y1, x2, y2 in out_boxes:
        inner = white[int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
        assert inner.size and inner.mean() > 0.95


def test_whole_image_letterbox_keeps_every_box():
    boxes = np.array([[40, 60, 100, 90], [200, 150, 260, 210]], np.float32)
    image = _white_boxes_image(boxes.astype(int))
    cfg = replace(GEOMETRY_ONLY, p_whole=1.0, p_flip=0.0)
    _, out_boxes, classes = augment(image, boxes, np.array([PLATE, FACE]), np.random.default_rng(0), cfg)
    scale, pad_y = 128 / 320, (128 - 96) // 2
    np.testing.assert_allclose(out_boxes, boxes * scale + [0, pad_y, 0, pad_y], atol=0.5)
    assert classes.tolist() == [PLATE, FACE]


def test_photometric_steps_do_not_move_boxes():
    boxes = np.array([[40, 60, 100, 90]], np.float32)
    image = _white_boxes_image(boxes.astype(int))
    full = AugmentConfig(crop_px=128, p_jpeg=1, p_motion_blur=1, p_night=1, p_colour=1, p_flip=0, p_whole=1)
    geometric = replace(full, p_jpeg=0, p_motion_blur=0, p_night=0, p_colour=0)
    _, b_full, _ = augment(image, boxes, np.array([PLATE]), np.random.default_rng(3), full)
    _, b_geo, _ = augment(image, boxes, np.array([PLATE]), np.random.default_rng(3), geometric)
    np.testing.assert_allclose(b_full, b_geo)


def test_flip_mirrors_boxes():
    boxes = np.array([[10, 10, 30, 20]], np.float32)
    image = _white_boxes_image(boxes.astype(int), 128, 128)
    cfg = replace(GEOMETRY_ONLY, p_whole=1.0, p_flip=1.0)
    _, out_boxes, _ = augment(image, boxes, np.array([PLATE]), np.random.default_rng(0), cfg)
    np.testing.assert_allclose(out_boxes, [[98, 10, 118, 20]], atol=0.5)


def _write_sets(tmp_path: Path, n_plates=20, n_faces=10):
    plates, faces, labels = tmp_path / "plates_openimages", tmp_path / "faces_unlabelled", tmp_path / "labels"
    for d in (plates / "images", faces / "images", labels):
        d.mkdir(parents=True)
    ann, plate_faces, face_labels = [], {}, {}
    for i in range(n_plates):
        cv2.imwrite(str(plates / "images" / f"p{i}.jpg"), np.zeros((64, 96, 3), np.uint8))
        ann.append({"image": f"images/p{i}.jpg", "width": 96, "height": 64, "boxes": [[5, 5, 25, 12, "plate"]]})
        plate_faces[f"images/p{i}.jpg"] = [[40, 10, 60, 35, 0.9], [70, 10, 80, 20, 0.2]]
    for i in range(n_faces):
        cv2.imwrite(str(faces / "images" / f"f{i}.jpg"), np.zeros((64, 64, 3), np.uint8))
        face_labels[f"images/f{i}.jpg"] = [[10, 10, 30, 30, 0.6]]
    (plates / "annotations.json").write_text(json.dumps(ann))
    (labels / "plates_openimages.json").write_text(json.dumps(plate_faces))
    (labels / "faces_unlabelled.json").write_text(json.dumps(face_labels))
    return plates, faces, labels


def test_load_samples_merges_teacher_faces_above_threshold_and_splits_stably(tmp_path):
    plates, faces, labels = _write_sets(tmp_path)
    train, dev = load_samples(plates, faces, labels, face_min_score=0.5, dev_fraction=0.3)
    assert len(train) + len(dev) == 30 and dev
    by_name = {s.image_path.name: s for s in train + dev}
    assert by_name["p0.jpg"].classes.tolist() == [PLATE, FACE]  # the 0.2 teacher box is dropped
    assert by_name["f0.jpg"].classes.tolist() == [FACE]
    train2, dev2 = load_samples(plates, faces, labels, face_min_score=0.5, dev_fraction=0.3)
    assert [s.image_path for s in dev2] == [s.image_path for s in dev]


def test_dataset_items_and_collate(tmp_path):
    plates, faces, labels = _write_sets(tmp_path, 4, 2)
    train, dev = load_samples(plates, faces, labels, 0.5, 0.0)
    ds = TrainDataset(train, AugmentConfig(crop_px=64))
    images, targets = collate([ds[(0, 0)], ds[(0, 1)], ds[(0, 4)]])
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8
    assert targets.shape[1] == 6 and set(targets[:, 0].tolist()) <= {0.0, 1.0, 2.0}
    first = ds[(0, 0)][0]
    assert not np.array_equal(ds[(1, 0)][0].numpy(), first.numpy())  # another epoch: another crop
    assert np.array_equal(ds[(0, 0)][0].numpy(), first.numpy())  # same (seed, epoch, index): same sample
