"""Turn a training checkpoint (last.pt / best.pt) into shipped weights: EMA weights, detector format, fp16."""

from __future__ import annotations

from pathlib import Path

import torch

from . import model_api


def export(checkpoint: Path, output: Path) -> dict:
    """Write the EMA model of `checkpoint` to `output`; returns the meta stored with it.

    The meta records how the weights were made (config, epochs, steps, dev metrics) so a weights file
    can always be traced back to its run.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg, state = ckpt["config"], ckpt["state"]
    model = model_api.build(cfg["model_size"])
    model.load_state_dict(ckpt["ema"])
    last_dev = next((h["dev"] for h in reversed(state["history"]) if "dev" in h), None)
    meta = {"source": str(checkpoint), "epochs_done": state["epoch"], "epochs_planned": cfg["epochs"],
            "steps": state["step"], "train_seconds": round(sum(h["epoch_s"] for h in state["history"]), 1),
            "dev": ckpt.get("dev", last_dev), "config": cfg}
    output.parent.mkdir(parents=True, exist_ok=True)
    model_api.save_shipped(model, output, meta)
    return meta
