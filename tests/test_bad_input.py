"""Bad and unusual input, all dropped on ONE running daemon (one start-up keeps this fast).

Proves: every file ends in exactly one clear outcome (published, or quarantined with a reason a person can
act on, or ignored when it is not ours to read); unusual but valid clips (8K, odd sizes, rotation, HEVC,
MJPEG, hostile names, links) are published as verified H.264; the daemon never crashes and carries on; it
writes nowhere but its own folders; no input byte is lost (every file is still in the watch folder or,
byte-identical, in quarantine).
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import av
import pytest

from dashcamd import publish
from dashcamd.publish import output_path_for
from tests.daemon_harness import NO_DETECTIONS, DaemonProcess, make_random_weights, write_config
from tests.fault_helpers import (
    all_files,
    job_rows,
    make_flat_clip,
    mutate,
    sha256,
    video_frames,
)
from tests.helpers import wait_for
from tests.media_factory import (
    corrupt_video_packets,
    make_audio_only,
    make_clip,
    make_text_file_named_mp4,
    make_zero_byte,
    truncate_moov,
)

pytestmark = pytest.mark.slow
TIMEOUT_S = 150.0
TERMINAL = {"done", "quarantined", "failed"}
SMALL = {"width": 160, "height": 96, "seconds": 0.5}

# name in the watch folder -> (expected output frames) for clips that must be published.
GOOD = {
    "space name.mp4": 15,
    "ünï cødé 日本.mp4": 15,
    "new\nline.mp4": 15,
    "back\\..\\..\\slash.mp4": 15,  # backslashes and dots are plain characters on Linux
    "odd_161x97.mp4": 15,
    "rotated.mp4": 15,
    "hevc.mp4": 15,
    "mjpeg.avi": 15,
    "huge_8k.mp4": 3,
    "few_corrupt.mp4": None,  # 60 less the frames the decoder could not rebuild (at most 5)
    "DCIM/hard link.mp4": 15,
}
# name -> words the quarantine reason must contain.
QUARANTINED = {
    "zero.mp4": "empty file",
    "truncated.mp4": "moov",
    "text.mp4": "not a media file",
    "audio_only.mp4": "no video stream",
    "many_corrupt.mp4": "corrupt",
}
FUZZED = [f"fuzzed_{i}.mp4" for i in range(4)]
LATIN1_NAME = b"caf\xe9 \xe9t\xe9.mp4"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random_weights(tmp_path_factory.mktemp("weights") / "random.pt")


def _make_inputs(watch: Path, private: Path) -> None:
    for name in ("space name.mp4", "ünï cødé 日本.mp4", "new\nline.mp4", "back\\..\\..\\slash.mp4"):
        make_clip(watch / name, **SMALL)
    make_clip(watch / "odd_161x97.mp4", width=161, height=97, seconds=0.5)
    make_clip(watch / "rotated.mp4", **SMALL, rotation=90)
    make_clip(watch / "hevc.mp4", **SMALL, codec="hevc")
    make_clip(watch / "mjpeg.avi", **SMALL, codec="mjpeg", audio_streams=0)
    make_flat_clip(watch / "huge_8k.mp4", 7680, 4320, frames=3)
    corrupt_video_packets(make_clip(watch / "few_corrupt.mp4", width=160, height=96, seconds=2.0), [20, 45])
    (watch / "DCIM").mkdir()
    os.link(watch / "space name.mp4", watch / "DCIM" / "hard link.mp4")
    (watch / "alias.mp4").symlink_to(watch / "space name.mp4")  # inside: stands for its target

    # Latin-1 bytes from an old camera or share: not UTF-8, so the queue cannot store the name.
    make_clip(private / "latin1.mp4", **SMALL).rename(watch / os.fsdecode(LATIN1_NAME))

    make_zero_byte(watch / "zero.mp4")
    truncate_moov(make_clip(watch / "truncated.mp4", **SMALL))
    make_text_file_named_mp4(watch / "text.mp4")
    make_audio_only(watch / "audio_only.mp4", seconds=0.5)
    corrupt_video_packets(make_clip(watch / "many_corrupt.mp4", width=160, height=96, seconds=2.0,
                                    audio_streams=0), range(10, 50, 3))

    seed = make_clip(private / "seed.mp4", width=160, height=96, seconds=0.3).read_bytes()
    rng = random.Random(20240611)
    for name in FUZZED:
        (watch / name).write_bytes(mutate(seed, rng))

    make_clip(private / "secret.mp4", **SMALL)
    (watch / "outside.mp4").symlink_to(private / "secret.mp4")  # must not be followed out
    (watch / "linked_dir").symlink_to(private, target_is_directory=True)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (links not followed): what it is and its content."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                entries[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entries[str(path.relative_to(root))] = ("file", sha256(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[str(path.relative_to(root))] = ("dir",)
            else:
                entries[str(path.relative_to(root))] = ("other", stat.S_IFMT(info.st_mode))
    return entries


def test_bad_and_unusual_input_on_one_running_daemon(tmp_path, weights, monkeypatch):
    watch, private, quarantine = tmp_path / "import", tmp_path / "private", tmp_path / "quarantine"
    watch.mkdir()
    private.mkdir()
    _make_inputs(watch, private)
    originals = {str(p): sha256(watch / p) for p in all_files(watch) if not (watch / p).is_symlink()}
    # Where stray writes would land: a home and a temp folder of its own, inside the snapshot.
    for variable, folder in (("HOME", "home"), ("TMPDIR", "tmp"), ("XDG_CACHE_HOME", "home/.cache")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(variable, str(tmp_path / folder))
    config = write_config(tmp_path, weights, paths={"quarantine": str(quarantine)},
                          watch={"invalid_after_s": 1.0},
                          worker={"retry_backoff_s": 0.2, "max_attempts": 2}, **NO_DETECTIONS)
    before = _snapshot(tmp_path)

    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        expected = set(GOOD) | set(QUARANTINED) | set(FUZZED)

        def all_settled() -> bool:
            rows = job_rows(tmp_path / "state")
            seen = {str(Path(r["path"]).relative_to(watch)) for r in rows}
            return expected <= seen and all(r["state"] in TERMINAL for r in rows)

        wait_for(all_settled, TIMEOUT_S, interval_s=0.2, what="every input in a final state")
        # Still working: a clip dropped after all of that is processed too.
        make_clip(tmp_path / "after.mp4", **SMALL)
        os.replace(tmp_path / "after.mp4", watch / "after.mp4")
        wait_for(lambda: (tmp_path / "output" / "after.mp4").exists(), TIMEOUT_S, interval_s=0.1, what="after.mp4")
        assert daemon.process.poll() is None
    finally:
        exit_code = daemon.stop()
    assert exit_code == 0, daemon.log_text()[-3000:]

    # Every log line is one JSON record (a newline in a file name must not split one); no tracebacks.
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    assert all(line.startswith("{") and json.loads(line) for line in lines), [
        line for line in lines if not line.startswith("{")][:20]

    rows = job_rows(tmp_path / "state")
    by_name = {}
    for row in rows:
        by_name.setdefault(str(Path(row["path"]).relative_to(watch)), []).append(row)
    assert all(len(versions) == 1 for versions in by_name.values()), "one job per file, never two"

    # Published: verified H.264 at the same sub-path, with every frame (the corrupt one less a few).
    for name, frames in GOOD.items():
        assert by_name[name][0]["state"] == "done", by_name[name]
        output = (tmp_path / "output" / name).with_suffix(".mp4")
        with av.open(str(output)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        decoded = video_frames(output)
        assert decoded == frames if frames is not None else 55 <= decoded < 60, (name, decoded)
    with av.open(str(tmp_path / "output" / "rotated.mp4")) as container:
        assert next(container.decode(video=0)).rotation in (90, -270, -90, 270)
    corrupt = [e for e in daemon.events("corrupt_frames") if e["path"].endswith("few_corrupt.mp4")]
    assert corrupt and corrupt[0]["decode_errors"] == 2, "damage is logged, not hidden"

    # Quarantined: moved aside byte-identical, with a reason a person can act on.
    for name, reason in QUARANTINED.items():
        assert by_name[name][0]["state"] == "quarantined"
        assert reason in by_name[name][0]["error"], (name, by_name[name][0]["error"])
        assert sha256(quarantine / name) == originals[name]
        logged = [e for e in daemon.events("clip_quarantined") if e["clip"].endswith(name)]
        assert len(logged) == 1 and reason in logged[0]["error"]

    # Fuzzed files: any final outcome, but one, and never a crash.
    for name in FUZZED:
        assert by_name[name][0]["state"] in TERMINAL

    # A name that is not UTF-8 is left alone and named in a warning (rename it to have it processed), and
    # it does not stop the scan from finding the files listed after it.
    latin1 = os.fsdecode(LATIN1_NAME)
    assert latin1 not in by_name and (watch / latin1).exists()
    assert [e for e in daemon.events("clip_name_not_utf8") if "caf" in e["clip"]]

    # Links: an inner link stands for its target (no second job); links out of the folder are not followed.
    assert "alias.mp4" not in by_name and not (tmp_path / "output" / "alias.mp4").exists()
    assert not any("secret" in n or "linked_dir" in n or "outside" in n for n in by_name)
    assert sha256(private / "secret.mp4") == sha256(watch / "outside.mp4")  # target untouched, link kept

    outputs = {str(p) for p in all_files(tmp_path / "output")}
    published = {str(Path(n).with_suffix(".mp4")) for n in GOOD} | {"after.mp4"}
    published |= {n for n in FUZZED if by_name[n][0]["state"] == "done"}
    assert outputs == published, "exactly one output per published clip, nothing else"
    assert all((tmp_path / "output" / p).stat().st_mode & 0o777 == 0o644 for p in outputs)

    # No input byte lost: each original is in the watch folder or, identical, in quarantine.
    for name, digest in originals.items():
        kept = watch / name if (watch / name).exists() else quarantine / name
        assert sha256(kept) == digest, name

    # Nothing written outside the daemon's folders (home, temp, the inputs' neighbours included).
    after = _snapshot(tmp_path)
    allowed = ("output", "state", "quarantine")
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    unexpected = {p for p in changed if p.split(os.sep)[0] not in allowed}
    unexpected -= {"daemon.log", "daemon.notify", "import/after.mp4"}
    moved_out = {p for p in unexpected if p.startswith("import" + os.sep) and p not in after
                 and p.removeprefix("import" + os.sep) in {str(q) for q in all_files(quarantine)}}
    assert unexpected - moved_out == set()


# ------------------------------------------------------------------------------------ output paths


@pytest.mark.parametrize("name", ["..mp4", "...mp4", "..\\..\\x.mp4", "a..b.mp4", "new\nline.mp4", "-rf *.mp4",
                                  "x" * 240 + ".mp4"])
def test_dotted_and_odd_names_map_to_one_file_inside_the_output_folder(tmp_path, name):
    watch, out = tmp_path / "watch", tmp_path / "out"
    result = output_path_for(watch / "cam" / name, watch, out, "_anon")
    assert result.parent == out / "cam" and result.name not in ("", ".", "..")
    assert os.path.realpath(result).startswith(str(out) + os.sep)


def test_dot_dot_inside_the_path_is_resolved_before_mapping(tmp_path):
    watch, out = tmp_path / "watch", tmp_path / "out"
    assert output_path_for(watch / "a" / ".." / "b.mp4", watch, out, "") == out / "b.mp4"
    with pytest.raises(ValueError):
        output_path_for(watch / "a" / ".." / ".." / "b.mp4", watch, out, "")


def test_a_symlink_planted_at_the_output_name_is_replaced_not_written_through(tmp_path):
    """Someone with access to the output share links clip.mp4 to a file of theirs: publishing renames over the
    link; the link's target is never opened for writing."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    final = out / "clip.mp4"
    final.symlink_to(victim)
    temp = publish.temp_path_for(final)
    temp.write_bytes(b"redacted video")
    publish.publish(temp, final)
    assert not final.is_symlink() and final.read_bytes() == b"redacted video"
    assert victim.read_text() == "keep me"
