"""media.py against real tiny clips: probe refusals, decode → encode round trips, side streams, threads."""

from __future__ import annotations

import os
import queue
import re
import shutil
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from media_factory import (
    BAR_COLORS_RGB,
    corrupt_video_packets,
    make_audio_only,
    make_clip,
    make_text_file_named_mp4,
    make_zero_byte,
    read_packets,
    truncate_moov,
    video_pts,
)

from dashcamd.config import EncoderSettings
from dashcamd.errors import InvalidClip, TransientError
from dashcamd.media import ClipInfo, ClipReader, ClipWriter, probe
from dashcamd.picture import Picture
from dashcamd.publish import verify_output

FAST = EncoderSettings(crf=28, preset="ultrafast")


def transcode(source: Path, output: Path, settings: EncoderSettings = FAST) -> ClipReader:
    """The pipeline's use of the API, single-threaded; returns the spent reader (for its counters)."""
    with ClipReader(source) as reader, ClipWriter(output, reader, settings) as writer:
        for frame in reader.frames():
            writer.write(frame.picture, frame.pts)
    return reader


def frame_times(path: Path) -> list[Fraction]:
    with av.open(str(path)) as container:
        tb = container.streams.video[0].time_base
    return [pts * tb for pts in video_pts(path)]


# ---------------------------------------------------------------------------------------------- probe


def test_probe_reads_stream_info(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "a.mp4", width=320, height=240, seconds=1.0, fps=30, audio_streams=2)
    info = probe(clip)
    assert isinstance(info, ClipInfo)
    assert (info.width, info.height, info.video_codec) == (320, 240, "h264")
    assert info.frame_count == 30 and info.frame_count_exact
    assert info.avg_fps == 30
    assert info.duration_s == pytest.approx(1.0, abs=1e-3)
    assert info.audio_streams == 2 and info.has_audio and info.other_streams == 0
    assert info.rotation_deg == 0


def test_probe_counts_frames_of_mkv_by_scanning(tmp_path: Path) -> None:
    info = probe(make_clip(tmp_path / "a.mkv", seconds=1.0))  # MKV has no frame count in its header
    assert info.frame_count == 30 and info.frame_count_exact


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (make_zero_byte, "empty"),
        (make_text_file_named_mp4, "not a media file"),
        (lambda p: truncate_moov(make_clip(p, seconds=1.0)), "moov"),
        (make_audio_only, "no video stream"),
    ],
    ids=["zero-byte", "text-as-mp4", "no-moov", "audio-only"],
)
def test_probe_refuses_broken_files_with_a_reason(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path / "clip.mp4")
    with pytest.raises(InvalidClip, match=reason):
        probe(path)


def test_probe_of_missing_file_is_transient(tmp_path: Path) -> None:
    with pytest.raises(TransientError):
        probe(tmp_path / "gone.mp4")


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("small.mp4", {"width": 160, "height": 96}),
        ("qvga.mp4", {"width": 320, "height": 240, "fps": Fraction(30000, 1001)}),
        ("odd.mp4", {"width": 161, "height": 97}),
        ("hevc.mp4", {"codec": "hevc"}),
        ("mjpeg.avi", {"codec": "mjpeg", "audio_codec": "pcm_s16le", "width": 161, "height": 121}),
        ("mpeg4.mkv", {"codec": "mpeg4"}),
        ("camera.ts", {}),
        ("phone.mov", {"rotation": 90, "creation_time": "2024-05-01T10:00:00.000000Z"}),
        ("mulaw.mov", {"audio_codec": "pcm_mulaw"}),
    ],
)
def test_round_trip_gives_h264_with_same_frames_and_streams(tmp_path: Path, name: str, kwargs: dict) -> None:
    source = make_clip(tmp_path / name, seconds=1.0, **kwargs)
    output = tmp_path / "out.mp4"
    reader = transcode(source, output)
    info = probe(source)
    out = verify_output(info, output, frames_dropped=reader.frames_dropped)
    assert reader.frames_dropped == 0 and reader.decode_errors == 0
    assert (out.video_codec, out.pix_fmt) == ("h264", "yuv420p")
    assert out.frame_count == info.frame_count
    assert out.duration_s == pytest.approx(info.duration_s, abs=info.frame_duration_s)
    assert (out.width, out.height) == (info.width + info.width % 2, info.height + info.height % 2)
    assert out.audio_streams == info.audio_streams == 1
    assert out.rotation_deg == info.rotation_deg
    assert out.creation_time == info.creation_time
    with av.open(str(output)) as container:
        assert container.format.name.startswith("mov,mp4")
        # frame-exact time stamps; mp4 edit lists round a start offset to the 1 ms movie timescale
        source_times, output_times = frame_times(source), frame_times(output)
        assert len(source_times) == len(output_times)
        assert all(abs(a - b) <= Fraction(1, 1000) for a, b in zip(source_times, output_times))


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mkv"])
def test_vfr_clip_keeps_its_timestamps(tmp_path: Path, name: str) -> None:
    source = make_clip(tmp_path / name, seconds=1.0, vfr=True)
    output = tmp_path / "out.mp4"
    transcode(source, output)
    times = frame_times(source)
    gaps = {b - a for a, b in zip(times, times[1:])}
    assert len(gaps) > 2  # really variable
    assert frame_times(output) == times
    verify_output(probe(source), output)


def start_times(path: Path) -> dict[str, Fraction]:
    with av.open(str(path)) as container:
        return {s.type: s.start_time * s.time_base for s in container.streams}


def test_late_starting_ts_is_shifted_to_zero_keeping_av_sync(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "camera.ts", seconds=1.0, start_seconds=10.0)
    output = tmp_path / "out.mp4"
    transcode(source, output)
    before, after = start_times(source), start_times(output)
    assert before["video"] == 10 and after["video"] < Fraction(1, 20)
    lip_sync = (before["video"] - before["audio"]) - (after["video"] - after["audio"])
    assert abs(lip_sync) <= Fraction(1, 1000)  # mp4 edit lists count in milliseconds
    source_times, output_times = frame_times(source), frame_times(output)
    assert [t - source_times[0] for t in source_times] == [t - output_times[0] for t in output_times]
    verify_output(probe(source), output)


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".mov"])
def test_audio_packets_are_copied_bit_exact(tmp_path: Path, suffix: str) -> None:
    source = make_clip(tmp_path / f"two{suffix}", seconds=1.0, audio_streams=2)
    output = tmp_path / "out.mp4"
    transcode(source, output)
    source_packets, output_packets = read_packets(source), read_packets(output)
    assert len(output_packets) == 2
    assert output_packets == source_packets
    assert source_packets[0] != source_packets[1]  # 440 Hz and 660 Hz, not one stream twice


def test_subtitles_copied_timecode_kept_second_camera_never_copied(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "dual.mp4", seconds=2.0, subtitles=True, timecode="10:00:00:00",
                       second_video=(160, 96))
    output = tmp_path / "out.mp4"
    transcode(source, output)
    with av.open(str(output)) as container:
        videos = container.streams.video
        assert len(videos) == 1 and videos[0].codec_context.width == 320  # the main (largest) camera
        assert videos[0].metadata.get("timecode") == "10:00:00:00"
    # the MP4 muxer fills gaps between cues with empty samples; the cues themselves are unchanged
    def cues(path: Path) -> list[list[bytes]]:
        return [[p for p in track if p != b"\0\0"] for track in read_packets(path, "subtitle")]

    assert cues(output) == cues(source) == [[b"\0\x05GPS 0", b"\0\x06GPS 30"]]
    verify_output(probe(source), output)


def test_clip_without_audio_gives_output_without_audio(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "mute.mp4", audio_streams=0)
    output = tmp_path / "out.mp4"
    transcode(source, output)
    out = verify_output(probe(source), output)
    assert not out.has_audio


@pytest.mark.parametrize(("size", "matrix"), [((320, 240), "bt601"), ((1280, 720), "bt709")])
def test_colours_survive_decode_and_encode(tmp_path: Path, size: tuple[int, int], matrix: str) -> None:
    source = make_clip(tmp_path / "bars.mp4", width=size[0], height=size[1], seconds=0.1, pattern="bars",
                       audio_streams=0)
    output = tmp_path / "out.mp4"
    transcode(source, output, EncoderSettings(crf=12, preset="ultrafast"))
    assert probe(output).color_matrix == probe(source).color_matrix == matrix
    with ClipReader(output, detector_size=(size[1], size[0])) as reader:  # full size: plain YUV -> RGB
        rgb = next(iter(reader.frames())).detector_rgb
    edges = np.linspace(0, size[0], len(BAR_COLORS_RGB) + 1).astype(int)
    for color, x0, x1 in zip(BAR_COLORS_RGB, edges[:-1], edges[1:]):
        patch = rgb[size[1] // 4 : 3 * size[1] // 4, x0 + 4 : x1 - 4].reshape(-1, 3).mean(axis=0)
        assert np.abs(patch - color).max() < 8, (color, patch)


def test_reader_also_gives_frames_shrunk_for_the_detector(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "bars.mp4", width=640, height=360, seconds=0.2, pattern="bars", audio_streams=0)
    with ClipReader(source, detector_size=(90, 160)) as reader:
        shrunk = [frame.detector_rgb for frame in reader.frames()]
    with ClipReader(source, detector_size=(360, 640)) as reader:
        full = [frame.detector_rgb for frame in reader.frames()]
    with ClipReader(source) as reader:
        assert all(f.detector_rgb is None for f in reader.frames())
    assert len(shrunk) == len(full) > 0
    for small, rgb in zip(shrunk, full):
        assert small.shape == (90, 160, 3) and rgb.shape == (360, 640, 3)
        # Area averaging of the same picture: the full frame shrunk by 4x4 blocks, up to rounding and
        # the bar edges (each bar is 640/7 px wide, not a multiple of 4).
        blocks = rgb.reshape(90, 4, 160, 4, 3).astype(float).mean(axis=(1, 3))
        assert np.median(np.abs(blocks - small)) <= 1.0


# ------------------------------------------------------------------------------------------ corruption


def test_a_few_corrupt_packets_are_skipped_and_counted(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "bitrot.mp4", seconds=2.0)
    corrupt_video_packets(source, [20, 45])
    output = tmp_path / "out.mp4"
    reader = transcode(source, output)
    assert reader.decode_errors == 2
    assert 1 <= reader.frames_dropped <= 5
    assert reader.frames_decoded == 60 - reader.frames_dropped
    verify_output(probe(source), output, frames_dropped=reader.frames_dropped)


def test_mostly_corrupt_clip_is_invalid(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "bitrot.mp4", seconds=2.0, audio_streams=0)
    corrupt_video_packets(source, range(10, 50, 3))
    with pytest.raises(InvalidClip, match="corrupt|decodable"):
        transcode(source, tmp_path / "out.mp4")


# ---------------------------------------------------------------------------------------- writer rules


def test_writer_in_its_own_thread_holds_only_the_look_ahead(tmp_path: Path) -> None:
    """decode thread → bounded queue → encode thread, as the pipeline runs it; the side channel stays small."""
    source = make_clip(tmp_path / "long.mp4", seconds=2.0, audio_streams=2)
    output = tmp_path / "out.mp4"
    look_ahead = 8
    handoff: queue.Queue = queue.Queue(maxsize=look_ahead)
    pending_side: list[int] = []
    failures: list[BaseException] = []
    with ClipReader(source) as reader, ClipWriter(output, reader, FAST) as writer:
        frames = reader.frames()

        def decode() -> None:
            try:
                for frame in frames:
                    handoff.put(frame)
            except BaseException as error:  # handed to the test thread
                failures.append(error)
            handoff.put(None)

        def encode() -> None:
            try:
                while (frame := handoff.get()) is not None:
                    writer.write(frame.picture, frame.pts)
                    pending_side.append(len(writer._channel.items))
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=decode), threading.Thread(target=encode)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
    assert not failures
    # What is held is the audio of the look-ahead (+ a frame in each thread, + the factory's 0.1 s
    # audio lead): 2 tracks × ~0.5 s of 1024-sample AAC packets, not the clip's 2 × 94.
    bound = 2 * int(((look_ahead + 3) / 30 + 0.15) / (1024 / 48_000) + 1)
    assert max(pending_side) <= bound < sum(len(track) for track in read_packets(source)) / 3
    assert read_packets(output) == read_packets(source)
    verify_output(probe(source), output)


def test_missing_and_repeated_pts_still_give_every_frame(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "a.mp4", seconds=0.5, audio_streams=0)
    output = tmp_path / "out.mp4"
    with ClipReader(source) as reader, ClipWriter(output, reader, FAST) as writer:
        for frame in reader.frames():
            writer.write(frame.picture, None if frame.index % 3 == 0 else 0)
    assert probe(output).frame_count == 15


def test_writer_refuses_frames_of_another_size(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "a.mp4", seconds=0.2, audio_streams=0)
    with ClipReader(source) as reader, ClipWriter(tmp_path / "out.mp4", reader, FAST) as writer:
        with pytest.raises(ValueError, match="picture must be"):
            writer.write(Picture.blank(10, 10), 0)


def test_writer_must_exist_before_reading_starts(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "a.mp4", seconds=0.2)
    with ClipReader(source) as reader:
        reader.frames()
        with pytest.raises(RuntimeError, match="before iterating"):
            ClipWriter(tmp_path / "out.mp4", reader, FAST)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_writing_is_transient(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "a.mp4", seconds=1.0)
    full = tmp_path / "full.mp4"
    full.symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(TransientError, match="write failed"):
        transcode(source, full)


def test_reader_source_changed_under_it_is_not_silently_short(tmp_path: Path) -> None:
    """A clip truncated after probing (still being copied) fails instead of giving a short output."""
    source = make_clip(tmp_path / "a.mp4", seconds=2.0, audio_streams=0)
    info = probe(source)
    truncated = tmp_path / "b.mp4"
    shutil.copy(source, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 3)
    with pytest.raises(InvalidClip):
        reader = ClipReader(truncated, info=info)
        with reader:
            for _ in reader.frames():
                pass


def _x264_settings_line(path: Path) -> str:
    """The options x264 records in its SEI message at the start of the stream."""
    found = re.search(rb"options: ([^\x00]*)", path.read_bytes())
    assert found, "no x264 SEI in the output"
    return found.group(1).decode("ascii", "replace")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (EncoderSettings(), ["subme=1 ", "analyse=0x3:0x3 ", "crf=19.0"]),  # veryfast + dashcamd's tuning
        (EncoderSettings(x264_params=""), ["subme=2 ", "analyse=0x3:0x113 "]),  # plain veryfast
        (EncoderSettings(preset="ultrafast"), ["subme=0 "]),  # the tuning is veryfast's only
        (EncoderSettings(x264_params="subme=3:bframes=1"), ["subme=3 ", "bframes=1 "]),
    ],
)
def test_writer_encodes_with_the_configured_x264_options(tmp_path: Path, settings, expected) -> None:
    source = make_clip(tmp_path / "in.mp4", seconds=0.3)
    transcode(source, tmp_path / "out.mp4", settings)
    line = _x264_settings_line(tmp_path / "out.mp4")
    assert all(option in line for option in expected), line
