"""Reads PyTorch `.pth` / `.pth.tar` checkpoints without torch, safely.

A torch.save file (zip format, torch >= 1.6) is a zip archive holding `<name>/data.pkl` (a pickle of the
saved object) and one raw little- or big-endian storage per tensor under `<name>/data/<key>`. The pickle
refers to storages through persistent ids and rebuilds tensors with torch._utils._rebuild_tensor_v2.

Safety: the pickle is read with an Unpickler whose find_class only returns our own stand-ins for an
explicit allow-list of globals (tensor rebuilders, storage types, dtypes, OrderedDict,
argparse.Namespace, ...). Any other global (os.system, builtins.eval, torch.nn.Module, ...) is refused
with an UnsafeCheckpointError before anything runs, so a hostile checkpoint cannot execute code. Tensors
come back as numpy arrays (bfloat16 / float8 through ml_dtypes), copied out of their storage with their
own sizes, strides and offsets (non-contiguous views are materialised).

Resource limits: a small hostile file must not make the reader allocate much. Every storage record's
declared size (numel x itemsize from the pickle) is checked against the zip entry's real size before
it is read, and every tensor's (size, stride, offset) against its storage's actual byte size. All
bytes the reader allocates (storage records read, tensors materialised, the pickle) count against one
budget, `max_bytes` (default 4 x the file size + 64 MiB: a real checkpoint materialises each storage
about once, while a stride-0 tensor or a compressed 1 GiB record in a 1 MB file exceeds it); going
over is a CheckpointError naming the storage record, raised before the allocation.

Legacy (pre-1.6, non-zip) checkpoints are refused with an explanation of how to re-save them.
"""
import argparse
import collections
import io
import math
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """The file is not a readable torch checkpoint."""


class UnsafeCheckpointError(CheckpointError):
  """The pickle names a global outside the allow-list."""


# Storage classes torch pickles (torch.storage._dtype_to_storage_type_map) -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "UntypedStorage": np.dtype(np.uint8),  # bytes; _rebuild_tensor_v3 says the real dtype
}

# torch.<dtype> globals (pickled by _rebuild_tensor_v3 for dtypes without a legacy storage class).
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


class _StorageType:
  """Stand-in for torch.<X>Storage: only carries the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _TorchDtype:

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_TORCH_DTYPES[name])


_MIB = 1 << 20


class _Budget:
  """Bytes the reader may still allocate; `take` refuses (before allocating) what would exceed it."""

  def __init__(self, path: str, limit: int):
    self.path = path
    self.limit = int(limit)
    self.used = 0

  def take(self, nbytes: int, what: str) -> None:
    if nbytes > self.limit - self.used:
      raise CheckpointError(
          f"{self.path}: {what} needs {nbytes} bytes, beyond the reader's limit ({self.used} of "
          f"{self.limit} bytes already used; max_bytes defaults to 4 x the file size + 64 MiB). "
          f"A checkpoint this size is hostile or malformed; pass max_bytes to load_pth if it is real")
    self.used += nbytes


class _Storage:
  """A loaded storage: raw bytes plus the dtype its storage class declares."""

  def __init__(self, key: str, data: bytes, dtype: np.dtype, numel: int, byteorder: str,
               budget: _Budget):
    self.key = key
    self.data = data
    self.dtype = dtype
    self.numel = numel
    self.byteorder = byteorder
    self.budget = budget

  def as_array(self, dtype: np.dtype) -> np.ndarray:
    count = len(self.data) // dtype.itemsize
    arr = np.frombuffer(self.data, dtype=dtype, count=count)
    if self.byteorder == "big" and dtype.itemsize > 1:
      arr = arr.byteswap()
    return arr


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    dtype=None, metadata=None):
  """numpy copy of torch's Tensor.set_(storage, offset, size, stride)."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
  np_dtype = dtype.dtype if isinstance(dtype, _TorchDtype) else storage.dtype
  flat = storage.as_array(np_dtype)
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise CheckpointError(f"storage {storage.key}: invalid tensor geometry size={size} "
                          f"stride={stride} offset={offset}")
  if 0 in size:
    return np.zeros(size, np_dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(f"storage {storage.key}: tensor of size {size}, stride {stride}, offset "
                          f"{offset} reaches element {last} but the storage holds {flat.size}")
  # The copy below allocates numel x itemsize, however few bytes the storage has (stride 0 repeats).
  storage.budget.take(math.prod(size) * flat.itemsize,
                      f"tensor of size {size} stride {stride} on storage {storage.key}")
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, copy=True, order="C")  # contiguous and independent of the archive buffer


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


class _TensorType:
  """Stand-in for torch.Tensor / torch.nn.Parameter as the `type` of _rebuild_from_type_v2."""

  def __init__(self, name):
    self.name = name


def _rebuild_from_type_v2(func, new_type, args, state):
  del state  # Python attributes set on a tensor (e.g. by subclasses); irrelevant for weights
  if not isinstance(new_type, _TensorType):
    raise UnsafeCheckpointError(f"tensor subclass {new_type!r} is not allowed")
  return func(*args)


def _numpy_scalar(dtype, data=None):
  # numpy.core.multiarray.scalar(dtype, bytes): a numpy scalar stored by value (e.g. best_acc1).
  dtype = np.dtype(dtype)
  if dtype.hasobject:
    raise UnsafeCheckpointError("numpy object scalars are not allowed")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(name, align=False, copy=False):
  if not isinstance(name, str):
    raise UnsafeCheckpointError(f"numpy dtype from {type(name).__name__} is not allowed")
  dt = np.dtype(name, align=bool(align), copy=bool(copy))
  if dt.hasobject:
    raise UnsafeCheckpointError("numpy object dtypes are not allowed")
  return dt


def _codecs_encode(text, encoding="latin1"):
  # pickle protocol 2 stores Python 3 bytes as _codecs.encode(str, "latin1").
  if encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return text.encode("latin1")


# The allow-list: (module, name) -> the object the pickle gets. Nothing else is importable.
_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
_ALLOWED[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
_ALLOWED.update({("torch", name): _TorchDtype(name) for name in _TORCH_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, budget: _Budget):
    super().__init__(file, encoding="utf-8")
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._budget = budget
    self._storages: Dict[str, _Storage] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"checkpoint refers to the global {module}.{name}, which is not on the allow-list of "
          f"tensor/container types; refusing to load it (it could run code)") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if isinstance(storage_type, _TorchDtype):  # some writers record a dtype instead of a class
      dtype = storage_type.dtype
    elif isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    else:
      raise CheckpointError(f"storage {key!r} has unknown type {storage_type!r}")
    key = str(key)
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        info = self._archive.getinfo(name)
      except KeyError:
        raise CheckpointError(f"checkpoint is missing storage record {name}") from None
      if not isinstance(numel, int) or numel < 0:
        raise CheckpointError(f"storage {name}: invalid element count {numel!r}")
      expected = numel * dtype.itemsize
      # Declared size against the record's real size, before reading anything.
      if info.file_size < expected:
        raise CheckpointError(f"storage {name} holds {info.file_size} bytes, expected {expected} "
                              f"({numel} x {dtype})")
      # The whole record is read (the zip CRC is only checked at its end): its real size is what
      # gets allocated, so that is what counts (a compressed record may expand far beyond the file).
      self._budget.take(info.file_size, f"storage record {name}")
      data = self._archive.read(info)
      self._storages[key] = _Storage(name, data[:expected], dtype, numel, self._byteorder,
                                     self._budget)
    return self._storages[key]


def _is_legacy(head: bytes) -> bool:
  # Legacy torch.save files start with a pickled magic number (protocol 2: b"\x80\x02\x8a\x0a...");
  # very old ones are tar archives.
  return head[:2] == b"\x80\x02" or head[257:262] == b"ustar"


def load_pth(path: str, *, max_bytes: Optional[int] = None) -> Any:
  """The object torch.save wrote to `path`, with tensors as numpy arrays.

  Raises FileNotFoundError, or CheckpointError (a ValueError) for truncated/corrupt files, legacy
  files, files needing more than `max_bytes` of memory (default 4 x the file size + 64 MiB), and
  UnsafeCheckpointError for pickles naming globals outside the allow-list.
  """
  if os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path} is a directory, not a .pth file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(512)
  if not zipfile.is_zipfile(path):
    if _is_legacy(head):
      raise CheckpointError(
          f"{path} is a legacy (pre-zip, torch < 1.6) checkpoint, which this reader does not parse; "
          f"re-save it with a current torch: torch.save(torch.load(p, weights_only=False), new_path)")
    raise CheckpointError(f"{path} is not a torch zip checkpoint (truncated, corrupt, or another "
                          f"format); first bytes {head[:8]!r}")
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pkl) != 1:
        raise CheckpointError(f"{path}: expected one <name>/data.pkl record, found {pkl or 'none'}")
      prefix = pkl[0][:-len("data.pkl")]
      byteorder = "little"
      if f"{prefix}byteorder" in names:
        if archive.getinfo(f"{prefix}byteorder").file_size > 16:
          raise CheckpointError(f"{path}: byteorder record is not 'little' or 'big'")
        byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        if byteorder not in ("little", "big"):
          raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
      if max_bytes is None:
        max_bytes = 4 * os.path.getsize(path) + 64 * _MIB
      budget = _Budget(path, max_bytes)
      budget.take(archive.getinfo(pkl[0]).file_size, f"pickle record {pkl[0]}")
      data = archive.read(pkl[0])
      unpickler = _RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder, budget)
      return unpickler.load()
  except CheckpointError:
    raise
  except Exception as e:  # zipfile/pickle/struct errors of a damaged file, malformed opcodes, ...
    raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from e
