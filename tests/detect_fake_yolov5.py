"""Test-only stand-in for ultralytics' YOLOv5 ``models`` package, to write train.py-style checkpoints.

The classes mirror the attribute names of real checkpoints (``models.common.Conv.conv/bn/act``, ...) and
carry an independent, plain reference forward of the published formulas. They live in ``sys.modules``
only inside ``fake_ultralytics_modules()``, so the loader under test must read the file without them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
HEAD = [
    [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 6], 1, "Concat", [1]],
    [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
]
YAML_V6 = {  # yolov5n.yaml of v6.0+ at half its width (fast tests), nc=2
    "nc": 2, "depth_multiple": 0.33, "width_multiple": 0.125, "anchors": ANCHORS,
    "backbone": [
        [-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]], [-1, 9, "C3", [512]],
        [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]], [-1, 1, "SPPF", [1024, 5]],
    ],
    "head": HEAD,
}
YAML_V5_0 = {  # yolov5s.yaml of v5.0 at 1/8 width (DashcamCleaner's layout, kept small), nc=2
    "nc": 2, "depth_multiple": 0.33, "width_multiple": 0.125, "anchors": ANCHORS,
    "backbone": [
        [-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]], [-1, 9, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]], [-1, 9, "C3", [512]],
        [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "SPP", [1024, [5, 9, 13]]], [-1, 3, "C3", [1024, False]],
    ],
    "head": HEAD,
}


class Conv(nn.Module):
    __module__ = "models.common"

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(y)  # SiLU written out


class Bottleneck(nn.Module):
    __module__ = "models.common"

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        self.cv1 = Conv(c1, int(c2 * e), 1, 1)
        self.cv2 = Conv(int(c2 * e), c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    __module__ = "models.common"

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_), Conv(c1, c_), Conv(2 * c_, c2)
        self.m = nn.Sequential(*[Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)])

    def forward(self, x):
        a = self.cv1(x)
        for block in self.m:
            a = block(a)
        return self.cv3(torch.cat([a, self.cv2(x)], 1))


class SPP(nn.Module):
    __module__ = "models.common"

    def __init__(self, c1, c2, k=(5, 9, 13)):
        super().__init__()
        self.cv1 = Conv(c1, c1 // 2)
        self.cv2 = Conv(c1 // 2 * (len(k) + 1), c2)
        self.m = nn.ModuleList([nn.MaxPool2d(x, 1, x // 2) for x in k])

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [nn.functional.max_pool2d(x, p.kernel_size, 1, p.kernel_size // 2)
                                         for p in self.m], 1))


class SPPF(nn.Module):
    __module__ = "models.common"

    def __init__(self, c1, c2, k=5):
        super().__init__()
        self.cv1 = Conv(c1, c1 // 2)
        self.cv2 = Conv(c1 // 2 * 4, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        # The published equivalence: SPPF(5) == SPP(5, 9, 13); computed the SPP way here.
        x = self.cv1(x)
        pools = [nn.functional.max_pool2d(x, k, 1, k // 2) for k in (5, 9, 13)]
        return self.cv2(torch.cat([x] + pools, 1))


class Focus(nn.Module):
    __module__ = "models.common"

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act)

    def forward(self, x):
        patches = [x[:, :, dy::2, dx::2] for dx, dy in ((0, 0), (0, 1), (1, 0), (1, 1))]
        return self.conv(torch.cat(patches, 1))


class Concat(nn.Module):
    __module__ = "models.common"

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    __module__ = "models.yolo"
    stride = None

    def __init__(self, nc, anchors, ch, v5_0=False):
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(anchors), len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        if v5_0:
            self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        else:
            self.anchor_grid = [torch.zeros(1)] * self.nl
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = True

    def forward(self, xs):
        out = []
        for i in range(self.nl):
            p = self.m[i](xs[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2)
            if self.training:
                out.append(p)
                continue
            s = torch.sigmoid(p)
            gx = torch.arange(nx).float().view(1, 1, 1, nx)
            gy = torch.arange(ny).float().view(1, 1, ny, 1)
            anchor_w = (self.anchors[i, :, 0] * self.stride[i]).view(1, self.na, 1, 1)
            anchor_h = (self.anchors[i, :, 1] * self.stride[i]).view(1, self.na, 1, 1)
            cx = (2 * s[..., 0] - 0.5 + gx) * self.stride[i]
            cy = (2 * s[..., 1] - 0.5 + gy) * self.stride[i]
            w = 4 * s[..., 2] ** 2 * anchor_w
            h = 4 * s[..., 3] ** 2 * anchor_h
            out.append(torch.cat([torch.stack([cx, cy, w, h], -1), s[..., 4:]], -1).reshape(bs, -1, self.no))
        return out if self.training else torch.cat(out, 1)


_LAYERS = {"Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "SPP": SPP, "SPPF": SPPF, "Focus": Focus,
           "Concat": Concat, "nn.Upsample": nn.Upsample, "Detect": Detect}


class Model(nn.Module):
    __module__ = "models.yolo"

    def __init__(self, yaml, names, v5_0=False):
        super().__init__()
        self.yaml = copy.deepcopy(yaml)
        gd, gw, nc = yaml["depth_multiple"], yaml["width_multiple"], yaml["nc"]
        layers, ch, self.save = [], [3], []
        for i, (f, n, name, args) in enumerate(yaml["backbone"] + yaml["head"]):
            cls = _LAYERS[name]
            args = [nc if a == "nc" else yaml["anchors"] if a == "anchors" else a for a in args]
            n = max(round(n * gd), 1) if n > 1 else n
            if cls in (Conv, Bottleneck, C3, SPP, SPPF, Focus):
                c2 = math.ceil(args[0] * gw / 8) * 8
                args = [ch[f], c2, *args[1:]]
                if cls is C3:
                    args.insert(2, n)
                    n = 1
            elif cls is Concat:
                c2 = sum(ch[x] for x in f)
            elif cls is Detect:
                args = [nc, yaml["anchors"], [ch[x] for x in f], v5_0]
            else:
                c2 = ch[f]
            layer = nn.Sequential(*[cls(*args) for _ in range(n)]) if n > 1 else cls(*args)
            layer.i, layer.f, layer.type = i, f, f"{cls.__module__}.{cls.__name__}"
            layer.np = sum(p.numel() for p in layer.parameters())
            self.save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(layer)
            ch = [] if i == 0 else ch
            ch.append(c2)
        self.model = nn.Sequential(*layers)
        self.names = names
        detect = self.model[-1]
        self.train()
        detect.stride = torch.tensor([64 / p.shape[-3] for p in self.forward(torch.zeros(1, 3, 64, 64))])
        detect.anchors /= detect.stride.view(-1, 1, 1)
        self.stride = detect.stride
        for m in self.modules():  # the training recipe's BatchNorm settings
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


class DetectionModel(Model):
    """v6.2+ name of Model (``Model = DetectionModel`` there), so checkpoints name this class."""

    __module__ = "models.yolo"


def randomize(model: nn.Module, seed: int) -> None:
    """Random BatchNorm affine parameters and head biases, then BatchNorm statistics measured on random
    images: the signal neither vanishes nor explodes, so the output depends on every layer and a wrong
    layer shows. Leaves the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 1.0  # running statistics := this batch's
        model.train()
        model(torch.rand(2, 3, 128, 128, generator=gen))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            # Near-constant channels would amplify float32 rounding (1/sqrt(var)) far beyond 1e-3.
            m.running_var.clamp_(min=0.25)
    model.eval()


@contextlib.contextmanager
def fake_ultralytics_modules() -> Iterator[None]:
    """Register ``models``, ``models.yolo`` and ``models.common`` while the block runs, then remove them."""
    saved = {name: sys.modules.get(name) for name in ("models", "models.yolo", "models.common")}
    package = types.ModuleType("models")
    yolo, common = types.ModuleType("models.yolo"), types.ModuleType("models.common")
    for cls in (Conv, Bottleneck, C3, SPP, SPPF, Focus, Concat):
        setattr(common, cls.__name__, cls)
    for cls in (Detect, Model, DetectionModel):
        setattr(yolo, cls.__name__, cls)
    package.yolo, package.common = yolo, common
    sys.modules.update({"models": package, "models.yolo": yolo, "models.common": common})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_ultralytics_checkpoint(path: Path, layout: str, seed: int = 0) -> nn.Module:
    """Save a random model as YOLOv5's train.py does (fp16 module objects); return the fp32 reference.

    layout "v6": a DetectionModel under 'ema' with names as a dict; "v5.0": a stripped v5.0 file (Model
    under 'model', 'ema' None, names a list).
    """
    torch.manual_seed(seed)
    with fake_ultralytics_modules():
        if layout == "v6":
            model = DetectionModel(YAML_V6, {0: "plate", 1: "face"})
        else:
            model = Model(YAML_V5_0, ["plate", "face"], v5_0=True)
        randomize(model, seed)
        model.eval()
        half = copy.deepcopy(model).half()
        if layout == "v6":
            ckpt = {"epoch": 3, "best_fitness": np.float64(0.42), "model": None, "ema": half, "updates": 7,
                    "optimizer": None, "opt": {"weights": "yolov5n.pt", "save_dir": Path("runs/exp")},
                    "git": None, "date": "2024-01-01T00:00:00"}
        else:
            ckpt = {"epoch": -1, "best_fitness": np.array([0.42]), "training_results": None, "model": half,
                    "ema": None, "updates": None, "optimizer": None, "wandb_id": None}
        torch.save(ckpt, path)
    return half.float().eval()
