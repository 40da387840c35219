"""Weight files in flax's msgpack format, streamed: written tensor by tensor and read without a whole-file copy.

`flax.serialization.msgpack_serialize` builds the whole file in memory before it can be written (for SD 1.5's
UNet, 3.2 GiB of bytes plus the packer's growing buffer beside the 3.4 GiB of weights), and `msgpack_restore`
wants the whole file as one bytes object. Here the same bytes go to the file one tensor at a time and come
back from it one object at a time, so converting or loading weights holds little more than the weights. The
files are byte for byte what flax writes and read back by flax (tests/test_weights_io.py checks both ways).
"""

from __future__ import annotations

import os
import struct

import msgpack
import numpy as np

from semflow_jax.errors import SemFlowError, atomic_open, first_line

_NDARRAY, _NPSCALAR = 1, 3  # flax's msgpack ExtType codes for an ndarray and a numpy scalar
MAX_CHUNK_SIZE = 2**30  # flax's: larger arrays are stored as a dict of chunks
_CHUNKED = "__msgpack_chunked_array__"


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 2**16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def _ext_header(code: int, n: int) -> bytes:
    fixed = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    if n in fixed:
        return fixed[n] + struct.pack(">b", code)
    if n < 2**8:
        return b"\xc7" + struct.pack(">Bb", n, code)
    if n < 2**16:
        return b"\xc8" + struct.pack(">Hb", n, code)
    return b"\xc9" + struct.pack(">Ib", n, code)


def _chunked(arr: np.ndarray) -> dict:
    """flax's layout of an array above MAX_CHUNK_SIZE bytes: its shape and flat chunks, keyed "0", "1", ..."""
    flat = arr.reshape(-1)
    step = max(1, MAX_CHUNK_SIZE // arr.dtype.itemsize)
    chunks = [flat[i : i + step] for i in range(0, flat.size, step)]
    return {
        _CHUNKED: True,
        "shape": {str(i): d for i, d in enumerate(arr.shape)},
        "chunks": {str(i): c for i, c in enumerate(chunks)},
    }


def _write_node(f, packer: msgpack.Packer, node, keep_order: bool = False) -> None:
    if isinstance(node, dict):
        f.write(packer.pack_map_header(len(node)))
        # flax copies the tree first (a jax tree_map, which sorts each dict's keys), then chunks the large
        # arrays: the chunked layout keeps its own order.
        keep_order = keep_order or _CHUNKED in node
        for key in node if keep_order else sorted(node):
            f.write(packer.pack(key))
            _write_node(f, packer, node[key], keep_order)
        return
    if not hasattr(node, "shape"):  # a Python scalar (the chunked layout's flag and sizes)
        f.write(packer.pack(node))
        return
    code = _NPSCALAR if isinstance(node, np.generic) else _NDARRAY
    arr = np.asarray(node)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # one tensor's copy at most (a transposed view)
    if arr.dtype.hasobject or arr.dtype.isalignedstruct:
        raise SemFlowError(f"cannot store an array of dtype {arr.dtype} as weights")
    if arr.size * arr.dtype.itemsize > MAX_CHUNK_SIZE:
        _write_node(f, packer, _chunked(arr))
        return
    # The ext's payload is msgpack of (shape, dtype name, raw bytes), as flax's _ndarray_to_bytes packs it.
    head = packer.pack_array_header(3) + packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name)
    head += _bin_header(arr.nbytes)
    f.write(_ext_header(code, len(head) + arr.nbytes) + head)
    f.write(arr.reshape(-1).view(np.uint8).data)


def write(path: str, tree) -> None:
    """Writes `tree` (nested dicts of str -> arrays) to path as flax msgpack; atomically (a temporary file
    renamed into place), so a failure leaves no half-written file."""
    with atomic_open(path) as f:
        _write_node(f, msgpack.Packer(use_bin_type=True), tree)


def _ext_hook(code: int, data: bytes):
    if code not in (_NDARRAY, _NPSCALAR):
        return msgpack.ExtType(code, data)
    shape, name, buffer = msgpack.unpackb(data, raw=True)
    arr = np.frombuffer(buffer, dtype=_dtype(name.decode())).reshape(shape)
    return arr[()] if code == _NPSCALAR else arr


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, float8_*: numpy knows them only as ml_dtypes' types
        return np.dtype(getattr(ml_dtypes, name))


def _unchunk(node):
    if not isinstance(node, dict):
        return node
    if node.get(_CHUNKED):
        shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in node.items()}


def read(path: str):
    """The tree of a flax msgpack file, read from the file in pieces (never the whole file in one buffer)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(
                f,
                ext_hook=_ext_hook,
                raw=False,
                strict_map_key=False,
                max_buffer_size=max(size, 2**20),
            )
            try:
                tree = unpacker.unpack()
            except msgpack.OutOfData:
                raise ValueError("the file ends inside its data (truncated?)") from None
            try:
                unpacker.unpack()
            except msgpack.OutOfData:
                pass
            else:
                raise ValueError("more than one object in the file")
    except (OSError, ValueError, TypeError, AttributeError, msgpack.UnpackException) as e:
        raise SemFlowError(f"cannot read {path}: {first_line(e)}") from None
    return _unchunk(tree)
