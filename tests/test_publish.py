"""publish.py: naming and escapes, temp files, verification, atomic publish, stale temps, originals policy."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from media_factory import make_clip

from dashcamd import publish
from dashcamd.errors import InvalidClip, TransientError
from dashcamd.media import probe
from dashcamd.publish import (
    OutputMismatch,
    apply_originals_policy,
    is_temp_name,
    output_path_for,
    remove_stale_temps,
    temp_path_for,
    verify_output,
)

# ---------------------------------------------------------------------------------------------- naming


def test_output_path_keeps_sub_path_and_adds_suffix(tmp_path: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    source = watch / "2024" / "front" / "CLIP0001.MOV"
    assert output_path_for(source, watch, out, "_anon") == out / "2024" / "front" / "CLIP0001_anon.mp4"
    assert output_path_for(watch / "a.mp4", watch, out, "") == out / "a.mp4"


@pytest.mark.parametrize(
    ("source", "suffix"),
    [
        ("elsewhere/a.mp4", ""),  # not under the watch folder
        ("watch/../elsewhere/a.mp4", ""),  # .. walks out
        ("/etc/a.mp4", ""),  # absolute elsewhere
        ("watch/a.mp4", "/../../x"),  # suffix with separators
    ],
)
def test_output_path_refuses_escapes(tmp_path: Path, source: str, suffix: str) -> None:
    with pytest.raises(ValueError):
        output_path_for(tmp_path / source, tmp_path / "watch", tmp_path / "out", suffix)


def test_output_names_too_long_for_the_filesystem_are_shortened_apart(tmp_path: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    long_stem = "Fahrt_über_die_Brücke_" * 12  # 264 bytes of UTF-8, with two-byte characters
    first = output_path_for(watch / f"{long_stem}1.mp4", watch, out, "_anon")
    second = output_path_for(watch / f"{long_stem}2.mp4", watch, out, "_anon")
    assert first != second
    for path in (first, second):
        assert len(path.name.encode()) <= 255 - 16  # room for ".boxes.jsonl" and "a.mov.mp4"-style renames
        assert path.name.startswith("Fahrt_über") and path.name.endswith("_anon.mp4")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".boxes.jsonl").write_bytes(b"")  # the longest derived name can be created
        path.write_bytes(b"")
    short = output_path_for(watch / "CLIP0001.MP4", watch, out, "_anon")
    assert short.name == "CLIP0001_anon.mp4"


def test_output_path_refuses_symlinked_folder_in_output(tmp_path: Path) -> None:
    watch, out, elsewhere = tmp_path / "watch", tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "cam").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symlink"):
        output_path_for(watch / "cam" / "a.mp4", watch, out, "")


def test_temp_file_is_hidden_private_and_beside_final(tmp_path: Path) -> None:
    final = tmp_path / "new" / "clip.mp4"
    first, second = temp_path_for(final), temp_path_for(final)
    assert first != second
    for temp in (first, second):
        assert temp.parent == final.parent and temp.name.startswith(".")
        assert is_temp_name(temp.name) and temp.suffix == ".mp4"
        assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    assert not is_temp_name("clip.mp4")
    long_final = tmp_path / ("x" * 250 + ".mp4")
    assert len(temp_path_for(long_final).name) <= 255


# ------------------------------------------------------------------------------------------ publishing


def test_publish_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "out" / "sub" / "clip.mp4"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"old output")
    temp = temp_path_for(final)
    temp.write_bytes(b"new output")
    publish.publish(temp, final)
    assert final.read_bytes() == b"new output"
    assert stat.S_IMODE(final.stat().st_mode) == 0o644
    assert sorted(p.name for p in final.parent.iterdir()) == ["clip.mp4"]


def test_publish_creates_missing_folders(tmp_path: Path) -> None:
    temp = tmp_path / ".t.dashcamd-tmp-1-ab.mp4"
    temp.write_bytes(b"x")
    final = tmp_path / "a" / "b" / "clip.mp4"
    publish.publish(temp, final)
    assert final.read_bytes() == b"x" and not temp.exists()


def test_publish_failing_on_full_disk_is_transient_and_keeps_old_output(tmp_path: Path, monkeypatch) -> None:
    final = tmp_path / "clip.mp4"
    final.write_bytes(b"old output")
    temp = temp_path_for(final)
    temp.write_bytes(b"new output")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(TransientError, match="No space"):
        publish.publish(temp, final)
    assert final.read_bytes() == b"old output"


def test_remove_stale_temps_deletes_only_dead_writers_temps(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    sub = tmp_path / "2024"
    sub.mkdir()
    stale = [sub / f".a.mp4.dashcamd-tmp-{dead_pid}-0a1b2c3d.mp4",
             tmp_path / f".b.mp4.dashcamd-tmp-{os.getpid()}-ff.mp4"]
    live_other = tmp_path / ".c.mp4.dashcamd-tmp-1-ab.mp4"  # pid 1 is alive: another instance's work
    keep = [tmp_path / "clip.mp4", tmp_path / ".hidden.mp4", live_other]
    for path in stale + keep:
        path.write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / f".d.mp4.dashcamd-tmp-{dead_pid}-00.mp4").write_bytes(b"x")
    (tmp_path / "link").symlink_to(outside)  # not followed
    assert remove_stale_temps(tmp_path) == 2
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert len(list(outside.iterdir())) == 1


def test_encode_verify_publish_flow(tmp_path: Path) -> None:
    """The pipeline's order: temp beside the final name, encode into it (stays 0600), verify, publish."""
    from dashcamd.config import EncoderSettings
    from dashcamd.media import ClipReader, ClipWriter

    watch, out = tmp_path / "watch", tmp_path / "out"
    source = make_clip(watch / "day1" / "clip.MOV", seconds=0.5)
    final = output_path_for(source, watch, out, "_anon")
    temp = temp_path_for(final)
    with ClipReader(source) as reader, ClipWriter(temp, reader, EncoderSettings(preset="ultrafast")) as writer:
        for frame in reader.frames():
            writer.write(frame.picture, frame.pts)
    assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    verify_output(reader.info, temp, frames_dropped=reader.frames_dropped)
    publish.publish(temp, final)
    assert [p.name for p in final.parent.iterdir()] == ["clip_anon.mp4"]
    assert probe(final).frame_count == 15


# ------------------------------------------------------------------------------------------- verifying


def test_verify_output_accepts_a_faithful_copy(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mov", seconds=1.0)
    output = make_clip(tmp_path / "out.mp4", seconds=1.0)
    out = verify_output(probe(source), output)
    assert out.frame_count == 30


def test_verify_output_catches_a_time_base_that_loses_timestamps(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mkv", seconds=1.0)  # 1/1000
    output = make_clip(tmp_path / "out.mp4", seconds=1.0)  # 1/15360
    with pytest.raises(OutputMismatch, match="time base"):
        verify_output(probe(source), output)


def test_verify_output_catches_wrong_frame_count(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mp4", seconds=2.0)
    output = make_clip(tmp_path / "out.mp4", seconds=1.0)
    with pytest.raises(OutputMismatch, match="30 frames, source has 60") as caught:
        verify_output(probe(source), output)
    assert isinstance(caught.value, InvalidClip)
    assert "duration" in str(caught.value)
    # the reader's count of frames it had to skip widens the tolerance, and only that far
    verify_output(probe(source), output, frames_dropped=30)


def test_verify_output_catches_missing_audio_and_wrong_codec(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mp4", seconds=1.0, audio_streams=2)
    output = make_clip(tmp_path / "out.mp4", seconds=1.0, audio_streams=0, codec="mpeg4")
    with pytest.raises(OutputMismatch) as caught:
        verify_output(probe(source), output)
    message = str(caught.value)
    assert "0 audio streams, source has 2" in message and "mpeg4" in message


def test_verify_output_of_garbage_is_a_mismatch(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "src.mp4", seconds=0.5)
    output = tmp_path / "out.mp4"
    output.write_bytes(b"\0" * 100)
    with pytest.raises(OutputMismatch, match="unreadable"):
        verify_output(probe(source), output)


# ------------------------------------------------------------------------------------------- originals


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    watch, archive = tmp_path / "watch", tmp_path / "archive"
    source = watch / "2024" / "front" / "clip.mp4"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"original")
    return watch, archive, source


def test_keep_leaves_the_original(tree) -> None:
    watch, archive, source = tree
    assert apply_originals_policy(source, "keep", watch, archive) == source
    assert source.read_bytes() == b"original"


def test_delete_removes_the_original_and_is_idempotent(tree) -> None:
    watch, archive, source = tree
    assert apply_originals_policy(source, "delete", watch, None) is None
    assert not source.exists()
    assert apply_originals_policy(source, "delete", watch, None) is None


def test_move_keeps_sub_path_and_never_overwrites(tree) -> None:
    watch, archive, source = tree
    moved = apply_originals_policy(source, "move", watch, archive)
    assert moved == archive / "2024" / "front" / "clip.mp4"
    assert moved.read_bytes() == b"original" and not source.exists()
    source.write_bytes(b"second take")
    again = apply_originals_policy(source, "move", watch, archive)
    assert again == archive / "2024" / "front" / "clip-1.mp4"
    assert again.read_bytes() == b"second take"
    assert moved.read_bytes() == b"original"


def test_move_across_filesystems_copies_then_removes(tree, monkeypatch) -> None:
    watch, archive, source = tree
    (archive / "2024" / "front").mkdir(parents=True)
    (archive / "2024" / "front" / "clip.mp4").write_bytes(b"older")
    real_link = os.link

    def cross_device(src, dst, **kwargs):
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", cross_device)
    moved = apply_originals_policy(source, "move", watch, archive)
    assert moved == archive / "2024" / "front" / "clip-1.mp4"
    assert moved.read_bytes() == b"original" and not source.exists()
    assert sorted(p.name for p in moved.parent.iterdir()) == ["clip-1.mp4", "clip.mp4"]  # no temp left


def test_move_of_a_missing_original_is_transient(tree) -> None:
    watch, archive, source = tree
    source.unlink()
    with pytest.raises(TransientError):
        apply_originals_policy(source, "move", watch, archive)


def test_move_refuses_sources_outside_the_watch_folder(tree, tmp_path: Path) -> None:
    watch, archive, _ = tree
    stray = tmp_path / "stray.mp4"
    stray.write_bytes(b"x")
    with pytest.raises(ValueError):
        apply_originals_policy(stray, "move", watch, archive)
    assert stray.exists()
