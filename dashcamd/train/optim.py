"""Optimiser parameter groups, the warm-up + cosine learning-rate schedule, and the weight EMA.

The schedule is a pure function of (epoch progress, planned epochs) so a resumed or extended run
recomputes it from the saved counters; nothing else about it needs saving.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.937, Nesterov) or AdamW with three groups: decayed weights, BN weights, biases.

    Decay on BatchNorm scales and biases only shrinks them towards a worse optimum, so they get none.
    """
    decay, no_decay, biases = [], [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if pname == "bias":
                biases.append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "kind": "weight"},
              {"params": no_decay, "weight_decay": 0.0, "kind": "bn"},
              {"params": biases, "weight_decay": 0.0, "kind": "bias"}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.937, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.937, 0.999))
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(progress_epochs: float, total_epochs: float, warmup_epochs: float, final_factor: float) -> float:
    """Multiplier of the base LR at a (fractional) epoch: cosine from 1 to final_factor over
    total_epochs, times a linear warm-up ramp over warmup_epochs (large early updates on random
    weights diverge). Measured in epochs, not steps, so a resume may change the batch size."""
    t = min(progress_epochs, total_epochs) / max(total_epochs, 1e-9)
    cosine = final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return cosine * min(1.0, max(progress_epochs, 1e-3) / max(warmup_epochs, 1e-9))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float, warmup_left: float) -> None:
    """Apply the factor. While warm-up lasts (warmup_left in (0, 1] = share of it still to go) SGD
    biases start high (0.1) and fall to the schedule, as YOLOv5 does, because the objectness bias
    must move fast to stop predicting objects everywhere."""
    warm = warmup_left > 0 and isinstance(optimizer, torch.optim.SGD)
    for g in optimizer.param_groups:
        lr = base_lr * factor
        if warm and g.get("kind") == "bias":
            lr = 0.1 * warmup_left + lr * (1 - warmup_left)
        g["lr"] = lr


class ModelEMA:
    """Exponential moving average of weights and buffers; the EMA model is what gets evaluated/shipped.

    decay ramps up as decay * (1 - exp(-updates / tau)) so early, poor weights are forgotten fast.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        src = model.state_dict()
        averaged, current = [], []
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                averaged.append(v)
                current.append(src[k].detach())
            else:
                v.copy_(src[k])
        # One fused update over all tensors: hundreds of tiny kernels per step would dominate on a GPU.
        torch._foreach_lerp_(averaged, current, 1 - d)
