"""Published layouts, generated here in miniature: exact label mappings, splits, aligned augmentation,
bad-data errors, ArrayRecord conversion, and the folder config end to end."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from semflow_jax import config_lib
from semflow_jax.data import augment, classes, folders, pipeline, prepare, records
from semflow_jax.errors import SemFlowError


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def every_value(values, h=16, w=16, shift=0):
    """An [h, w] uint8 mask cycling through `values` (so every raw id appears)."""
    flat = np.resize(np.roll(np.asarray(values, np.uint8), shift), h * w)
    return flat.reshape(h, w)


def read_all(name, root, split, num_classes):
    src = folders.RawSource(name, folders.list_examples(name, root, split), num_classes)
    return [src[i] for i in range(len(src))], src


# --- COCO-Stuff ---------------------------------------------------------------------------------------------
def test_coco_stuff_layout_and_all_182_ids(tmp_path):
    raw_ids = list(range(182)) + [255]
    for split, n in (("train2017", 3), ("val2017", 2)):
        for i in range(n):
            stem = f"{i:012d}"
            save(tmp_path / split / f"{stem}.jpg", rgb(16, 16, i))
            save(
                tmp_path / "stuffthingmaps_trainval2017" / split / f"{stem}.png",
                every_value(raw_ids, shift=i),
            )
    unused = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}  # never-annotated COCO thing ids, 0-based
    expected = {}
    train_id = 0
    for raw in range(182):
        if raw in unused:
            expected[raw] = 255
        else:
            expected[raw] = train_id
            train_id += 1
    expected[255] = 255
    assert train_id == 171
    examples, _ = read_all("coco_stuff", str(tmp_path), "train", 171)
    assert len(examples) == 3 and len(folders.list_examples("coco_stuff", str(tmp_path), "validation")) == 2
    for i, ex in enumerate(examples):
        raw = every_value(raw_ids, shift=i)
        for r, t in expected.items():
            assert (ex["label"][raw == r] == t).all(), (r, t)
        assert ex["image"].shape == (16, 16, 3) and ex["id"] == f"{i:012d}"
    assert classes.COCO_NAMES[0] == "person" and classes.COCO_NAMES[-1] == "wood"
    assert classes.COCO_NAMES[11] == "stop sign"  # street sign (raw 11) is gone


# --- Cityscapes -----------------------------------------------------------------------------------------------
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def test_cityscapes_layout_and_label_ids(tmp_path):
    sizes = {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}}
    for split, cities in sizes.items():
        for city, n in cities.items():
            for i in range(n):
                prefix = f"{city}_{i:06d}_000019"
                save(tmp_path / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", rgb(8, 16, i))
                save(
                    tmp_path / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png",
                    every_value(range(34), 8, 16, i),
                )
                save(
                    tmp_path / "gtFine" / split / city / f"{prefix}_gtFine_color.png", rgb(8, 16, 9)
                )  # ignored
    examples, _ = read_all("cityscapes", str(tmp_path), "train", 19)
    assert [e["id"] for e in examples] == [
        "aachen_000000_000019",
        "aachen_000001_000019",
        "bochum_000000_000019",
    ]
    assert len(folders.list_examples("cityscapes", str(tmp_path), "validation")) == 2
    raw = every_value(range(34), 8, 16, 0)
    for label_id in range(34):
        want = CITYSCAPES_TRAIN_IDS.get(label_id, 255)
        assert (examples[0]["label"][raw == label_id] == want).all(), label_id
    assert classes.CITYSCAPES_PALETTE[0].tolist() == [128, 64, 128]  # road, the official colour


# --- CelebAMask-HQ ------------------------------------------------------------------------------------------
def test_celebamask_parts_merge_in_official_order_and_split(tmp_path):
    # orig_idx decides the split: < 162770 train, < 182637 val, else test (CelebA's partition).
    origs = [5, 162769, 162770, 182636, 182637]
    with open(tmp_path / "CelebA-HQ-to-CelebA-mapping.txt", "w") as f:
        f.write("idx  orig_idx  orig_file\n")
        for idx, orig in enumerate(origs):
            f.write(f"{idx}  {orig}  {orig + 1:06d}.jpg\n")
    for idx in range(len(origs)):
        save(tmp_path / "CelebA-HQ-img" / f"{idx}.jpg", rgb(32, 32, idx))  # images 2x the masks, as published
        anno = tmp_path / "CelebAMask-HQ-mask-anno" / str(idx // 2000)
        skin = np.zeros((16, 16), np.uint8)
        skin[2:14, 2:14] = 255
        hair = np.zeros((16, 16), np.uint8)
        hair[:6] = 255
        nose = np.zeros((16, 16), np.uint8)
        nose[7:9, 7:9] = 255
        for part, m in (("skin", skin), ("hair", hair), ("nose", nose)):
            save(anno / f"{idx:05d}_{part}.png", m)
    sizes = {
        s: len(folders.list_examples("celebamask", str(tmp_path), s)) for s in ("train", "validation", "test")
    }
    assert sizes == {"train": 2, "validation": 2, "test": 1}
    examples, _ = read_all("celebamask", str(tmp_path), "train", 19)
    label = examples[0]["label"]
    assert examples[0]["image"].shape == (16, 16, 3)  # resized to the mask
    skin_id, nose_id, hair_id = (classes.CELEBAMASK_NAMES.index(p) for p in ("skin", "nose", "hair"))
    assert (skin_id, nose_id, hair_id) == (1, 2, 13)
    assert label[0, 0] == hair_id and label[4, 4] == hair_id  # hair (13th part) is painted over skin
    assert label[10, 3] == skin_id and label[7, 7] == nose_id and label[15, 15] == 0


# --- ADE20K -----------------------------------------------------------------------------------------------------
def test_ade20k_zero_is_ignore(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            stem = f"ADE_{split[:5]}_{i:08d}"
            save(root / "images" / split / f"{stem}.jpg", rgb(16, 16, i))
            save(root / "annotations" / split / f"{stem}.png", every_value(range(151), shift=i))
    examples, _ = read_all("ade20k", str(tmp_path), "train", 150)  # the parent folder works too
    assert len(examples) == 2 and len(folders.list_examples("ade20k", str(root), "validation")) == 1
    raw = every_value(range(151), shift=0)
    assert (examples[0]["label"][raw == 0] == 255).all()
    for r in range(1, 151):
        assert (examples[0]["label"][raw == r] == r - 1).all()


# --- Your own folders -----------------------------------------------------------------------------------------
def make_folder(root, n_train=6, n_val=3, size=32, num_classes=3):
    """Blocky masks (8x8 cells) and images whose colour is a function of the class: alignment is checkable."""
    colors = np.array([[20, 40, 60], [200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            cells = np.random.default_rng(100 + i).integers(0, num_classes, (size // 8, size // 8))
            label = np.kron(cells, np.ones((8, 8), np.int64)).astype(np.uint8)
            save(root / split / "images" / f"img{i}.png", colors[label])
            save(root / split / "masks" / f"img{i}.png", label)
    json.dump(
        {"names": ["bg", "red", "green"], "colors": colors[:3].tolist()}, open(root / "classes.json", "w")
    )
    return colors


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    colors = make_folder(tmp_path)
    src = folders.RawSource("folder", folders.list_examples("folder", str(tmp_path), "train"), 3)
    rng = np.random.default_rng(0)
    flips = 0
    for i in range(len(src)):
        for out_hw in ((16, 16), (24, 24), (16, 32)):
            ex = augment.train_augment(src[i], *out_hw, rng)
            image, label = ex["image"].astype(int), ex["label"]
            assert image.shape == (*out_hw, 3) and label.shape == out_hw
            assert set(np.unique(label)) <= {0, 1, 2}  # nearest neighbour: no invented ids
            # Away from cell borders the bilinear image must show exactly its pixel's class colour.
            pad = np.pad(label, 1, mode="edge")
            uniform = np.all([pad[1 + dy : 1 + dy + label.shape[0], 1 + dx : 1 + dx + label.shape[1]] == label
                              for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)  # fmt: skip
            assert uniform.mean() > 0.3
            np.testing.assert_allclose(image[uniform], colors[label[uniform]], atol=2)
        flips += int(np.array_equal(augment.train_augment(src[0], 32, 32, np.random.default_rng(i))["label"],
                                    src[0]["label"][:, ::-1]))  # fmt: skip
    assert flips > 0  # the flip happens (and keeps alignment, checked above)


def test_folder_classes_json(tmp_path):
    make_folder(tmp_path)
    names, palette = folders.folder_classes(str(tmp_path), 3)
    assert names == ("bg", "red", "green") and palette.dtype == np.uint8 and palette.shape == (3, 3)
    with pytest.raises(SemFlowError, match="must list 4 names"):
        folders.folder_classes(str(tmp_path), 4)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: os.rename(r / "val", r / "validation"), "folder .*val/images not found"),
        (lambda r: os.remove(r / "train" / "masks" / "img1.png"), r"image .*train/images/img1.png has no mask"),
        (lambda r: save(r / "train" / "masks" / "img2.png", np.zeros((8, 8))), r"mask .*img2.png is 8x8 but image"),
        (lambda r: save(r / "train" / "masks" / "img3.png", np.full((32, 32), 7)), r"img3.png has class id 7, at or"),
        (lambda r: open(r / "train" / "images" / "img4.png", "wb").write(b"not a png"), r"cannot read .*img4.png"),
        (lambda r: save(r / "train" / "masks" / "img5.png", np.zeros((32, 32, 3))), r"img5.png must be a single-ch"),
    ],
)  # fmt: skip
def test_bad_data_names_the_file(tmp_path, breakage, message):
    make_folder(tmp_path)
    breakage(tmp_path)
    with pytest.raises(SemFlowError, match=message):
        for split in ("train", "validation"):
            src = folders.RawSource("folder", folders.list_examples("folder", str(tmp_path), split), 3)
            for i in range(len(src)):
                src[i]


def test_skip_bad_replaces_and_counts(tmp_path, capsys):
    make_folder(tmp_path)
    save(tmp_path / "train" / "masks" / "img2.png", np.full((32, 32), 9))
    src = folders.RawSource(
        "folder", folders.list_examples("folder", str(tmp_path), "train"), 3, skip_bad=True
    )
    got = [src[i] for i in range(len(src))]
    assert src.skipped == 1 and [g["ok"] for g in got] == [True, True, False, True, True, True]
    assert got[2]["id"] == "img3"  # replaced by the next good example
    assert "skipping bad example (1 so far): mask" in capsys.readouterr().out
    config = folder_config(tmp_path)
    config.data.skip_bad = True
    batches = list(pipeline.eval_batches(config, -1, 8, split="train"))
    assert int(sum(b["valid"].sum() for b in batches)) == 5  # the replaced row does not count


def folder_config(root):
    from configs import folder

    config = folder.get_config(f"root={root},num_classes=3,size=16")
    config.model.channels, config.model.channel_mults, config.model.num_groups = 8, (1,), 4
    config.model.attention_resolutions = ()
    config.train.steps, config.train.log_every, config.train.checkpoint_every = 2, 1, 2
    config.train.sample_every, config.train.warmup_steps = 2, 1
    config.eval.batch_size, config.eval.steps_list, config.eval.num_samples = 8, (1,), 2
    config.eval.diversity_masks, config.eval.grid_rows, config.flow.steps = 2, 2, 1
    return config_lib.validate(config)


def test_arrayrecord_round_trip(tmp_path):
    make_folder(tmp_path / "src")
    summary = prepare.convert("folder", str(tmp_path / "src"), str(tmp_path / "ar"), num_shards=2, workers=2,
                              num_classes=3, quiet=True)  # fmt: skip
    assert summary["train"] == {"examples": 6, "skipped": 0, "shards": 2}
    assert not [f for f in os.listdir(tmp_path / "ar") if f.endswith(".partial")]
    raw = folders.RawSource("folder", folders.list_examples("folder", str(tmp_path / "src"), "train"), 3)
    rec = records.RecordSource(str(tmp_path / "ar"), "train")
    assert len(rec) == 6
    by_id = {rec[i]["id"]: rec[i] for i in range(len(rec))}
    for i in range(len(raw)):
        np.testing.assert_array_equal(by_id[raw[i]["id"]]["image"], raw[i]["image"])
        np.testing.assert_array_equal(by_id[raw[i]["id"]]["label"], raw[i]["label"])


def test_prepare_refuses_bad_data_and_leaves_no_partial_split(tmp_path):
    make_folder(tmp_path / "src")
    save(tmp_path / "src" / "train" / "masks" / "img2.png", np.full((32, 32), 9))
    with pytest.raises(SemFlowError, match="img2.png has class id 9"):
        prepare.convert("folder", str(tmp_path / "src"), str(tmp_path / "ar"), num_shards=2, workers=1,
                        num_classes=3, quiet=True)  # fmt: skip
    assert not [f for f in os.listdir(tmp_path / "ar") if "array_record" in f]
    summary = prepare.convert("folder", str(tmp_path / "src"), str(tmp_path / "ar"), num_shards=2, workers=1,
                              num_classes=3, skip_bad=True, quiet=True)  # fmt: skip
    assert summary["train"]["examples"] == 5 and summary["train"]["skipped"] == 1


def test_folder_config_trains_and_evaluates(tmp_path):
    from semflow_jax.eval import evaluate
    from semflow_jax.train import train_and_checkpoint

    make_folder(tmp_path / "data")
    config = folder_config(tmp_path / "data")
    metrics = train_and_checkpoint(config, str(tmp_path / "run"), quiet=True)
    assert np.isfinite(metrics["loss"])
    config.eval.fid = config.eval.lpips = config.eval.label_alignment = False  # tested on shapes
    result = evaluate(config, str(tmp_path / "run"), quiet=True)
    assert result["num_examples"] == 3 and set(result["segmentation"]["per_class_iou"]) == {
        "bg",
        "red",
        "green",
    }
    assert os.path.exists(tmp_path / "run" / "eval" / "grid.png")
    # The shards of the same data serve the same config.
    prepare.convert("folder", str(tmp_path / "data"), str(tmp_path / "ar"), num_shards=2, workers=1,
                    num_classes=3, quiet=True)  # fmt: skip
    ar = config_lib.validate(config.copy_and_resolve_references())
    ar.data.format, ar.data.root = "arrayrecord", str(tmp_path / "ar")
    assert pipeline.split_size(ar) == 3


@pytest.mark.parametrize(
    "name, dataset, classes_, hw, lr, schedule, warmup, steps, per_device, dtype",
    [
        ("coco", "coco_stuff", 171, (512, 512), 1e-5, "constant", 10_000, 320_000, 16, "float32"),
        ("cityscapes", "cityscapes", 19, (512, 1024), 5e-5, "linear", 500, 8_000, 32, "bfloat16"),
        ("celebamask", "celebamask", 19, (512, 512), 2e-5, "linear", 500, 80_000, 32, "bfloat16"),
        ("ade20k", "ade20k", 150, (512, 512), 1e-5, "constant", 10_000, 160_000, 16, "float32"),
    ],
)
def test_published_configs_carry_the_paper_settings(
    name, dataset, classes_, hw, lr, schedule, warmup, steps, per_device, dtype, tmp_path
):
    import importlib

    get_config = importlib.import_module(f"configs.{name}").get_config
    with pytest.raises(SemFlowError, match="needs model.pretrained"):
        config_lib.validate(get_config("root=/data/x"))
    c = config_lib.validate(get_config(f"root=/data/x,pretrained={tmp_path}"))
    assert (c.model.kind, c.flow.space, c.model.remat) == ("sd", "latent", True)
    assert (c.data.name, c.data.num_classes, config_lib.image_hw(c), c.data.root) == (
        dataset,
        classes_,
        hw,
        "/data/x",
    )
    t = c.train
    assert (t.lr, t.lr_schedule, t.warmup_steps, t.steps, t.batch_size_per_device) == (
        lr,
        schedule,
        warmup,
        steps,
        per_device,
    )
    assert (t.weight_decay, t.grad_clip, c.model.dtype) == (0.01, 1.0, dtype)
    assert (c.anchors.base, c.anchors.spacing, c.flow.beta) == (6, 50.0, 6.375)
    assert config_lib.resolve_batch(c, 8).train.batch_size == 8 * per_device


def test_folder_config_options_and_anchors():
    from configs import folder

    c = config_lib.validate(folder.get_config("root=/d,num_classes=8,size=32"))
    assert (c.anchors.base, c.anchors.spacing) == (2, 254.0)  # all 8 corners used: white kept off the grid
    assert config_lib.validate(folder.get_config("root=/d,num_classes=9")).anchors.base == 3
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        folder.get_config("root=/d,colour=red")
