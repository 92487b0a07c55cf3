"""Command line: parse, load settings, call one function; map failures to exit codes (2 = bad config)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dashcamd.config import (DEFAULT_CONFIG_PATH, DEFAULT_WEIGHTS, ConfigError, DetectorSettings, LogSettings,
                             RedactSettings, Settings, load_settings)
from dashcamd.logs import configure_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as bad_config:
        print(f"dashcamd: invalid configuration:\n{bad_config}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashcamd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        if config:
            command.add_argument("--config", type=Path, default=None,
                                 help=f"TOML settings file (default {DEFAULT_CONFIG_PATH})")
        command.set_defaults(handler=handler)
        return command

    add("run", _run, "watch the configured folders and process clips until stopped")
    process = add("process", _process, "process clips or folders once, in this process")
    process.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    process.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    process.add_argument("--export-boxes", type=Path, default=None, metavar="FILE.jsonl",
                         help="write the redacted regions of every frame (one input only)")
    status = add("status", _status, "print the queue: counts per state, current clip, last errors")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add("check-config", _check_config, "validate the settings and print the effective values")

    for name, handler, help_text in (
        ("detect", _detect, "run the detector on images or folders of images"),
        ("eval", _eval, "measure recall/precision on annotated image sets"),
    ):
        command = add(name, handler, help_text, config=False)
        command.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
        command.add_argument("--device", default="auto")
        command.add_argument("--inference-size", type=int, default=640)
        command.add_argument("--precision", default="auto",
                             help="auto | fp32 | fp16 | bf16 | int8, as [detector] precision (default auto)")
        command.add_argument("--threshold", action="append", default=[], metavar="CLASS=SCORE",
                             help="per-class confidence threshold, e.g. plate=0.2 (repeatable; default: "
                                  "the daemon's [detector] thresholds)")
    detect = commands.choices["detect"]
    detect.add_argument("--json", action="store_true", help="one JSON line per image")
    detect.add_argument("paths", nargs="+", metavar="PATH")
    evaluate = commands.choices["eval"]
    evaluate.add_argument("--data", type=Path, required=True, help="folder of <set>/annotations.json")
    evaluate.add_argument("--json", type=Path, default=None, dest="json_out", help="also write results here")
    evaluate.add_argument("--as-redacted", action="store_true",
                          help="count an object hidden under the detections enlarged by the default "
                               "[redact] enlarge factors, as the output redacts them (default: as detected)")

    export = add("export-onnx", _export_onnx, "export weights to ONNX for another runtime", config=False)
    export.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    export.add_argument("--inference-size", type=int, default=640)
    export.add_argument("output", type=Path)

    train = commands.add_parser("train", help="train detector weights (needs the [train] extra)", add_help=False)
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(handler=_train)
    return parser


def _settings(args: argparse.Namespace, overrides: dict | None = None) -> Settings:
    config_path = args.config
    if config_path is None and (overrides is None or DEFAULT_CONFIG_PATH.exists()):
        config_path = DEFAULT_CONFIG_PATH
    settings = load_settings(config_path, overrides)
    configure_logging(settings.log)
    return settings


def _run(args: argparse.Namespace) -> int:
    from dashcamd.daemon import Daemon

    return Daemon(_settings(args)).run()


def _process(args: argparse.Namespace) -> int:
    from dashcamd.process import process_inputs

    output = args.output
    overrides = {"paths": {"watch": [str(p) for p in args.inputs], "output": str(output),
                           "state": str(output / ".dashcamd-state")}}
    if args.export_boxes is not None and len(args.inputs) != 1:
        print("dashcamd: --export-boxes takes exactly one input clip", file=sys.stderr)
        return EXIT_CONFIG
    return process_inputs(_settings(args, overrides), args.inputs, output, args.export_boxes)


def _status(args: argparse.Namespace) -> int:
    from dashcamd.jobs import read_status

    settings = _settings(args)
    database = settings.paths.state / "queue.sqlite3"
    if not database.exists():
        print(f"no queue yet at {database}")
        return EXIT_OK
    status = read_status(database)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    print("queue: " + ", ".join(f"{state} {count}" for state, count in status["counts"].items()))
    current = status["current"]
    if current:
        print(f"current: {current['path']} ({current['progress']:.0%}, attempt {current['attempts']})")
    for job in status["recent_errors"]:
        print(f"error: {job['path']} [{job['state']}]: {job['error']}")
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _thresholds(pairs: list[str]) -> dict[str, float]:
    """--threshold CLASS=SCORE pairs over the daemon's default thresholds, so that detect and eval
    measure what the daemon would redact."""
    thresholds = dict(DetectorSettings().thresholds)
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            thresholds[name] = float(value)
        except ValueError as bad:
            raise ConfigError(f"--threshold {pair!r}: expected CLASS=SCORE") from bad
    return thresholds


def _log_to_stderr() -> None:
    """Commands that print results on stdout keep their logs out of it."""
    configure_logging(LogSettings(), process="cli", stream=sys.stderr)


def _detect(args: argparse.Namespace) -> int:
    from dashcamd.detect.commands import run_detect

    _log_to_stderr()
    return run_detect(args.paths, args.weights, args.device, args.json, _thresholds(args.threshold),
                      args.inference_size, precision=args.precision)


def _eval(args: argparse.Namespace) -> int:
    from dashcamd.detect.commands import run_eval

    _log_to_stderr()
    enlarge = RedactSettings().enlarge if args.as_redacted else None
    return run_eval(args.data, args.weights, args.device, _thresholds(args.threshold), args.inference_size,
                    json_out=args.json_out, enlarge=enlarge, precision=args.precision)


def _export_onnx(args: argparse.Namespace) -> int:
    from dashcamd.detect.commands import run_export_onnx

    _log_to_stderr()
    return run_export_onnx(args.weights, args.output, args.inference_size)


def _train(args: argparse.Namespace) -> int:
    from dashcamd.train import main as train_main

    return train_main(args.train_args)
