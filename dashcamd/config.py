"""Settings: one pydantic model loaded from a TOML file, with ``DASHCAMD_*`` environment overrides.

Validators only, no side effects: nothing here creates folders or touches the device (the x264 options
are tried on an encoder in memory).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("/etc/dashcamd/config.toml")
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = PACKAGE_WEIGHTS_DIR / "dashcamd-n-v1.pt"
CLASS_NAMES = ("plate", "face")

Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


class _Section(BaseModel):
    # A typo in a key must be an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class PathsSettings(_Section):
    watch: list[Path] = Field(min_length=1, description="folders watched for new clips")
    output: Path = Field(description="redacted clips are written here, keeping the sub-path")
    state: Path = Field(description="queue database and worker scratch")
    archive: Path | None = Field(default=None, description="where originals go with originals = 'move'")
    quarantine: Path | None = Field(
        default=None,
        description="where clips that cannot be decoded are moved; None leaves them in place",
    )

    @model_validator(mode="after")
    def _output_is_not_a_watch_dir(self) -> PathsSettings:
        for watch_dir in self.watch:
            if watch_dir.resolve() == self.output.resolve():
                raise ValueError("output must differ from every watch folder (outputs would be re-processed)")
        return self


class WatchSettings(_Section):
    recursive: bool = True
    patterns: list[str] = Field(
        default_factory=lambda: ["*.mp4", "*.mov", "*.avi", "*.mkv", "*.ts", "*.m4v", "*.mts"],
        description="glob patterns of clip file names, matched case-insensitively",
    )
    ignore: list[str] = Field(
        default_factory=list, description="extra glob patterns (name or relative path) to ignore"
    )
    settle_s: float = Field(default=5.0, ge=0.0, description="size and mtime unchanged this long")
    polling: bool = Field(default=False, description="poll instead of inotify (NFS/SMB mounts)")
    poll_interval_s: float = Field(default=5.0, gt=0.0)
    rescan_interval_s: float = Field(default=300.0, gt=0.0, description="full rescan for missed events")
    invalid_after_s: float = Field(
        default=600.0, gt=0.0,
        description="a settled file that still does not open as a clip after this long is quarantined",
    )


class OutputSettings(_Section):
    suffix: str = Field(default="", description="added to the stem of each output name")
    originals: Literal["keep", "move", "delete"] = Field(
        default="keep", description="what happens to an original after its output is verified"
    )
    boxes_sidecar: bool = Field(default=False, description="write <output>.boxes.jsonl beside each clip")

    @field_validator("suffix")
    @classmethod
    def _suffix_is_a_plain_name(cls, suffix: str) -> str:
        if "/" in suffix or "\\" in suffix or suffix in {".", ".."}:
            raise ValueError("suffix must not contain path separators")
        return suffix


class DetectorSettings(_Section):
    weights: Path = Field(default=DEFAULT_WEIGHTS, description="dashcamd, YOLOv5 .pt or .onnx file")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    thresholds: dict[str, Fraction01] = Field(
        default_factory=lambda: {"plate": 0.05, "face": 0.05},
        description="per-class confidence thresholds",
    )
    inference_size: int = Field(default=640, ge=64, le=4096, description="long side the detector sees")
    batch_size: int = Field(default=4, ge=1, le=256)
    iou_threshold: Fraction01 = 0.45
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        default="auto", description="auto = fp16 on CUDA; on the CPU int8 (onnxruntime, weights with int8 "
                                    "ranges), else fp32; bf16 = CPU autocast"
    )
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        default="auto", description="auto = onnxruntime on the CPU when installed, torch otherwise"
    )
    detection_stride: int = Field(default=1, ge=1, le=10, description="detect every k-th frame")
    torch_threads: int = Field(default=0, ge=0, description="0 = choose from the CPU count")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device in {"auto", "cpu", "cuda", "mps"}:
            return device
        if device.startswith("cuda:") and device[5:].isdigit():
            return device
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")

    @field_validator("inference_size")
    @classmethod
    def _multiple_of_32(cls, size: int) -> int:
        if size % 32:
            raise ValueError("must be a multiple of 32")
        return size


class PrivacyZone(_Section):
    """A rectangle in relative frame coordinates (0..1) that is always redacted."""

    x1: Fraction01
    y1: Fraction01
    x2: Fraction01
    y2: Fraction01

    @model_validator(mode="after")
    def _ordered(self) -> PrivacyZone:
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError("zone needs x1 < x2 and y1 < y2")
        return self


class RedactSettings(_Section):
    mode: Literal["blur", "pixelate", "solid"] = "blur"
    blur_strength: float = Field(
        default=0.5, ge=0.3, le=2.0,
        description="Gaussian sigma as a fraction of the box's short side; below 0.3 a blur may be reversible",
    )
    pixelate_blocks: int = Field(default=8, ge=2, le=64, description="mosaic blocks across a box")
    solid_color: tuple[int, int, int] = Field(default=(0, 0, 0), description="RGB for mode = 'solid'")
    enlarge: dict[str, Annotated[float, Field(ge=1.0, le=4.0)]] = Field(
        default_factory=lambda: {"plate": 1.2, "face": 1.3},
        description="ROI enlargement factor per class",
    )
    feather: Fraction01 = Field(default=0.15, description="soft edge width as a fraction of the box")
    frame_memory: int = Field(default=0, ge=0, le=300, description="also redact boxes of the last n frames")
    track: bool = Field(default=True, description="link detections into tracks and fill gaps")
    max_gap: int = Field(default=15, ge=0, le=300, description="interpolate a track missing this many frames")
    pad: int = Field(default=5, ge=0, le=300, description="extend track ends this many frames both ways")
    smoothing: Fraction01 = Field(default=0.5, description="0 = raw boxes, towards 1 = smoother")
    hold: int = Field(default=8, ge=0, le=300,
                      description="a tracked box also covers the track's boxes this many frames before and after")
    continue_threshold: Fraction01 = Field(
        default=0.01,
        description="detections below their class threshold, down to this score, only continue a track",
    )
    zones: list[PrivacyZone] = Field(default_factory=list)
    processes: int | Literal["auto"] = Field(
        default="auto",
        description="helper processes that redact (0 = the pipeline's own redact thread); auto = 2 with 8 or "
                    "more CPU cores on Linux, else 0",
    )

    @field_validator("processes")
    @classmethod
    def _process_count(cls, value: int | str) -> int | str:
        if value != "auto" and not 0 <= value <= 16:
            raise ValueError("processes must be 'auto' or 0-16")
        return value


class EncoderSettings(_Section):
    crf: int = Field(default=19, ge=0, le=51)
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "veryfast"
    x264_params: str | None = Field(
        default=None, description="x264 key=value:... on top of the preset; unset = dashcamd's tuning of veryfast"
    )
    threads: int = Field(default=0, ge=0, description="0 = let x264 decide")
    nice: int = Field(default=5, ge=0, le=19, description="the encoder's threads this much nicer than the detector's")

    @model_validator(mode="after")
    def _x264_takes_them(self) -> EncoderSettings:
        # x264 only warns about an option it cannot parse and encodes without it: try them here instead.
        from dashcamd.x264 import encoder_options, rejected_options

        complaints = rejected_options(encoder_options(self.crf, self.preset, self.x264_params))
        if complaints:
            raise ValueError(f"x264 does not take these options: {'; '.join(complaints)}")
        return self


class WorkerSettings(_Section):
    heartbeat_timeout_s: float = Field(default=120.0, gt=0.0, description="worker silent this long is hung")
    max_attempts: int = Field(default=3, ge=1, le=100)
    retry_backoff_s: float = Field(default=60.0, ge=0.0, description="first retry delay; doubles each time")
    shutdown_timeout_s: float = Field(default=30.0, gt=0.0)


class LogSettings(_Section):
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto = console on a TTY, JSON lines otherwise"
    )
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(BaseSettings):
    """Everything dashcamd can be told. TOML file first, then ``DASHCAMD_SECTION__KEY`` env vars win."""

    model_config = SettingsConfigDict(env_prefix="DASHCAMD_", env_nested_delimiter="__", extra="forbid")

    paths: PathsSettings
    watch: WatchSettings = Field(default_factory=WatchSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    redact: RedactSettings = Field(default_factory=RedactSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _archive_needed_for_move(self) -> Settings:
        if self.output.originals == "move" and self.paths.archive is None:
            raise ValueError("output.originals = 'move' needs paths.archive")
        return self

    def detector_thresholds(self) -> dict[str, float]:
        """The scores the detector must report: each class threshold, lowered to
        ``redact.continue_threshold`` when tracks are on to take the weaker detections (``TemporalFilter``)."""
        if not self.redact.track:
            return dict(self.detector.thresholds)
        return {name: min(score, self.redact.continue_threshold) for name, score in self.detector.thresholds.items()}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; environment variables override them.
        return env_settings, init_settings


def load_settings(config_path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the TOML file (if any), apply env overrides, validate. Raises ConfigError, never a traceback."""
    file_values: dict[str, Any] = {}
    if config_path is not None:
        try:
            with config_path.open("rb") as config_file:
                file_values = tomllib.load(config_file)
        except FileNotFoundError as missing:
            raise ConfigError(f"{config_path}: config file not found") from missing
        except (OSError, tomllib.TOMLDecodeError) as unreadable:
            raise ConfigError(f"{config_path}: {unreadable}") from unreadable
    for section, values in (overrides or {}).items():
        file_values.setdefault(section, {}).update(values)
    try:
        return Settings(**file_values)
    except ValidationError as invalid:
        raise ConfigError(_describe(invalid, config_path)) from invalid


def _describe(invalid: ValidationError, config_path: Path | None) -> str:
    where = f"{config_path}: " if config_path else ""
    problems = []
    for error in invalid.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{where}{key}: {error['msg']}")
    return "\n".join(problems)
