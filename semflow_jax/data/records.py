"""ArrayRecord shards of checked examples: the serialized form, the writer, and a grain source over shards.

A record is msgpack {"id": str, "image": PNG/JPEG bytes, "label": PNG bytes of train ids}: the label mapping,
CelebAMask's part merge and every check are done once, at conversion. Shards of split S are
`DST/S.array_record-00000-of-0000N`; grain reads them by index from local disk or, where array_record has
the file system for it, from cloud storage paths.
"""

from __future__ import annotations

import io
import os

import msgpack
import numpy as np
from PIL import Image

from semflow_jax.errors import SemFlowError


def encode(example: dict, image_bytes: bytes | None = None) -> bytes:
    """Serializes a decoded example; image_bytes, when given, are the original file's (no re-encoding)."""
    if image_bytes is None:
        buf = io.BytesIO()
        Image.fromarray(example["image"]).save(buf, format="PNG")
        image_bytes = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(example["label"]).save(buf, format="PNG")
    return msgpack.packb({"id": example["id"], "image": image_bytes, "label": buf.getvalue()})


def decode_record(data: bytes) -> dict:
    """The example of one record: uint8 image [H, W, 3], uint8 label [H, W], id."""
    rec = msgpack.unpackb(data)
    with Image.open(io.BytesIO(rec["image"])) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(io.BytesIO(rec["label"])) as im:
        label = np.asarray(im)
    return {"image": image, "label": label, "id": rec["id"], "ok": True}


def shard_paths(dst: str, split: str, num_shards: int) -> list[str]:
    """The file names of split's shards."""
    return [os.path.join(dst, f"{split}.array_record-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]


def write_shard(path: str, records: list[bytes]) -> None:
    """Writes one shard; readers never see it half-written (temporary name, then rename)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = f"{path}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group_size 1: cheapest random access
    for r in records:
        writer.write(r)
    writer.close()
    os.replace(tmp, path)


def find_shards(root: str, split: str) -> list[str]:
    """Sorted shard paths of split under root (local folder, or a cloud path array_record can read)."""
    from etils import epath  # local folders and cloud storage paths (gs://...) alike

    try:
        found = epath.Path(root).glob(f"{split}.array_record-*-of-*")
        paths = sorted(str(p) for p in found if not p.name.endswith(".partial") and ".tmp" not in p.name)
    except (OSError, ValueError) as e:
        raise SemFlowError(f"cannot list {root}: {e}") from None
    if not paths:
        raise SemFlowError(
            f"no {split} ArrayRecord shards in {root} (make them with python -m semflow_jax.data.prepare)"
        )
    return paths


class RecordSource:
    """grain random-access source over a split's ArrayRecord shards; decodes on access."""

    def __init__(self, root: str, split: str):
        import grain

        self.paths = find_shards(root, split)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._source[int(index)])
