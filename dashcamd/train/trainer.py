"""The training loop: batches, loss, optimiser step, EMA, dev eval, and resumable checkpoints.

A run directory holds last.pt (written every epoch and every `save_every_min` minutes, mid-epoch
included) and best.pt (best dev score, EMA weights). Both are written atomically (temp + rename)
so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import torch

from . import model_api
from .dataset import CLASS_NAMES, AugmentConfig, Sample, TrainDataset, collate
from .dev_eval import evaluate
from .loss import LossConfig, YoloV5Loss
from .optim import ModelEMA, lr_factor, make_optimizer, set_lr

log = logging.getLogger(__name__)
# EMA decay ramps up with its update count; weights that are already trained need no ramp.
EMA_UPDATES_WHEN_INITIALISED = 10_000


@dataclass
class TrainConfig:
    """Everything a run needs to be reproduced; stored in every checkpoint."""

    run_dir: str
    model_size: str = "n"
    epochs: int = 30
    batch_size: int = 8
    crop_px: int = 320
    optimizer: str = "adamw"
    lr: float = 0.002
    final_lr_factor: float = 0.05
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    eval_every_epochs: int = 2
    eval_size_px: int = 640
    save_every_min: float = 10.0
    workers: int = 0
    threads: int = 2
    seed: int = 0
    max_steps: int = 0  # stop after this many optimiser steps (smoke tests); 0 = no limit
    # "cpu" or "cuda"; on CUDA the forward pass runs under bf16 autocast (the loss stays fp32).
    device: str = "cpu"
    # > 0: after each epoch, set `epochs` to what fits in this many minutes from this process's start
    # (eval included), so a run on a lent machine ends its cosine schedule inside the lease.
    fit_minutes: float = 0.0
    # Start a new run from these dashcamd weights (e.g. the shipped ones) instead of random init: the way
    # to continue on a machine where the git-ignored run folder is gone. Optimiser state starts fresh.
    init_weights: str = ""
    augment: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)  # LossConfig overrides


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _EpochSampler(torch.utils.data.Sampler):
    """Dataset keys (epoch, index) in a per-epoch permutation from (seed, epoch), starting at sample
    `skip`: a mid-epoch resume replays exactly the samples not yet seen. One sampler serves the whole
    run (the loader's workers persist); `set_epoch` moves it on."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.keys: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int, skip: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        self.keys = [(epoch, i) for i in torch.randperm(self.n, generator=g)[skip:].tolist()]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def epochs_that_fit(done_here: int, seconds_here: float, budget_s: float, epoch_now: int) -> int:
    """Planned total epochs when `done_here` epochs took `seconds_here` and `budget_s` is the whole budget:
    the epochs done so far plus as many more as the mean pace allows (at least the current one)."""
    per_epoch = seconds_here / max(done_here, 1)
    return epoch_now + max(0, int((budget_s - seconds_here) / per_epoch))


def train(cfg: TrainConfig, train_samples: list[Sample], dev_samples: list[Sample], resume: bool) -> dict:
    """Train (or continue) the run in cfg.run_dir. Returns the dev metrics of the last epoch run
    (empty when stopped by max_steps).

    On resume the epoch count of `cfg` wins, so passing a larger --epochs extends a finished run;
    the cosine schedule is recomputed over the new total from the saved epoch progress.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels once
    started = time.monotonic()
    if cfg.workers:
        # OpenCV's thread pool does not survive a fork (pytorch/pytorch#45198, opencv/opencv#5150): when
        # workers were forked each epoch, after the dev eval had resized photos here, a run hung for good
        # after its first eval (a 16-core GPU machine; once in ~16 tries on 2 cores). Workers are now
        # forked once, before any eval; OpenCV stays single-threaded here all the same, so that the
        # workers (which inherit the setting) do not fight each other for the cores.
        cv2.setNumThreads(0)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"

    model = model_api.build(cfg.model_size).to(device)  # before the optimiser and EMA see its tensors
    strides, anchors_px = model_api.head_geometry(model)
    # the head's buffers: already on the device
    loss_fn = YoloV5Loss(strides, anchors_px, len(CLASS_NAMES), LossConfig(**cfg.loss))
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    ema = ModelEMA(model)
    # samples (not batches) seen in the current epoch, so a resume may change the batch size.
    state = {"epoch": 0, "samples_in_epoch": 0, "step": 0, "best_score": -1.0, "history": []}
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        ema.updates = ckpt["ema_updates"]
        optimizer.load_state_dict(ckpt["optimizer"])  # moves its state to the parameters' device
        state = ckpt["state"]
        log.info("resumed %s at epoch %d sample %d step %d", last_path, state["epoch"],
                 state["samples_in_epoch"], state["step"])
    elif cfg.init_weights:
        model_api.load_weights(model, Path(cfg.init_weights))
        ema = ModelEMA(model)
        ema.updates = EMA_UPDATES_WHEN_INITIALISED
        log.info("initialised from %s", cfg.init_weights)

    dataset = TrainDataset(train_samples, AugmentConfig(crop_px=cfg.crop_px, **cfg.augment), cfg.seed)

    def checkpoint(path: Path, **extra) -> None:
        _atomic_save({"config": asdict(cfg), "model": model.state_dict(), "ema": ema.model.state_dict(),
                      "ema_updates": ema.updates, "optimizer": optimizer.state_dict(),
                      "state": state, **extra}, path)

    last_save = time.monotonic()
    metrics: dict = {}
    first_epoch = state["epoch"]
    # Workers start once, here, before any dev eval, and live for the whole run: no start-up per epoch
    # (a GPU epoch takes seconds), and no fork after the eval has started threads in this process.
    sampler = _EpochSampler(len(dataset), cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
        drop_last=False, persistent_workers=cfg.workers > 0, pin_memory=on_cuda)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, skip=state["samples_in_epoch"])
        model.train()
        t_epoch, sums, n = time.monotonic(), torch.zeros(3, device=device), 0
        for images, targets in loader:
            images = images.to(device, non_blocking=True).float().div_(255)
            targets = targets.to(device, non_blocking=True)
            progress = epoch + state["samples_in_epoch"] / len(dataset)
            set_lr(optimizer, cfg.lr, lr_factor(progress, cfg.epochs, cfg.warmup_epochs, cfg.final_lr_factor),
                   max(0.0, 1 - progress / cfg.warmup_epochs) if cfg.warmup_epochs else 0.0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                preds = model(images)
            loss, parts = loss_fn([p.float() for p in preds], targets, cfg.crop_px)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # a rare huge gradient must not undo hours of CPU
            optimizer.step()
            ema.update(model)
            state["step"] += 1
            state["samples_in_epoch"] += len(images)
            sums += parts
            n += 1
            if state["step"] % 10 == 0:
                box, obj, cls = (sums / n).tolist()
                log.info("epoch %d sample %d/%d step %d lr %.5f box %.4f obj %.4f cls %.4f %.2fs/batch",
                         epoch, state["samples_in_epoch"], len(dataset), state["step"],
                         optimizer.param_groups[0]["lr"], box, obj, cls, (time.monotonic() - t_epoch) / n)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                checkpoint(last_path)
                return metrics
            if time.monotonic() - last_save > cfg.save_every_min * 60:
                checkpoint(last_path)
                last_save = time.monotonic()
        epoch_s = time.monotonic() - t_epoch
        state["epoch"], state["samples_in_epoch"] = epoch + 1, 0
        entry = {"epoch": epoch + 1, "step": state["step"], "epoch_s": round(epoch_s, 1),
                 "loss_box_obj_cls": [round(v, 5) for v in (sums / max(n, 1)).tolist()]}
        metrics = {}
        if cfg.fit_minutes > 0:
            cfg.epochs = epochs_that_fit(epoch + 1 - first_epoch, time.monotonic() - started,
                                         cfg.fit_minutes * 60, epoch + 1)
        if dev_samples and ((epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs):
            t_eval = time.monotonic()
            metrics = evaluate(model_api.predictor(ema.model), dev_samples, cfg.eval_size_px)
            entry.update(dev=metrics, eval_s=round(time.monotonic() - t_eval, 1))
        state["history"].append(entry)
        if metrics and metrics["score"] > state["best_score"]:
            state["best_score"] = metrics["score"]
            checkpoint(best_path, dev=metrics)
        log.info("epoch done %s", json.dumps(entry))
        checkpoint(last_path)
        last_save = time.monotonic()
    return metrics
