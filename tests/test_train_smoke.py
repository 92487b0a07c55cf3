"""End to end on 4 tiny generated photos: train 2 steps, checkpoint, resume, finish an epoch, export."""

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from dashcamd.detect import load_model
from dashcamd.train import main
from dashcamd.train.dataset import load_samples


def _tiny_sets(root: Path) -> list[str]:
    """2 plate photos (grey rectangles on noise) + 2 face photos, with their teacher label cache."""
    rng = np.random.default_rng(0)
    plates, faces, labels = root / "plates_openimages", root / "faces_unlabelled", root / "labels"
    for d in (plates / "images", faces / "images", labels):
        d.mkdir(parents=True)
    ann, face_labels = [], {}
    for i in range(2):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        image[40:52, 30:70] = 230
        cv2.imwrite(str(plates / "images" / f"p{i}.png"), image)
        ann.append({"image": f"images/p{i}.png", "width": 128, "height": 96, "boxes": [[30, 40, 70, 52, "plate"]]})
        image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        cv2.circle(image, (48, 48), 18, (200, 160, 140), -1)
        cv2.imwrite(str(faces / "images" / f"f{i}.png"), image)
        face_labels[f"images/f{i}.png"] = [[30, 30, 66, 66, 0.9]]
    (plates / "annotations.json").write_text(json.dumps(ann))
    (labels / "plates_openimages.json").write_text("{}")
    (labels / "faces_unlabelled.json").write_text(json.dumps(face_labels))
    return ["--plates-dir", str(plates), "--faces-dir", str(faces), "--labels-dir", str(labels)]


def test_two_steps_checkpoint_resume_and_export(tmp_path):
    data = _tiny_sets(tmp_path)
    run = tmp_path / "run"
    common = ["fit", "--run-dir", str(run), *data, "--batch-size", "2", "--crop-px", "64", "--threads", "1",
              "--epochs", "2", "--dev-fraction", "0.5", "--eval-size-px", "96"]
    train, dev = load_samples(*(Path(p) for p in data[1::2]), face_min_score=0.5, dev_fraction=0.5)
    assert train and dev
    steps_per_epoch = math.ceil(len(train) / 2)

    assert main([*common, "--max-steps", "2"]) == 0
    first = torch.load(run / "last.pt", weights_only=False)
    assert first["state"]["step"] == 2 and first["ema_updates"] == 2

    # Resume runs the remaining steps to the end of epoch 2, evaluating on dev after each epoch.
    assert main([*common, "--resume"]) == 0
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["state"]["step"] == 2 * steps_per_epoch and last["state"]["epoch"] == 2
    assert [h["epoch"] for h in last["state"]["history"]] == [1, 2]
    assert "score" in last["state"]["history"][-1]["dev"]
    assert (run / "best.pt").exists()
    assert not list(run.glob("*.tmp"))

    shipped = tmp_path / "w.pt"
    assert main(["export", str(run / "best.pt"), str(shipped)]) == 0
    model = load_model(shipped)
    assert model.names == ["plate", "face"]
    out = model(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 7)
    raw = torch.load(shipped, weights_only=True)
    assert raw["state_dict"]["model.0.conv.weight"].dtype == torch.float16
    assert raw["meta"]["epochs_done"] >= 1

    # A new run initialised from the exported weights starts from them, not from random init.
    second = tmp_path / "run2"
    init_common = [*common[:2], str(second), *common[3:]]
    assert main([*init_common, "--init", str(shipped), "--max-steps", "1"]) == 0
    started = torch.load(second / "last.pt", weights_only=False)
    assert started["state"]["step"] == 1 and started["ema_updates"] == 10_001
    assert torch.allclose(started["ema"]["model.0.conv.weight"].half().float(),
                          raw["state_dict"]["model.0.conv.weight"].float(), atol=1e-2)


def _fit_tiny_run(tmp_path: Path, *args: str) -> dict:
    """`fit` on the tiny sets on the CPU with ``args`` added; returns the run's last checkpoint."""
    run = tmp_path / "run"
    assert main(["fit", "--run-dir", str(run), *_tiny_sets(tmp_path), "--batch-size", "2", "--crop-px", "64",
                 "--threads", "1", "--dev-fraction", "0.5", "--eval-size-px", "96", "--device", "cpu", *args]) == 0
    return torch.load(run / "last.pt", weights_only=False)


def test_fit_minutes_ends_the_run_inside_its_budget(tmp_path):
    """A budget far shorter than one epoch: the planned 50 epochs shrink to the one already run,
    which is then evaluated and saved as the final epoch."""
    last = _fit_tiny_run(tmp_path, "--epochs", "50", "--fit-minutes", "0.0001")
    assert last["state"]["epoch"] == 1 and last["config"]["epochs"] == 1
    assert "dev" in last["state"]["history"][-1]


def test_loss_overrides_reach_the_loss_and_the_checkpoint(tmp_path):
    """--loss sets LossConfig's gains: with the box and class gains at 0 only objectness is learned."""
    last = _fit_tiny_run(tmp_path, "--epochs", "1", "--loss", '{"box_gain": 0, "cls_gain": 0}')
    box, obj, cls = last["state"]["history"][-1]["loss_box_obj_cls"]
    assert box == 0 and cls == 0 and obj > 0
    assert last["config"]["loss"] == {"box_gain": 0, "cls_gain": 0}


def test_a_run_with_loader_workers_and_an_eval_every_epoch_completes(tmp_path):
    """The path a GPU machine uses: forked loader workers, re-created each epoch after a dev eval that
    resizes full-size photos in the trainer. It once hung there (OpenCV's thread pool after fork, which
    the trainer now switches off); the hang was intermittent, so this runs three epochs in a subprocess
    with a timeout, so that a hang fails the test instead of stalling the suite."""
    rng = np.random.default_rng(1)
    plates, faces, labels = tmp_path / "plates_openimages", tmp_path / "faces_unlabelled", tmp_path / "labels"
    for d in (plates / "images", faces / "images", labels):
        d.mkdir(parents=True)
    ann = []
    for i in range(4):
        image = rng.integers(0, 255, (720, 960, 3), dtype=np.uint8)
        image[300:340, 400:520] = 230
        cv2.imwrite(str(plates / "images" / f"p{i}.jpg"), image)
        ann.append({"image": f"images/p{i}.jpg", "width": 960, "height": 720, "boxes": [[400, 300, 520, 340, "plate"]]})
    (plates / "annotations.json").write_text(json.dumps(ann))
    (labels / "plates_openimages.json").write_text("{}")
    (labels / "faces_unlabelled.json").write_text("{}")
    command = [sys.executable, "-m", "dashcamd.train", "fit", "--run-dir", str(tmp_path / "run"),
               "--plates-dir", str(plates), "--faces-dir", str(faces), "--labels-dir", str(labels),
               "--batch-size", "2", "--crop-px", "64", "--threads", "2", "--workers", "2", "--device", "cpu",
               "--epochs", "3", "--eval-every-epochs", "1", "--dev-fraction", "0.5", "--eval-size-px", "640"]
    subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert last["state"]["epoch"] == 3 and all("dev" in h for h in last["state"]["history"])
