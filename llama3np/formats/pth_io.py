"""Read PyTorch `.pth` files (Meta's `consolidated.00.pth`) without PyTorch.

Since PyTorch 1.6, `torch.save` writes a zip archive (stored, not compressed):

    <name>/data.pkl     a pickle of the state dict; each tensor pickles as a call
                          torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
                        whose `storage` is a "persistent id"
                          ("storage", torch.BFloat16Storage, key, device, numel)
    <name>/data/<key>   the raw little-endian bytes of each storage
    <name>/byteorder    "little"

So we unpickle with a restricted `pickle.Unpickler`: `persistent_load` turns a persistent id into a
NumPy view of the storage's bytes (memory-mapped, read lazily), and `find_class` maps the handful of
torch functions a state dict uses to our own functions that build NumPy views with the same offset,
shape and strides. Any other global is refused, so loading a checkpoint cannot run arbitrary code (a
plain `pickle.load` of an untrusted file can).

Tensors come back as `PthTensor(dtype, array)`: `dtype` is the safetensors-style name ("BF16", "F32", ...)
and `array` a read-only view of the stored words (BF16 as uint16) — convert with
`safetensors_io.decode(t.array, t.dtype, np.float32)`.
"""
import collections
import mmap
import os
import pickle
import struct
import zipfile
from typing import NamedTuple

import numpy as np

from .safetensors_io import DTYPES


class PthTensor(NamedTuple):
    dtype: str  # "BF16", "F16", "F32", ... (the safetensors names)
    array: np.ndarray  # the stored words, shaped and strided like the tensor
    release: object = None  # call once copied: drops the storage's file pages from resident memory

    @property
    def shape(self):
        return self.array.shape


# torch storage class -> safetensors dtype name
_STORAGES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


class _StorageType:
    """Stands in for `torch.BFloat16Storage` etc. inside the pickle: it only remembers the dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Our `torch._utils._rebuild_tensor_v2`: a strided view of the storage's words."""
    dtype, words, release = storage
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"bad tensor layout: size {size}, stride {stride}")
    # the last element a view can reach must lie inside the storage, else as_strided would read garbage
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if not all(size):  # an empty tensor reads nothing
        last = storage_offset - 1
    if storage_offset < 0 or last >= len(words):
        raise ValueError(f"tensor of size {size}, stride {stride}, offset {storage_offset} does not fit "
                         f"its storage of {len(words)} elements (truncated file?)")
    item = words.itemsize
    view = np.lib.stride_tricks.as_strided(words[storage_offset:] if all(size) else words[:0], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return PthTensor(dtype, view, release)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data  # an nn.Parameter is just its tensor here


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a weights file should only hold tensors "
            f"(allowed: {sorted(m + '.' + n for m, n in _ALLOWED)} and torch.*Storage)")

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return self._load_storage(storage_type.dtype, str(key), int(numel))


def _releaser(mm, start, nbytes):
    """A function that tells the OS we are done with these bytes of the map (madvise DONTNEED): the
    pages stop counting as our memory; reading them again would fetch them from the file."""
    def release():
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED") and nbytes > 0:
            first = start // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, first, start + nbytes - first)
    return release


def load_pth(path) -> dict:
    """The state dict of a `torch.save` zip file: {name: PthTensor}, views of a memory map (no copies)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .pth file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip archive: only the zip format of torch.save (PyTorch >= 1.6) "
                         "can be read without PyTorch")
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        names = z.namelist()
        pkls = [n for n in names if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one */data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        size = os.path.getsize(path)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mm, dtype=np.uint8)

        def load_storage(dtype, key, numel):
            member = prefix + "data/" + key
            try:
                info = z.getinfo(member)
            except KeyError:
                raise ValueError(f"{path}: storage {member} is missing from the archive") from None
            nbytes = numel * DTYPES[dtype].itemsize
            if info.file_size < nbytes:
                raise ValueError(f"{path}: storage {member} has {info.file_size} bytes, "
                                 f"expected {nbytes} ({numel} x {dtype})")
            if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses, but a re-zip might
                return dtype, np.frombuffer(z.read(member)[:nbytes], dtype=DTYPES[dtype]), None
            # a zip member's bytes follow its 30-byte local header, file name and extra field
            local = buf[info.header_offset:info.header_offset + 30].tobytes()
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: corrupt zip entry for {member}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + nbytes > size:
                raise ValueError(f"{path}: storage {member} goes past the end of the file (truncated)")
            return dtype, buf[start:start + nbytes].view(DTYPES[dtype]), _releaser(mm, start, nbytes)

        with z.open(pkls[0]) as pkl:
            try:
                state = _Unpickler(pkl, load_storage).load()
            except pickle.UnpicklingError as e:
                raise ValueError(f"{path}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got {type(state).__name__}")
    return state


def load_pth_with_torch(path) -> dict:
    """The fallback when our reader cannot handle a file (e.g. the legacy pre-1.6 format): torch.load."""
    import torch  # only here: PyTorch is optional

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)  # legacy files cannot mmap
    out = {}
    for k, v in state.items():
        if v.dtype == torch.bfloat16:
            out[k] = PthTensor("BF16", v.view(torch.int16).numpy().view(np.uint16))
        else:
            t = v.numpy()
            name = {np.dtype(d): n for n, d in DTYPES.items() if n != "BF16"}.get(t.dtype.newbyteorder("<"))
            out[k] = PthTensor(name, t)
    return out
