"""Streamed weight files are flax's msgpack files, byte for byte, both ways; bad files are one-line errors."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import serialization

from semflow_jax import weights_io
from semflow_jax.errors import SemFlowError


def _tree():
    rng = np.random.default_rng(0)
    return {
        "conv": {
            "kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
            "bias": np.zeros((8,), np.float32),
            "empty": np.zeros((0, 3), np.float32),
        },
        "half": rng.normal(size=(200,)).astype(np.float16),  # 400 bytes: 16-bit bin and ext lengths
        "ids": np.arange(70000, dtype=np.int32),  # 280 kB: 32-bit lengths
        "bf16": rng.normal(size=(5, 7)).astype(ml_dtypes.bfloat16),
        "transposed": rng.normal(size=(6, 4)).astype(np.float32).T,  # a non-contiguous view
        "zero_d": np.asarray(1.5, np.float32),  # a 16-byte payload: msgpack's fixext 16
        "scalar": np.float64(2.5),  # flax's numpy-scalar ext type
        "bytes": np.ones((1,), np.uint8),
        "Z_last_but_sorted": {"b": np.ones((2,), np.float32), "a": np.ones((3,), np.float32)},
        "nothing": {},
    }


def _same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y) and x.dtype == y.dtype and np.shape(x) == np.shape(y)
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


def test_written_file_is_flaxs_bytes_and_reads_back(tmp_path):
    tree = _tree()
    path = str(tmp_path / "w.msgpack")
    weights_io.write(path, tree)
    expected = serialization.msgpack_serialize(tree)
    assert open(path, "rb").read() == expected
    _same(weights_io.read(path), serialization.msgpack_restore(expected))
    _same(weights_io.read(path), tree)
    assert os.listdir(tmp_path) == ["w.msgpack"]  # no temporary file left


def test_large_arrays_are_chunked_as_flax_chunks_them(tmp_path, monkeypatch):
    # flax splits arrays above 1 GiB into chunks; the same layout at a 64-byte limit (over ten chunks, so
    # the chunk keys "10", "2", ... test the order too).
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)
    monkeypatch.setattr(weights_io, "MAX_CHUNK_SIZE", 64)
    tree = _tree()
    path = str(tmp_path / "w.msgpack")
    weights_io.write(path, tree)
    expected = serialization.msgpack_serialize(tree)
    assert open(path, "rb").read() == expected
    _same(weights_io.read(path), tree)
    _same(serialization.msgpack_restore(open(path, "rb").read()), tree)


def test_bad_files_are_one_line_errors_and_a_failed_write_leaves_nothing(tmp_path):
    path = str(tmp_path / "w.msgpack")
    weights_io.write(path, _tree())
    data = open(path, "rb").read()
    cases = {
        "truncated": (data[:-10], "ends inside its data"),
        "trailing": (data + b"\x00", "more than one object"),
        "garbage": (b"\xc1" * 8, "FormatError"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.msgpack"
        bad.write_bytes(content)
        with pytest.raises(SemFlowError, match=f"cannot read .*{name}.msgpack: .*{message}") as e:
            weights_io.read(str(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(SemFlowError, match="cannot read .*missing.msgpack"):
        weights_io.read(str(tmp_path / "missing.msgpack"))

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SemFlowError, match="dtype object"):
        weights_io.write(str(out / "w.msgpack"), {"a": np.ones(3), "b": np.array([None])})
    assert os.listdir(out) == []
