"""Command line of `python -m dashcamd.train` (and `dashcamd train`): `fit` a run, `export` its weights, choose
their `thresholds`, `calibrate` their int8 ranges, measure them on `cut-plates`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_DATA = Path("/work/shared/data/train")
DEFAULT_LABELS = Path(__file__).resolve().parents[2] / "var" / "labels"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dashcamd.train",
                                 description="Train the face+plate detector, or export a run's weights.")
    sub = ap.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train (or --resume / extend) a run")
    fit.add_argument("--run-dir", type=Path, required=True, help="where last.pt / best.pt go")
    fit.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt if present")
    fit.add_argument("--init", type=Path, default=None, metavar="WEIGHTS",
                     help="start from these dashcamd weights (e.g. weights/dashcamd-n-v1.pt) when not resuming")
    _add_data_options(fit)
    fit.add_argument("--model-size", default="n")
    fit.add_argument("--epochs", type=int, default=30, help="planned total; larger on --resume extends")
    fit.add_argument("--batch-size", type=int, default=8)
    fit.add_argument("--crop-px", type=int, default=320, help="square training crop size")
    fit.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    fit.add_argument("--lr", type=float, default=0.002)
    fit.add_argument("--final-lr-factor", type=float, default=0.05)
    fit.add_argument("--warmup-epochs", type=float, default=1.0)
    fit.add_argument("--eval-every-epochs", type=int, default=2)
    fit.add_argument("--eval-size-px", type=int, default=640, help="dev images letterboxed to this")
    fit.add_argument("--save-every-min", type=float, default=10.0)
    fit.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    fit.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto = cuda when available (bf16 autocast there), else cpu")
    fit.add_argument("--fit-minutes", type=float, default=0.0,
                     help="> 0: shorten --epochs to what fits in this many minutes (for a lent GPU)")
    fit.add_argument("--max-steps", type=int, default=0, help="stop after N steps (smoke tests)")
    fit.add_argument("--augment", type=json.loads, default={},
                     help='AugmentConfig overrides as JSON, e.g. \'{"p_night": 0.3}\'')
    fit.add_argument("--loss", type=json.loads, default={},
                     help='LossConfig overrides as JSON, e.g. \'{"box_gain": 0.1}\'')

    exp = sub.add_parser("export", help="write a run checkpoint's EMA weights in the detector format (fp16)")
    exp.add_argument("checkpoint", type=Path, help="RUN_DIR/best.pt or last.pt")
    exp.add_argument("output", type=Path, help="e.g. weights/dashcamd-n-v1.pt")

    thr = sub.add_parser("thresholds", help="choose per-class score thresholds for weights on the dev split")
    thr.add_argument("weights", type=Path)
    thr.add_argument("--min-precision", type=float, default=0.2,
                     help="lowest dev precision (IoU 0.5) a chosen threshold may have")
    thr.add_argument("--inference-size", type=int, default=640)
    _add_data_options(thr)

    cal = sub.add_parser("calibrate", help="measure int8 activation ranges of weights on training photos "
                                           "(writes WEIGHTS with suffix .int8.json)")
    cal.add_argument("weights", type=Path)
    cal.add_argument("--images", type=int, default=128, help="training photos to measure on")
    _add_data_options(cal)

    cut = sub.add_parser("cut-plates", help="share of dev plates still hidden when the photo's bottom edge cuts "
                                            "them, with the daemon's default detector settings")
    cut.add_argument("weights", type=Path)
    _add_data_options(cut)

    dev = sub.add_parser("dev-sets", help="write the dev split in the eval folders' format, for bench/leak.py "
                                          "--data OUT --sets dev_plates_openimages dev_faces_unlabelled")
    dev.add_argument("--out", type=Path, required=True)
    _add_data_options(dev)
    return ap


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """Where the samples come from and how the dev split is carved: the same for fit and thresholds."""
    parser.add_argument("--plates-dir", type=Path, default=DEFAULT_DATA / "plates_openimages")
    parser.add_argument("--faces-dir", type=Path, default=DEFAULT_DATA / "faces_unlabelled")
    parser.add_argument("--labels-dir", type=Path, default=DEFAULT_LABELS,
                        help="teacher face labels written by tools/label_faces.py")
    parser.add_argument("--face-min-score", type=float, default=0.5, help="teacher score kept as a face label")
    parser.add_argument("--dev-fraction", type=float, default=0.1, help="share of TRAIN held out as dev")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "export":
        from .export import export

        meta = export(args.checkpoint, args.output)
        print(json.dumps(meta, indent=1))
        return 0

    from .dataset import load_samples

    train_s, dev_s = load_samples(args.plates_dir, args.faces_dir, args.labels_dir,
                                  args.face_min_score, args.dev_fraction)
    if args.command == "thresholds":
        return _print_thresholds(args, dev_s)
    if args.command == "cut-plates":
        return _print_cut_plates(args, dev_s)
    if args.command == "dev-sets":
        from .dev_sets import write_dev_sets

        print(json.dumps(write_dev_sets(dev_s, args.out)))
        return 0
    if args.command == "calibrate":
        from .calibrate import calibrate

        document = calibrate(args.weights, train_s, args.images)
        print(json.dumps({key: document[key] for key in ("weights_sha256", "images", "onnxruntime", "size_px")}))
        return 0

    from .trainer import TrainConfig, train

    logging.getLogger(__name__).info("samples: %d train, %d dev", len(train_s), len(dev_s))
    cfg = TrainConfig(run_dir=str(args.run_dir), model_size=args.model_size, epochs=args.epochs,
                      batch_size=args.batch_size, crop_px=args.crop_px, optimizer=args.optimizer,
                      lr=args.lr, final_lr_factor=args.final_lr_factor, warmup_epochs=args.warmup_epochs,
                      eval_every_epochs=args.eval_every_epochs, eval_size_px=args.eval_size_px,
                      save_every_min=args.save_every_min, workers=args.workers, threads=args.threads,
                      seed=args.seed, max_steps=args.max_steps, augment=args.augment, loss=args.loss,
                      init_weights=str(args.init) if args.init else "", device=_device(args.device),
                      fit_minutes=args.fit_minutes)
    metrics = train(cfg, train_s, dev_s, resume=args.resume)
    print(json.dumps(metrics))
    return 0


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return requested


def _print_thresholds(args: argparse.Namespace, dev_samples: list) -> int:
    from .thresholds import choose, dev_operating_points

    table = dev_operating_points(args.weights, dev_samples, args.inference_size)
    chosen = {}
    for name, points in table.items():
        print(f"{name}: threshold precision recall (dev, {len(dev_samples)} images)")
        for p in points:
            print(f"  {p.threshold:.2f} {p.precision:.3f} {p.recall:.3f}")
        chosen[name] = choose(points, args.min_precision).threshold
    print(json.dumps({"chosen": chosen, "min_precision": args.min_precision}))
    return 0


def _print_cut_plates(args: argparse.Namespace, dev_samples: list) -> int:
    from dashcamd.config import DetectorSettings, RedactSettings
    from dashcamd.detect import Detector

    from .cut_plates import cut_plate_recall

    defaults = DetectorSettings()
    detector = Detector(args.weights, device="cpu", thresholds=defaults.thresholds,
                        inference_size=defaults.inference_size, batch_size=1, precision=defaults.precision)
    tallies = cut_plate_recall(detector, dev_samples, RedactSettings().enlarge)
    print(f"visible  plates  hidden  as redacted   ({args.weights}, {detector.precision}, dev split)")
    for fraction, t in tallies.items():
        print(f"{fraction:>7.2f} {t['plates']:>7} {t['hidden'] / max(t['plates'], 1):>7.3f} "
              f"{t['hidden_as_redacted'] / max(t['plates'], 1):>12.3f}")
    print(json.dumps({str(fraction): t for fraction, t in tallies.items()}))
    return 0
