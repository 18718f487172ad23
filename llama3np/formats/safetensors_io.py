"""Read and write the safetensors format ourselves, with NumPy only (no torch, no `safetensors` package).

A `.safetensors` file is three parts:

    8 bytes      N, the length of the header, unsigned little-endian
    N bytes      JSON: {"__metadata__": {str: str}, name: {"dtype": "BF16", "shape": [...],
                        "data_offsets": [begin, end]}, ...}   (offsets count from the end of the header)
    the rest     every tensor's raw bytes, little-endian, C order, back to back

We memory-map the file and hand out views of it, so opening a 16 GB checkpoint costs nothing until a
tensor is read, and the loader can convert one tensor at a time into the model's arrays.

NumPy has no bfloat16. A bfloat16 is the top 16 bits of a float32 (same sign and exponent, 7 mantissa
bits instead of 23), so we keep BF16 tensors as uint16 words and widen them exactly with
`(u16.astype(np.uint32) << 16).view(np.float32)`; writing rounds float32 to the nearest bfloat16.
"""
import json
import mmap
import os
import struct

import numpy as np

from ..fileio import atomic_write

# safetensors dtype name -> how the raw words are stored in NumPy (BF16 as its uint16 bit pattern)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY_TO_NAME = {v: k for k, v in DTYPES.items() if k != "BF16"}  # keyed by little-endian dtypes
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit: a bigger header is corruption


# ----------------------------------------------------------------------------------------------------
# bfloat16 <-> float32


def bf16_to_f32(u16: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32, exactly: the bits become the top half."""
    if out is None:
        out = np.empty(u16.shape, dtype=np.float32)
    # write the shifted words straight into the float32 buffer: no float32 temporary
    np.left_shift(u16, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest with ties to even
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's mantissa into the exponent; keep a quiet NaN
        rounded[nan] = 0x7FC0
    return rounded


# ----------------------------------------------------------------------------------------------------
# reading


class SafeTensorsFile:
    """A memory-mapped safetensors file: `f.keys()`, `f.info(name) -> (dtype, shape)`,
    `f.raw(name)` (a read-only view; BF16 as uint16), `f.get(name, dtype)` (converted copy),
    `f.metadata`. Use as a context manager or call `close()`."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no safetensors file at {self.path}")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            if size < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, need at least 8)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"{self.path}: header length {n} does not fit the file of {size} bytes "
                                 "(truncated or not a safetensors file)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
            # mmap of the whole file; np.frombuffer over it is what np.memmap does, and keeping the mmap
            # object lets the loader give pages back (madvise) after copying a tensor out
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: the safetensors header must be a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._data_len = size - self._data_start
        self._buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self._info = {name: self._check_entry(name, e) for name, e in header.items()}

    def _check_entry(self, name, e):
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise ValueError(f"{where}: header entry must have dtype, shape and data_offsets, got {e!r}")
        dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        if dtype not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if any(not isinstance(s, int) or s < 0 for s in shape):
            raise ValueError(f"{where}: bad shape {list(shape)}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if not (0 <= begin <= end) or end - begin != nbytes:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] do not hold {nbytes} bytes "
                             f"for dtype {dtype} and shape {list(shape)}")
        if end > self._data_len:
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] go past the end of the data "
                             f"({self._data_len} bytes): the file is truncated")
        return dtype, shape, begin, end

    def keys(self):
        return list(self._info)

    def __contains__(self, name):
        return name in self._info

    def info(self, name):
        """(safetensors dtype name, shape) of a tensor."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def _entry(self, name):
        if name not in self._info:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return self._info[name]

    def raw(self, name) -> np.ndarray:
        """A read-only view of the stored words, shape as stored (BF16 comes as uint16)."""
        dtype, shape, begin, end = self._entry(name)
        start = self._data_start + begin
        return self._buf[start:start + (end - begin)].view(DTYPES[dtype]).reshape(shape)

    def get(self, name, dtype=np.float32) -> np.ndarray:
        """A tensor converted to a NumPy float dtype (a fresh array)."""
        return decode(self.raw(name), self.info(name)[0], dtype)

    def release(self, name):
        """Tell the OS we are done with a tensor's pages, so they stop counting in our resident memory."""
        _, _, begin, end = self._entry(name)
        if self._mmap is None or not hasattr(self._mmap, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self):
        self._buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the map closes when the view dies
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode(raw: np.ndarray, dtype_name: str, dtype=np.float32, out: np.ndarray = None) -> np.ndarray:
    """Stored words (as from `raw`) -> float `dtype`, into `out` if given (same shape as raw)."""
    dtype = np.dtype(dtype)
    if dtype_name not in FLOAT_DTYPES:
        raise ValueError(f"expected a floating-point tensor, got dtype {dtype_name}")
    if out is None:
        out = np.empty(raw.shape, dtype=dtype)
    if dtype_name == "BF16":
        if out.dtype == np.float32:
            bf16_to_f32(raw, out=out)
        else:
            out[...] = bf16_to_f32(raw)
    else:
        np.copyto(out, raw, casting="unsafe")
    return out


def load_file(path, dtype=None) -> dict:
    """Every tensor of a safetensors file as a NumPy array (a copy): floats converted to `dtype` if
    given, else kept in their stored dtype (BF16 widened to float32); integers as stored."""
    with SafeTensorsFile(path) as f:
        out = {}
        for k in f.keys():
            stored = f.info(k)[0]
            if stored in FLOAT_DTYPES and (dtype is not None or stored == "BF16"):
                out[k] = f.get(k, np.float32 if dtype is None else dtype)
            else:
                out[k] = f.raw(k).copy()
        return out


# ----------------------------------------------------------------------------------------------------
# writing


def save_file(tensors: dict, path, metadata: dict = None, bf16: bool = False) -> None:
    """Write `{name: array}` as safetensors, atomically (temp file in the same folder, fsync, rename).

    Arrays are written in their own dtype (float64/32/16 and ints); with `bf16=True` floating-point
    arrays are rounded to bfloat16. Tensors are converted and streamed one at a time, so writing needs
    at most one tensor's worth of extra memory.
    """
    path = os.fspath(path)
    header, plans, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        arr = np.asarray(arr)
        if bf16 and arr.dtype.kind == "f":
            dtype_name = "BF16"
        else:
            dtype_name = _NUMPY_TO_NAME.get(arr.dtype.newbyteorder("<"))
            if dtype_name is None:
                raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        nbytes = arr.size * DTYPES[dtype_name].itemsize
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        plans.append((arr, dtype_name))
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned, as the reference writer does

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for arr, dtype_name in plans:
            if dtype_name == "BF16":
                words = f32_to_bf16(arr.astype(np.float32, copy=False))
            else:
                words = np.ascontiguousarray(arr, dtype=DTYPES[dtype_name])
            f.write(memoryview(words.reshape(-1)).cast("B"))

    atomic_write(path, write)
