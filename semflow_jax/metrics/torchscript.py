"""Reads the tensors of a TorchScript or `torch.save` zip archive without torch and without running any of it.

Such an archive is a zip holding `<prefix>/data.pkl` (a pickle of the module tree, or of a state dict),
`<prefix>/data/<key>` (the raw little-endian bytes of each storage) and, for TorchScript, the module's code
and `constants.pkl`. Unpickling an untrusted file can run arbitrary code, so the unpickler here resolves only
the few globals a tensor tree needs: module classes (`__torch__.*`) become inert `ScriptObject`s that record
their attributes, tensors become numpy arrays built from the storage bytes, and anything else is refused.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

from semflow_jax.errors import SemFlowError

# Typed storages as torch writes them in the persistent ids of its pickles.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# TorchScript pickles typed lists (List[int] attributes such as a conv's padding) through these helpers.
_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"}


class ScriptObject:
    """A pickled module (`__torch__.<type>`): its type name and its attributes, with none of its code."""

    type_name = ""

    def __init__(self, *args):
        if args:
            raise pickle.UnpicklingError(f"{self.type_name} built with arguments")
        self.attributes: dict = {}

    def __setstate__(self, state):
        # A scripted module pickles its attributes as one dict, applied by BUILD.
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.type_name} has a state of type {type(state).__name__}")
        self.attributes = dict(state)

    def __repr__(self):
        return f"ScriptObject({self.type_name}, {sorted(self.attributes)})"


class _StorageType:
    """The marker a storage class (`torch.FloatStorage`) resolves to: just its numpy dtype."""

    def __init__(self, name: str, dtype):
        self.name = name
        self.dtype = np.dtype(dtype)


def _bfloat16():
    import ml_dtypes  # a dependency of jax; numpy has no bfloat16 of its own

    return ml_dtypes.bfloat16


class _Unpickler(pickle.Unpickler):
    """Rebuilds tensors from `storage_dir` of the zip; any global outside the tensor-tree vocabulary fails."""

    def __init__(self, file, archive: zipfile.ZipFile, storage_dir: str):
        super().__init__(file)
        self._archive = archive
        self._storage_dir = storage_dir
        self._storages: dict[str, np.ndarray] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (ScriptObject,), {"type_name": qualname})
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name == "BFloat16Storage":
            return _StorageType(name, _bfloat16())
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict  # a tensor's (empty) backward hooks, or a torch.save state dict
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if (
            not isinstance(storage_type, _StorageType)
            or not isinstance(key, str)
            or not isinstance(numel, int)
        ):
            raise pickle.UnpicklingError(f"unexpected storage record {pid!r:.80}")
        if key not in self._storages:
            member = f"{self._storage_dir}/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise pickle.UnpicklingError(f"missing storage {member}") from None
            dtype = storage_type.dtype
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {member} has {len(raw)} bytes, expected {numel} x {dtype}"
                )
            self._storages[key] = np.frombuffer(raw, dtype.newbyteorder("<"))
        return self._storages[key]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    """A numpy copy of the tensor viewing `storage` at `storage_offset` with `size` and `stride` (elements)."""
    del requires_grad, backward_hooks, rest
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("a tensor without a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor size={size} stride={stride} runs past its storage of {storage.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
    )
    return np.array(view)  # contiguous, owned, native byte order


def load_archive(path: str) -> dict:
    """{"data": the unpickled root of data.pkl, "constants": that of constants.pkl or None} of a zip archive.

    Modules come back as `ScriptObject`s, tensors as numpy arrays; nothing in the archive is executed.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise SemFlowError(f"{path} is not a readable torch zip archive: {e}") from None
    with archive:
        names = archive.namelist()
        data = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(data) != 1:
            raise SemFlowError(f"{path}: expected one <prefix>/data.pkl in the zip, found {len(data)}")
        prefix = data[0].split("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise SemFlowError(f"{path}: only little-endian archives are supported")
        out = {"data": None, "constants": None}
        for stem in out:
            member = f"{prefix}/{stem}.pkl"
            if member not in names:
                continue
            with archive.open(member) as f:
                try:
                    out[stem] = _Unpickler(f, archive, f"{prefix}/{stem}").load()
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
                    raise SemFlowError(f"{path}: cannot read {member}: {e}") from None
    return out


def flatten_tensors(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{dotted.path: array} of every tensor in a tree of ScriptObjects, dicts and lists (list items by index)."""
    if isinstance(tree, np.ndarray):
        return {prefix: tree}
    if isinstance(tree, ScriptObject):
        items = tree.attributes.items()
    elif isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {}  # flags, ints, strings, None: configuration, not parameters
    out = {}
    for key, value in items:
        out.update(flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """{dotted.module.path: numpy array} of every parameter and buffer of a TorchScript / torch.save archive.

    Tensors of a TorchScript module's constants.pkl (used by its code, not its modules) are keyed
    `constants.<index>`.
    """
    return archive_tensors(load_archive(path), path)


def archive_tensors(archive: dict, path: str) -> dict[str, np.ndarray]:
    """read_tensors of an archive already loaded by load_archive (`path` names it in errors)."""
    tensors = flatten_tensors(archive["data"])
    constants = flatten_tensors(archive["constants"], "constants")
    if set(tensors) & set(constants):
        raise SemFlowError(f"{path}: a module attribute is named like a constant: {sorted(constants)[0]}")
    return {**tensors, **constants}
