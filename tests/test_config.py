"""Settings: file + environment, clear errors with exit code 2, the example file documents every option."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from dashcamd.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
MINIMAL = '[paths]\nwatch = ["/srv/in"]\noutput = "/srv/out"\nstate = "/srv/state"\n'


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _dashcamd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dashcamd", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_minimal_file_gets_defaults(tmp_path):
    settings = load_settings(_write(tmp_path, MINIMAL))
    assert settings.paths.watch == [Path("/srv/in")]
    assert settings.output.originals == "keep"
    assert settings.watch.recursive is True
    assert settings.detector.weights.name == "dashcamd-n-v1.pt"


def test_detector_reports_weaker_detections_only_for_tracks(tmp_path):
    thresholds = "[detector.thresholds]\nplate = 0.3\nface = 0.005\n"
    tracked = load_settings(_write(tmp_path, MINIMAL + thresholds + "[redact]\ncontinue_threshold = 0.02\n"))
    assert tracked.detector_thresholds() == {"plate": 0.02, "face": 0.005}
    untracked = load_settings(_write(tmp_path, MINIMAL + thresholds + "[redact]\ntrack = false\n"))
    assert untracked.detector_thresholds() == {"plate": 0.3, "face": 0.005}


def test_environment_overrides_file_and_keeps_other_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("DASHCAMD_ENCODER__CRF", "27")
    monkeypatch.setenv("DASHCAMD_PATHS__WATCH", '["/mnt/sd"]')
    settings = load_settings(_write(tmp_path, MINIMAL + "[encoder]\ncrf = 18\npreset = \"fast\"\n"))
    assert settings.encoder.crf == 27
    assert settings.encoder.preset == "fast"
    assert settings.paths.watch == [Path("/mnt/sd")]
    assert settings.paths.output == Path("/srv/out")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[encoder]\ncrf = 99\n", "encoder.crf"),
        ("[encoder]\ncfr = 20\n", "encoder.cfr"),
        ("[detector]\ndevice = \"gpu\"\n", "detector.device"),
        ("[encoder]\nx264_params = \"subme=1:bogus=2\"\n", "bogus"),  # x264 itself would only warn
        ("[detector]\ninference_size = 650\n", "detector.inference_size"),
        ("[output]\noriginals = \"move\"\n", "originals"),
        ("[redact]\nzones = [{x1 = 0.5, y1 = 0.0, x2 = 0.2, y2 = 1.0}]\n", "redact.zones.0"),
    ],
)
def test_bad_values_name_the_key(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(_write(tmp_path, MINIMAL + extra))


def test_missing_paths_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="paths"):
        load_settings(_write(tmp_path, "[encoder]\ncrf = 20\n"))


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    result = _dashcamd("check-config", "--config", str(_write(tmp_path, MINIMAL + "[encoder]\ncrf = -1\n")))
    assert result.returncode == 2
    assert "encoder.crf" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unparsable_toml_exits_2(tmp_path):
    result = _dashcamd("check-config", "--config", str(_write(tmp_path, "[paths\nwatch=")))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_cli_check_config_prints_effective_settings(tmp_path):
    result = _dashcamd("check-config", "--config", str(_write(tmp_path, MINIMAL)))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["paths"]["output"] == "/srv/out"
    assert effective["encoder"]["preset"] == "veryfast"


def test_example_config_is_valid_and_documents_every_option():
    settings = load_settings(REPO / "config.example.toml")
    assert settings.paths.output == Path("./var/output")
    text = (REPO / "config.example.toml").read_text()
    undocumented = [
        f"{section}.{key}"
        for section, key in _all_keys(Settings)
        if not re.search(rf"^#?\s*{re.escape(key)}\s*=", text, re.MULTILINE)
        and f"[{section}.{key}]" not in text
    ]
    assert not undocumented


def _all_keys(model: type[BaseModel]) -> list[tuple[str, str]]:
    keys = []
    for section, field in model.model_fields.items():
        for key in field.annotation.model_fields:
            keys.append((section, key))
    return keys


def test_run_with_missing_weights_exits_2(tmp_path):
    config = _write(tmp_path, MINIMAL.replace("/srv", str(tmp_path)) + f'[detector]\nweights = "{tmp_path}/none.pt"\n')
    result = _dashcamd("run", "--config", str(config))
    assert result.returncode == 2
    assert "detector.weights" in result.stderr and "Traceback" not in result.stderr
