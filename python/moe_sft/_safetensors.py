"""A small safetensors reader and writer without torch and without the ``safetensors`` package.

Why hand-written: the ``safetensors`` package's numpy path cannot hand out bf16 tensors (numpy has no bfloat16,
safetensors#598), while adapters and checkpoints are mostly bf16; here BF16 is ``ml_dtypes.bfloat16`` and
F8_E4M3 ``ml_dtypes.float8_e4m3fn``. It is shared by check_adapter, load_adapter / save_adapter and
load_experts.

The format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the data section, each tensor's bytes
row-major little-endian at [begin, end) of it.

Reading (SafetensorsFile) validates the whole header when the file is opened, before any tensor is handed out:
a malformed file (truncated, header length past the end or above 100 MB, header not UTF-8 JSON, unknown dtype,
bad shape, offsets outside the data or overlapping, shape x dtype != byte length) raises InvalidArgumentError
naming the file and the tensor, having allocated nothing beyond the header it read. Tensors are read-only
views of one memory map of the file: only what the caller touches is ever read. ``copy_into`` copies a tensor
(or a slice) into a caller's array and drops the mapped pages it read from this process's resident set, so
streaming a layer's weights into preallocated arrays costs their size, not twice that.

Writing (save_safetensors) produces files the ``safetensors`` package loads: header padded to 8 bytes with
spaces, tensors back to back with no holes, ordered by item size (largest first) then name, so every tensor
starts aligned to its item size.
"""
from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from ._errors import invalid

__all__ = ["SafetensorsFile", "save_safetensors", "DTYPES"]

# safetensors dtype code -> numpy dtype (little-endian)
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header
_PAGE = mmap.PAGESIZE


def read_json_object(path):
    """The JSON object in the file at ``path`` (a checkpoint's or an adapter's config, an index): a clear
    InvalidArgumentError naming the file when it is not UTF-8 JSON or not an object."""
    try:
        with open(path, "rb") as fh:
            value = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise invalid(f"{path} is not JSON ({err})") from None
    if not isinstance(value, dict):
        raise invalid(f"{path} is not a JSON object")
    return value


def dtype_code(dtype):
    """The safetensors code of a numpy dtype, or None."""
    return _CODES.get(np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype))


class SafetensorsFile(Mapping):
    """A .safetensors file opened for reading: a read-only mapping name -> tensor (a view of the memory map).

    ``keys()`` in file order; ``shape(name)``, ``dtype(name)`` (numpy), ``code(name)`` (safetensors code) and
    ``nbytes(name)`` without touching the data; ``metadata`` is the header's ``__metadata__`` (or {}).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        path = self.path
        try:
            f = open(path, "rb")
        except OSError as err:
            raise invalid(f"{path}: cannot open ({err.strerror})") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise invalid(f"{path} is not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                raise invalid(f"{path} is not a safetensors file: header length {header_len} exceeds the file "
                              f"({size} bytes): truncated, or not safetensors")
            if header_len > MAX_HEADER:
                raise invalid(f"{path}: header length {header_len} is above the {MAX_HEADER}-byte limit")
            raw = f.read(header_len)
            if len(raw) != header_len:
                raise invalid(f"{path}: the file was truncated while its header was read")
            try:
                header = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise invalid(f"{path} is not a safetensors file: its header is not UTF-8 ({err})") from None
            except ValueError as err:
                raise invalid(f"{path} is not a safetensors file: its header is not JSON ({err})") from None
            if not isinstance(header, dict):
                raise invalid(f"{path} is not a safetensors file: its header is not a JSON object")
            metadata = header.pop("__metadata__", None)
            if metadata is not None and not (isinstance(metadata, dict)
                                             and all(isinstance(v, str) for v in metadata.values())):
                raise invalid(f"{path}: __metadata__ must be a JSON object of strings, got {metadata!r}"[:300])
            self.metadata = dict(metadata or {})
            self._data_start = 8 + header_len
            self._data_size = size - self._data_start
            self._entries = {name: self._entry(name, info) for name, info in header.items()}
            self._check_overlaps()
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._base = None  # the map's address, for copy_into's page release

    def _bad(self, name, why):
        return invalid(f"{self.path}: tensor {name!r} {why}")

    def _entry(self, name, info):
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._bad(name, "lacks dtype, shape or data_offsets")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise self._bad(name, f"has dtype {code}; known dtypes: {', '.join(DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise self._bad(name, f"has shape {shape!r}; expected a list of non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= self._data_size):
            raise self._bad(name, f"has data_offsets {offsets!r} outside the data section (0 .. {self._data_size} "
                                  "bytes): truncated file or corrupt header")
        dtype = DTYPES[code]
        count = 1
        for d in shape:  # Python ints: a huge shape cannot overflow into a plausible size
            count *= d
        nbytes = count * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._bad(name, f"has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes) but dtype {code} and "
                                  f"shape {shape} need {nbytes} bytes")
        return code, dtype, tuple(shape), offsets[0], offsets[1]

    def _check_overlaps(self):
        spans = sorted((e[3], e[4], n) for n, e in self._entries.items() if e[4] > e[3])
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise invalid(f"{self.path}: tensor {n1!r} (data_offsets [{b1}, {e1}]) overlaps tensor {n0!r} "
                              f"(data_offsets [{b0}, {e0}])")

    # ---- Mapping ----
    def __getitem__(self, name):
        return self.get_tensor(name)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def _info(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def shape(self, name):
        return self._info(name)[2]

    def dtype(self, name):
        return self._info(name)[1]

    def code(self, name):
        return self._info(name)[0]

    def nbytes(self, name):
        info = self._info(name)
        return info[4] - info[3]

    def get_tensor(self, name):
        """The tensor as a read-only array viewing the memory map (nothing is read until it is used)."""
        code, dtype, shape, begin, end = self._info(name)
        if begin == end:
            a = np.empty(shape, dtype)
            a.flags.writeable = False
            return a
        return np.frombuffer(self._mm, dtype, (end - begin) // dtype.itemsize, self._data_start + begin).reshape(shape)

    def copy_into(self, name, out, index=None, raw=False):
        """Copies the tensor (or ``tensor[index]``) into the array ``out`` (numpy casting, e.g. f32 -> bf16
        round-to-nearest-even; ``raw``: the stored bytes as they are, viewed as ``out``'s dtype of the same item
        size, e.g. F8_E4M3 codes into uint8), then drops the mapped pages that were read from this process's
        resident set (they stay in the OS page cache)."""
        src = self.get_tensor(name)
        if raw:
            src = src.view(out.dtype)
        if index is not None:
            src = src[index]
        np.copyto(out, src, casting="unsafe")
        self.release(src)

    def release(self, view):
        """Drops the mapped pages behind ``view`` (a view returned by this file) from the resident set."""
        if not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or view.size == 0:
            return
        if self._base is None:
            self._base = np.frombuffer(self._mm, np.uint8, 1).__array_interface__["data"][0]
        lo = view.__array_interface__["data"][0]
        span = sum((n - 1) * s for n, s in zip(view.shape, view.strides))  # contiguous or forward-strided views
        start, end = lo - self._base, lo - self._base + span + view.itemsize
        if start < 0 or end > len(self._mm):
            return
        start -= start % _PAGE
        end = min(len(self._mm), end + (-end) % _PAGE)
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except OSError:
            pass

    def close(self):
        """Closes the map if no tensor view is alive (views keep it open otherwise)."""
        try:
            self._mm.close()
        except BufferError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def save_safetensors(path, tensors, metadata=None):
    """Writes ``tensors`` (a mapping name -> array of a dtype in DTYPES) to ``path`` in the safetensors format
    (through a temporary file renamed over ``path``, so a failed write leaves no partial file). ``metadata``:
    a dict of strings, stored as ``__metadata__``."""
    path = os.fspath(path)
    if not isinstance(tensors, Mapping):
        raise invalid(f"save_safetensors takes a mapping name -> array, got {type(tensors).__name__}")
    arrays = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise invalid(f"{path}: tensor name {name!r} must be a string other than '__metadata__'")
        a = np.asarray(a)
        code = dtype_code(a.dtype)
        if code is None:
            raise invalid(f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot store "
                          f"(known: {', '.join(DTYPES)})")
        arrays[name] = (code, a)
    if metadata is not None and not (isinstance(metadata, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                                         for k, v in metadata.items())):
        raise invalid(f"{path}: metadata must be a dict of strings, got {metadata!r}"[:300])
    order = sorted(arrays, key=lambda n: (-arrays[n][1].dtype.itemsize, n))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name in order:
        code, a = arrays[name]
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name in order:
                a = arrays[name][1]
                if a.size:
                    a = np.ascontiguousarray(a)
                    if a.dtype.byteorder == ">":
                        a = a.astype(a.dtype.newbyteorder("<"))
                    f.write(memoryview(a.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
