"""Getting an output safely in place: output/temp naming, verification, fsync + atomic rename, originals policy.

Nothing here touches a source before its output is verified and durably published.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Literal, NoReturn

import structlog

from dashcamd.errors import InvalidClip, TransientError
from dashcamd.media import OUTPUT_CODEC, ClipInfo, probe

log = structlog.get_logger(__name__)

OUTPUT_SUFFIX = ".mp4"
TEMP_MARKER = ".dashcamd-tmp-"
# ".<final name>.dashcamd-tmp-<pid>-<hex>.mp4": hidden, so the watcher and people ignore it.
_TEMP_RE = re.compile(r"^\..*" + re.escape(TEMP_MARKER) + r"(?P<pid>\d+)-[0-9a-f]+(\.[A-Za-z0-9]+)?$")
_NAME_MAX = 255
# Output names stop short of NAME_MAX so that the names derived from them still fit: the boxes
# sidecar (".boxes.jsonl" for ".mp4", +8 bytes) and the collision rename ("a.mov.mp4", +4 or 5).
_OUTPUT_NAME_MAX = _NAME_MAX - 16
_SHORTENED_MARK = "~"
# Disk and I/O failures that may pass: the job is retried later instead of failing for good.
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ESTALE, errno.EAGAIN})
# link() failing because of the filesystem, not the name: fall back to copying.
_NO_LINK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK})

OriginalsPolicy = Literal["keep", "move", "delete"]


class OutputMismatch(InvalidClip):
    """The encoded file does not match its source (frames, duration, streams): never published."""


# -------------------------------------------------------------------------------------------- naming


def output_path_for(source: Path, watch_root: Path, output_root: Path, suffix: str) -> Path:
    """``output_root / <sub-path of source under watch_root> / <stem><suffix>.mp4``.

    Raises ValueError for anything that would land outside ``output_root``: a source outside its watch
    folder, ``..`` tricks, a suffix with separators, or a folder on the way that is a symlink.
    """
    if "/" in suffix or "\\" in suffix or "\0" in suffix:
        raise ValueError(f"suffix {suffix!r} must not contain path separators")
    source_abs = Path(os.path.abspath(source))
    try:
        relative = source_abs.relative_to(os.path.abspath(watch_root))
    except ValueError:
        raise ValueError(f"{source} is not inside watch folder {watch_root}") from None
    if not relative.parts or relative.name in ("", ".", ".."):
        raise ValueError(f"{source} names no file inside {watch_root}")
    name = _fit_name(Path(relative.name).stem, f"{suffix}{OUTPUT_SUFFIX}")
    root = Path(os.path.abspath(output_root))
    final = root.joinpath(*relative.parts[:-1], name)
    _refuse_escape(final, root)
    return final


def _fit_name(stem: str, tail: str) -> str:
    """``stem + tail``, or, when that is too long for the filesystem in UTF-8, the stem cut short and
    marked with a hash of the whole stem, so two long names that share a beginning stay apart."""
    name = stem + tail
    if len(name.encode()) <= _OUTPUT_NAME_MAX:
        return name
    mark = f"{_SHORTENED_MARK}{hashlib.sha256(stem.encode()).hexdigest()[:10]}"
    room = _OUTPUT_NAME_MAX - len((mark + tail).encode())
    head = stem.encode()[:room].decode(errors="ignore")  # never half a multi-byte character
    return f"{head}{mark}{tail}"


def _refuse_escape(path: Path, root: Path) -> None:
    """No existing folder between ``root`` and ``path`` may be a symlink, and the result stays in root."""
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise ValueError(f"{current} is a symlink; refusing to write through it")
    if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
        raise ValueError(f"{path} resolves outside {root}")


def temp_path_for(final: Path) -> Path:
    """Create and return an empty hidden temp file beside ``final`` (same folder → rename is atomic).

    Mode 0600 while incomplete (0644 once published); O_EXCL reserves the name against other workers.
    Creates the folder if needed. Disk full / quota / I/O → TransientError.
    """
    final = Path(final)
    _makedirs_durable(final.parent)
    tail = f"{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}{final.suffix}"
    head = final.name[: _NAME_MAX - len(tail) - 1]
    temp = final.parent / f".{head}{tail}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as failed:
        _raise_typed(failed, f"cannot create temp file in {final.parent}")
    os.close(fd)
    return temp


def is_temp_name(name: str) -> bool:
    """True for names temp_path_for makes (for watchers and clean-up)."""
    return _TEMP_RE.match(name) is not None


# ------------------------------------------------------------------------------------------ verifying


def verify_output(source: ClipInfo, output: Path, *, frames_dropped: int = 0) -> ClipInfo:
    """Check the encoded ``output`` against its source's info; returns the output's info.

    Checks: H.264 yuv420p video; frame count within ±1 of the source's (less the ``frames_dropped``
    the reader skipped as corrupt, see ``ClipReader.frames_dropped``); duration within one frame
    (plus the dropped ones); the same frame rate (2 %) and an equivalent time base (every source
    timestamp representable); size (rounded up to even), rotation; the same number of audio streams.
    Raises OutputMismatch (an InvalidClip) listing every mismatch; TransientError if unreadable.
    """
    try:
        out = probe(output)
    except InvalidClip as unreadable:
        raise OutputMismatch(f"output unreadable: {unreadable}") from unreadable
    problems: list[str] = []
    if out.video_codec != OUTPUT_CODEC or out.pix_fmt != "yuv420p":
        problems.append(f"video is {out.video_codec}/{out.pix_fmt}, expected {OUTPUT_CODEC}/yuv420p")
    slack = 1 if source.frame_count_exact else max(1, round(0.02 * source.frame_count))
    low, high = source.frame_count - frames_dropped - slack, source.frame_count + slack
    if not low <= out.frame_count <= high:
        problems.append(f"{out.frame_count} frames, source has {source.frame_count} ({frames_dropped} dropped)")
    frame_s = source.frame_duration_s
    if abs(out.duration_s - source.duration_s) > frame_s * (1 + frames_dropped) + 1e-3:
        problems.append(f"duration {out.duration_s:.3f} s, source {source.duration_s:.3f} s")
    source_rate = _effective_fps(source)
    out_rate = _effective_fps(out)
    if source_rate and abs(out_rate - source_rate) > 0.02 * source_rate + frames_dropped / max(out.duration_s, 1e-3):
        problems.append(f"{out_rate:.3f} fps, source {source_rate:.3f} fps")
    if (Fraction(source.time_base) / Fraction(out.time_base)).denominator != 1:
        problems.append(f"time base {out.time_base} cannot hold the source's {source.time_base}")
    if (out.width, out.height) != (source.width + source.width % 2, source.height + source.height % 2):
        problems.append(f"size {out.width}x{out.height}, source {source.width}x{source.height}")
    if out.rotation_deg != source.rotation_deg:
        problems.append(f"rotation {out.rotation_deg}°, source {source.rotation_deg}°")
    if out.audio_streams != source.audio_streams:
        problems.append(f"{out.audio_streams} audio streams, source has {source.audio_streams}")
    if problems:
        raise OutputMismatch(f"{output} does not match {source.path}: " + "; ".join(problems))
    return out


def _effective_fps(info: ClipInfo) -> float:
    """Frames per second actually shown (container rate fields are guesses for VFR MKV/TS)."""
    if info.frame_count and info.duration_s > 0:
        return info.frame_count / info.duration_s
    return float(info.avg_fps)


# ----------------------------------------------------------------------------------------- publishing


def publish(temp: Path, final: Path) -> None:
    """Make ``temp`` durable and visible as ``final``: fsync file, chmod 0644, rename, fsync folder.

    ``final`` is replaced if it exists (re-processing a clip is idempotent). Same folder, so the
    rename is atomic: readers see the old file or the complete new one, never a partial one.
    """
    temp, final = Path(temp), Path(final)
    try:
        _makedirs_durable(final.parent)
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temp, 0o644)
        os.replace(temp, final)
        _fsync_dir(final.parent)
    except FileNotFoundError as gone:
        raise TransientError(f"cannot publish {final}: {gone.filename} vanished") from gone
    except OSError as failed:
        _raise_typed(failed, f"cannot publish {final}")


def remove_stale_temps(output_root: Path) -> int:
    """Delete temp files a crashed run left under ``output_root``; returns how many.

    Call at start-up, before any worker runs. A temp whose pid is a live process other than this one
    is kept (another dashcamd may share the folder). Symlinks are neither followed nor removed.
    """
    removed = 0
    for path in _walk_files(Path(output_root)):
        match = _TEMP_RE.match(path.name)
        if match is None or path.is_symlink():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as failed:
            log.warning("stale_temp_not_removed", path=str(path), error=failed.strerror)
    if removed:
        log.info("stale_temps_removed", output_root=str(output_root), count=removed)
    return removed


def _walk_files(root: Path) -> Iterator[Path]:
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            yield Path(folder) / name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed worker nobody has reaped yet (containers without an init that reaps) writes nothing more;
    found by tests/test_faults.py: its temp survived the restart after a kill -9 of the whole daemon."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] == "Z"


# ------------------------------------------------------------------------------------------ originals


def apply_originals_policy(
    source: Path, policy: OriginalsPolicy, watch_root: Path, archive_root: Path | None
) -> Path | None:
    """After publish: keep (returns ``source``), move under ``archive_root`` keeping the sub-path
    (returns the new path; never overwrites: ``name-1.mp4``, ``name-2.mp4``...), or delete (None).

    A missing source is a TransientError for "move" (it may come back, e.g. a remounted card) and
    already done for "delete".
    """
    source = Path(source)
    if policy == "keep":
        return source
    if policy == "delete":
        try:
            source.unlink()
        except FileNotFoundError:
            return None
        except OSError as failed:
            _raise_typed(failed, f"cannot delete original {source}")
        _fsync_dir(source.parent)
        return None
    if policy != "move":
        raise ValueError(f"unknown originals policy {policy!r}")
    if archive_root is None:
        raise ValueError("originals = 'move' needs an archive folder")
    try:
        relative = Path(os.path.abspath(source)).relative_to(os.path.abspath(watch_root))
    except ValueError:
        raise ValueError(f"{source} is not inside watch folder {watch_root}") from None
    if not source.exists():
        raise TransientError(f"original {source} is missing; cannot archive it")
    root = Path(os.path.abspath(archive_root))
    target = root.joinpath(*relative.parts)
    _refuse_escape(target, root)
    try:
        _makedirs_durable(target.parent)
        moved = _move_no_clobber(source, target)
    except FileNotFoundError as gone:
        raise TransientError(f"original {source} vanished while archiving") from gone
    except OSError as failed:
        _raise_typed(failed, f"cannot archive {source}")
    log.info("original_archived", source=str(source), archived=str(moved))
    return moved


def _candidates(target: Path) -> Iterator[Path]:
    yield target
    for n in range(1, 10_000):
        yield target.with_name(f"{target.stem}-{n}{target.suffix}")


def _move_no_clobber(source: Path, target: Path) -> Path:
    """Move without ever replacing an existing file.

    Same filesystem: link() fails atomically if the name is taken, then unlink the source. Other
    filesystem (or one without hard links): copy to a hidden temp beside the target, fsync, claim the
    name the same way (or by exists-check + rename where links are unsupported), then unlink the source.
    """
    try:
        claimed = _claim_name(source, target)
    except OSError as failed:
        if failed.errno not in _NO_LINK_ERRNOS:
            raise
        claimed = None
    if claimed is None:
        staged = temp_path_for(target)
        try:
            shutil.copy2(source, staged)
            fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            claimed = _claim_name(staged, target, rename_fallback=True)
        finally:
            staged.unlink(missing_ok=True)
    _fsync_dir(claimed.parent)
    source.unlink()
    _fsync_dir(source.parent)
    return claimed


def _claim_name(existing: Path, target: Path, *, rename_fallback: bool = False) -> Path:
    """Hard-link ``existing`` at the first free name among target, target-1, ...; returns that name."""
    for candidate in _candidates(target):
        try:
            os.link(existing, candidate, follow_symlinks=False)
            return candidate
        except FileExistsError:
            continue
        except OSError as no_links:
            if not rename_fallback or no_links.errno not in _NO_LINK_ERRNOS:
                raise
            if candidate.exists():
                continue
            os.rename(existing, candidate)  # a tiny race, only on filesystems without links
            return candidate
    raise FileExistsError(errno.EEXIST, "no free archive name", str(target))


# --------------------------------------------------------------------------------------------- helpers


def _makedirs_durable(folder: Path) -> None:
    """mkdir -p, fsyncing each new folder's parent so the new entries survive a power cut."""
    missing: list[Path] = []
    current = Path(folder)
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    try:
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(new.parent)
    except OSError as failed:
        _raise_typed(failed, f"cannot create folder {folder}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as failed:
        if failed.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync folders
            raise
    finally:
        os.close(fd)


def _raise_typed(failed: OSError, what: str) -> NoReturn:
    """Disk full, quota, I/O, read-only, permissions → TransientError (retry later); others re-raised."""
    if failed.errno in _TRANSIENT_ERRNOS or isinstance(failed, (PermissionError, FileNotFoundError)):
        raise TransientError(f"{what}: {failed.strerror or failed}") from failed
    raise failed
