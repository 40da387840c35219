"""The label-alignment segmenter: its cache identity, its loss, and refusing a segmenter made for other data."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes as shapes_config
from semflow_jax import segmenter, sharding
from semflow_jax.errors import SemFlowError


def test_cache_folder_depends_on_the_data_and_the_settings():
    base = shapes_config.get_config("tiny")
    same = shapes_config.get_config("tiny")
    assert segmenter.cache_dir(base) == segmenter.cache_dir(same)
    assert segmenter.cache_dir(base).startswith(os.environ["SEMFLOW_CACHE"])  # tests never touch ~/.cache
    for key, value in (
        ("seed", 1),
        ("data.image_size", 32),
        ("segmenter.steps", 11),
        ("data.num_classes", 4),
    ):
        other = shapes_config.get_config("tiny")
        section, _, name = key.rpartition(".")
        (other[section] if section else other)[name] = value
        assert segmenter.cache_dir(other) != segmenter.cache_dir(base), key
    # Evaluation settings do not change which segmenter judges the images.
    other = shapes_config.get_config("tiny")
    other.eval.num_examples, other.flow.steps = 8, 5
    assert segmenter.cache_dir(other) == segmenter.cache_dir(base)


def test_cross_entropy_leaves_ignore_pixels_out():
    logits = jnp.asarray([[[[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]]]])  # [1, 1, 3, 2]
    labels = jnp.asarray([[[0, 1, 255]]], jnp.uint8)
    want = float(np.log1p(np.exp(-2.0)))  # both counted pixels: softmax CE of a margin of 2
    assert float(segmenter.cross_entropy(logits, labels)) == pytest.approx(want, rel=1e-6)
    assert float(segmenter.cross_entropy(logits, jnp.full_like(labels, 255))) == 0.0


def test_a_segmenter_for_other_data_is_refused(tmp_path):
    config = shapes_config.get_config("tiny")
    meta = {**segmenter.identity(config), "image_hw": [32, 32], "validation_miou": 50.0}
    (tmp_path / segmenter.META).write_text(json.dumps(meta))
    mesh = sharding.mesh_from_config(config.mesh)
    with pytest.raises(SemFlowError, match=r"trained with image_hw=\[32, 32\], not \[16, 16\]"):
        segmenter.load(config, mesh, str(tmp_path))
    with pytest.raises(SemFlowError, match="no segmenter in"):
        segmenter.load(config, mesh, str(tmp_path / "empty"), train_if_missing=False)
