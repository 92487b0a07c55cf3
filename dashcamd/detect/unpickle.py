"""Reads ``torch.save`` zip archives through an allow-listed unpickler: a checkpoint is data, never code.

Known YOLOv5 / ``torch.nn`` classes become inert ``Inert`` stand-ins that only record the state pickle
hands them; tensors are rebuilt from the archive's raw storages; any other global is refused before it is
looked up, so nothing from the file runs.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar

import numpy as np
import torch

from dashcamd.detect.errors import CheckpointError, UnsafeCheckpointError

try:  # numpy >= 2 pickles its reconstructors under numpy._core, older files name numpy.core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray


class Inert:
    """Stand-in for an allow-listed class: keeps constructor args and pickled state, runs nothing."""

    global_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = super().__new__(cls)
        obj.reduce_args = args
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: ``__new__`` recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD passes the instance __dict__, or (dict, slot_dict) for classes with __slots__.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state

    def __repr__(self) -> str:
        return f"<Inert {self.global_name}>"


# Classes whose pickled instances become Inert stand-ins: the YOLOv5 module tree and its torch.nn parts.
_INERT_GLOBALS = {
    "models.yolo": {"Model", "DetectionModel", "Detect"},
    "models.common": {"Conv", "C3", "Bottleneck", "SPPF", "SPP", "Focus", "Concat", "BottleneckCSP", "DWConv"},
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.batchnorm": {"BatchNorm2d"},
    "torch.nn.modules.activation": {"SiLU", "Hardswish", "LeakyReLU", "ReLU"},
    "torch.nn.modules.linear": {"Identity"},
    "torch.nn.modules.upsampling": {"Upsample"},
    "torch.nn.modules.pooling": {"MaxPool2d"},
    "torch.nn.modules.container": {"Sequential", "ModuleList"},
    "argparse": {"Namespace"},
}

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """What ``torch.<X>Storage`` resolves to: only its dtype is needed to read the raw bytes."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_ignored: Any) -> torch.Tensor:
    # as_strided checks the view against the storage's length, so a lying header cannot read past it.
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_ignored: Any) -> torch.Tensor:
    return data


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Pickle protocol 2 stores bytes as codecs.encode(str, "latin1"); no other codec is needed.
    if encoding != "latin1":
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _bytes(*args: Any) -> bytes:
    if args and not isinstance(args[0], bytes | bytearray):
        raise UnsafeCheckpointError("refusing builtins.bytes with a non-bytes argument")
    return bytes(*args)


def _posix_path_text(*parts: str) -> str:
    # Paths in training options are kept as text: a WindowsPath cannot even be built on Linux.
    return str(PurePosixPath(*parts))


def _windows_path_text(*parts: str) -> str:
    return str(PureWindowsPath(*parts))


_SAFE_CALLABLES: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytes"): _bytes,
    ("_codecs", "encode"): _latin1_bytes,
    ("pathlib", "PosixPath"): _posix_path_text,
    ("pathlib", "WindowsPath"): _windows_path_text,
    ("pathlib._local", "PosixPath"): _posix_path_text,
    ("pathlib._local", "WindowsPath"): _windows_path_text,
    ("pathlib", "PurePosixPath"): _posix_path_text,
    ("pathlib", "PureWindowsPath"): _windows_path_text,
    # numpy scalars and arrays in training metadata (best_fitness); numpy's own reconstructors only
    # build arrays/scalars from bytes and already-unpickled objects.
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
}

class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from the open zip archive."""

    def __init__(self, data_pkl: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(data_pkl)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        # Fresh stand-in classes per file: pickle's BUILD can set attributes on a class it references,
        # and such a change must not outlive this load.
        self._inert_classes: dict[str, type[Inert]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 2 modules (__builtin__.set); map them as pickle itself would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if name in _INERT_GLOBALS.get(module, ()):
            global_name = f"{module}.{name}"
            if global_name not in self._inert_classes:
                self._inert_classes[global_name] = type(name, (Inert,), {"global_name": global_name})
            return self._inert_classes[global_name]
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeCheckpointError(f"checkpoint references the global {module}.{name}, which is not allowed")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A flat tensor over one raw storage of the archive: pid = ('storage', type, key, location, numel)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise UnsafeCheckpointError(f"unexpected storage reference {pid!r}")
        if key not in self._storages:
            raw = bytearray(self._archive.read(f"{self._prefix}/data/{key}"))
            itemsize = torch.empty(0, dtype=storage_type.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise CheckpointError(f"storage {key}: {len(raw)} bytes for {numel} elements")
            self._storages[key] = (torch.frombuffer(raw, dtype=storage_type.dtype) if raw
                                   else torch.empty(0, dtype=storage_type.dtype))
        return self._storages[key]


def read_torch_archive(path: Path) -> Any:
    """Unpickle a ``torch.save`` zip archive (torch >= 1.6) with the restricted unpickler.

    Returns plain containers, CPU tensors (views of the file's storages, original dtypes), numpy values
    and ``Inert`` stand-ins. Raises UnsafeCheckpointError on any global outside the allow-list, and
    CheckpointError when the file is not a readable little-endian torch zip archive.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip archive (files from torch < 1.6 are not supported)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: expected one <archive>/data.pkl, found {len(pickles)}")
            prefix = pickles[0].split("/")[0]
            if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder") != b"little":
                raise CheckpointError(f"{path}: big-endian archives are not supported")
            with archive.open(pickles[0]) as data_pkl:
                return _RestrictedUnpickler(data_pkl, archive, prefix).load()
    except (zipfile.BadZipFile, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable torch archive: {e}") from e
