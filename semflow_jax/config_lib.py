"""The default configuration (every key a run may set) and the checks that refuse a bad config at the edge.

Config files in `configs/` start from `base_config()` and change values; `validate` then refuses keys the
base does not have, values out of range, and combinations the method cannot honour (beta >= s/2, more classes
than k^3 anchors).
"""

from __future__ import annotations

import json
import os

import ml_collections

from semflow_jax import flow
from semflow_jax.errors import SemFlowError

DATASETS = ("shapes", "coco_stuff", "cityscapes", "celebamask", "ade20k", "folder")
# Datasets whose class count is fixed by their benchmark.
NUM_CLASSES = {"coco_stuff": 171, "cityscapes": 19, "celebamask": 19, "ade20k": 150}
DTYPES = ("float32", "bfloat16")
MESH_AXES = ("data", "fsdp")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run may set, with defaults sized for the embedded `shapes` data on a CPU."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        name="shapes",
        root="",  # the dataset's folder as published (or ArrayRecord shards with format="arrayrecord")
        format="raw",  # "raw": read the published folders; "arrayrecord": shards from semflow_jax.data.prepare
        latents="",  # latent mode: train on latents cached by semflow_jax.data.latents (eval still reads root)
        skip_bad=False,  # replace a bad example by the next good one (and report it) instead of stopping
        image_size=32,  # training/eval height; width too unless image_width is set
        image_width=0,  # 0: square images
        num_classes=5,
        num_train=1_000_000,  # shapes are procedural: a large index range means fresh scenes every step
        num_val=256,
        num_threads=2,
        prefetch=4,
    )
    c.anchors = dict(base=6, spacing=50.0)
    # beta in 0-255 units; 6.375 is the paper's +-0.05 in [-1, 1] units.
    # Training times: t = u ** time_power for a time_power_fraction of the batch, t = u for the rest;
    # time_power = 1.0 is the paper's t ~ U(0, 1).
    # space "latent": the flow runs between VAE latents (model.pretrained/vae, frozen), as in the paper.
    c.flow = dict(
        beta=6.375, solver="euler", steps=25, time_power=1.0, time_power_fraction=1.0, space="pixel"
    )
    c.model = dict(
        kind="unet",  # "unet": our UNet (sized below); "sd": Stable Diffusion's UNet from model.pretrained
        pretrained="",  # a semflow_jax.convert output folder (SD UNet weights, VAE, empty-prompt embedding)
        remat=False,  # "sd": recompute each block in the backward pass (gradient checkpointing)
        attention_chunk=0,  # "sd": > 0 runs attention queries in chunks of this many (bounded memory)
        channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=2,
        num_groups=8,
        dropout=0.0,
        # Compute dtype ("bfloat16": mixed precision); parameters, optimizer state and the loss stay float32.
        dtype="float32",
        kernels="auto",  # "auto": the layers' CPU forms where XLA:CPU compiles them faster; "plain": never
    )
    c.train = dict(
        steps=1500,
        batch_size=16,  # global: split over every device of the mesh (and over the processes)
        batch_size_per_device=0,  # > 0: the global batch is this times the number of devices (overrides)
        grad_accum_steps=1,  # micro-batches per update: batch_size / grad_accum_steps examples per pass
        cpu_devices=0,  # on a CPU split into devices (cpu/xla_options.py): train on at most this many (0 = all)
        lr=1e-3,
        lr_schedule="cosine",  # "constant", "linear" (to 0) or "cosine" (to 0), after the warm-up
        warmup_steps=100,
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        grad_clip=1.0,
        ema_decay=0.999,  # 0: keep no EMA (saves a parameter copy; sampling uses the trained weights)
        mu_dtype="float32",  # Adam's first moment: "bfloat16" saves 2 bytes per parameter (memory-bound runs)
        log_every=50,
        checkpoint_every=500,
        keep_checkpoints=2,
        async_checkpoint=True,  # write checkpoints in the background while training goes on
        sample_every=500,
    )
    c.eval = dict(
        num_examples=256,  # -1: the whole validation split
        batch_size=64,
        steps_list=(1, 2, 5, 10, 25),
        num_samples=4,  # synthesized samples per mask for the diversity measure and the grid
        diversity_masks=16,
        grid_rows=8,
        # Synthesis quality: FID (standard Inception pool3) at each N in fid_steps, LPIPS (AlexNet) to the
        # ground truth and between samples; label alignment by an independent segmenter (below), trained and
        # cached on first use unless segmenter_dir names one.
        fid=True,
        fid_steps=(25,),
        lpips=True,
        label_alignment=True,
        segmenter_dir="",
    )
    # The label-alignment segmenter (semflow_jax.segmenter): a plain UNet trained with cross-entropy.
    c.segmenter = dict(
        steps=600,
        batch_size=32,
        lr=2e-3,
        warmup_steps=50,
        channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        num_groups=8,
    )
    # (axis name, size) pairs; -1 takes every remaining device. "data": data parallel; "fsdp": the batch is
    # split over it too, and every state array of at least fsdp_min_size elements is split along it.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.fsdp_min_size = 2**14
    return c


def _flat_keys(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, (dict, ml_collections.ConfigDict)):
            out.update(_flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns config unchanged if it is usable, else raises SemFlowError naming the key and the rule."""
    have, want = _flat_keys(config), _flat_keys(base_config())
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise SemFlowError(f"unknown config key(s): {', '.join(unknown)}")
    missing = sorted(set(want) - set(have))
    if missing:
        raise SemFlowError(f"config is missing key(s): {', '.join(missing)}")
    d, m, t, e = config.data, config.model, config.train, config.eval
    if d.name not in DATASETS:
        raise SemFlowError(f"data.name must be one of {DATASETS}, got {d.name!r}")
    if d.name in NUM_CLASSES and d.num_classes != NUM_CLASSES[d.name]:
        raise SemFlowError(
            f"data.num_classes must be {NUM_CLASSES[d.name]} for {d.name}, got {d.num_classes}"
        )
    if d.format not in ("raw", "arrayrecord"):
        raise SemFlowError(f"data.format must be raw or arrayrecord, got {d.format!r}")
    if d.name == "shapes" and d.image_width not in (0, d.image_size):
        raise SemFlowError("shapes scenes are square: leave data.image_width at 0")
    if d.num_classes < 1:
        raise SemFlowError(f"data.num_classes must be positive, got {d.num_classes}")
    k, s = config.anchors.base, config.anchors.spacing
    if k < 2 or s <= 0 or s * (k - 1) > 255:
        raise SemFlowError(
            f"anchors need base >= 2 and 0 < spacing*(base-1) <= 255, got base={k}, spacing={s}"
        )
    if d.num_classes > k**3:
        raise SemFlowError(
            f"data.num_classes={d.num_classes} exceeds the {k**3} anchors of anchors.base={k} (base**3)"
        )
    if s * (k - 1) == 255 and d.num_classes == k**3:
        raise SemFlowError(
            f"anchors base={k}, spacing={s} with {d.num_classes} classes make white (255, 255, 255), the "
            "ignore colour, a class anchor; use fewer classes or a smaller spacing"
        )
    if not 0 <= config.flow.beta < s / 2:
        raise SemFlowError(
            f"flow.beta={config.flow.beta} must be in [0, anchors.spacing/2) = [0, {s / 2}): "
            "a larger perturbation can carry a pixel to another class's anchor"
        )
    if not config.flow.time_power > 0:
        raise SemFlowError(f"flow.time_power must be positive, got {config.flow.time_power}")
    if not 0.0 <= config.flow.time_power_fraction <= 1.0:
        raise SemFlowError(
            f"flow.time_power_fraction must be in [0, 1], got {config.flow.time_power_fraction}"
        )
    if config.flow.solver not in flow.SOLVERS:
        raise SemFlowError(f"flow.solver must be one of {flow.SOLVERS}, got {config.flow.solver!r}")
    for key, value in (
        ("flow.steps", config.flow.steps),
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
    ):
        if int(value) < 1:
            raise SemFlowError(f"{key} must be >= 1, got {value}")
    if e.num_examples == 0 or e.num_examples < -1:
        raise SemFlowError(f"eval.num_examples must be >= 1, or -1 for the whole split, got {e.num_examples}")
    if any(int(n) < 1 for n in e.steps_list):
        raise SemFlowError(f"eval.steps_list must hold positive step counts, got {tuple(e.steps_list)}")
    levels = len(m.channel_mults)
    for key, size in (("data.image_size", d.image_size), ("data.image_width", image_hw(config)[1])):
        if size < 1 or size % 2 ** (levels - 1):
            raise SemFlowError(
                f"{key}={size} must be a positive multiple of 2**(len(model.channel_mults)-1)={2 ** (levels - 1)}"
            )
    widths = [m.channels * mult for mult in m.channel_mults]
    if any(w % m.num_groups for w in widths):
        raise SemFlowError(f"model.num_groups={m.num_groups} must divide every level width {widths}")
    if int(m.attention_chunk) < 0:
        raise SemFlowError(f"model.attention_chunk must be >= 0, got {m.attention_chunk}")
    if m.kind not in ("unet", "sd") or m.kernels not in ("auto", "plain"):
        raise SemFlowError(
            f"model.kind must be unet or sd and model.kernels auto or plain, got {m.kind!r}, {m.kernels!r}"
        )
    if config.flow.space not in ("pixel", "latent"):
        raise SemFlowError(f"flow.space must be pixel or latent, got {config.flow.space!r}")
    if (m.kind == "sd" or config.flow.space == "latent") and not os.path.isdir(m.pretrained):
        raise SemFlowError(
            f"model.kind={m.kind!r} with flow.space={config.flow.space!r} needs model.pretrained, a folder "
            f"written by python -m semflow_jax.convert; got {m.pretrained!r}"
        )
    if d.latents and config.flow.space != "latent":
        raise SemFlowError("data.latents (cached VAE latents) needs flow.space=latent")
    if m.dtype not in DTYPES:
        raise SemFlowError(f"model.dtype must be one of {DTYPES}, got {m.dtype!r}")
    if t.mu_dtype not in DTYPES:
        raise SemFlowError(f"train.mu_dtype must be one of {DTYPES}, got {t.mu_dtype!r}")
    if t.lr_schedule not in ("constant", "linear", "cosine"):
        raise SemFlowError(f"train.lr_schedule must be constant, linear or cosine, got {t.lr_schedule!r}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise SemFlowError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    names = [str(a[0]) for a in config.mesh]
    if not names or any(len(a) != 2 for a in config.mesh) or not set(names) <= set(MESH_AXES):
        raise SemFlowError(
            f"mesh must be (name, size) pairs with names from {MESH_AXES}, got {tuple(config.mesh)}"
        )
    if int(t.grad_accum_steps) < 1 or t.batch_size % int(t.grad_accum_steps):
        raise SemFlowError(
            f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1 and divide "
            f"train.batch_size={t.batch_size}"
        )
    if int(t.cpu_devices) < 0:
        raise SemFlowError(f"train.cpu_devices must be >= 0 (0 = all), got {t.cpu_devices}")
    if int(config.fsdp_min_size) < 1:
        raise SemFlowError(f"fsdp_min_size must be >= 1, got {config.fsdp_min_size}")
    if any(int(n) < 1 for n in e.fid_steps):
        raise SemFlowError(f"eval.fid_steps must hold positive step counts, got {tuple(e.fid_steps)}")
    sg = config.segmenter
    if int(sg.steps) < 1 or int(sg.batch_size) < 1:
        raise SemFlowError("segmenter.steps and segmenter.batch_size must be >= 1")
    if any(int(sg.channels) * int(m) % int(sg.num_groups) for m in sg.channel_mults):
        raise SemFlowError(f"segmenter.num_groups={sg.num_groups} must divide every segmenter level width")
    if e.num_samples < 2:
        raise SemFlowError(f"eval.num_samples must be >= 2 to measure diversity, got {e.num_samples}")
    return config


# Keys that fix the trained network; the eval config may change anything else (steps, solver, beta, eval.*).
_MODEL_KEYS = (
    "model",
    "anchors",
    "flow.space",
    "data.num_classes",
    "data.image_size",
    "data.image_width",
    "data.name",
)


def resolve_batch(config, num_devices: int) -> ml_collections.ConfigDict:
    """config with train.batch_size set from train.batch_size_per_device (if that is > 0) for num_devices."""
    if int(config.train.batch_size_per_device) <= 0:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = int(config.train.batch_size_per_device) * num_devices
    return config


def image_hw(config) -> tuple[int, int]:
    """(height, width) of the images the model is trained and evaluated on."""
    h = int(config.data.image_size)
    return h, int(config.data.image_width) or h


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def check_compatible(config, trained_config, resume: bool = False) -> None:
    """Refuses a config whose model/anchor/data-shape settings differ from those a workdir was trained with;
    with resume=True also one whose training state has another layout (EMA on/off, Adam moment dtype)."""
    for key in _MODEL_KEYS:
        a, b = _get(config, key), _get(trained_config, key)
        a = a.to_dict() if hasattr(a, "to_dict") else a
        b = b.to_dict() if hasattr(b, "to_dict") else b
        if json.dumps(a, sort_keys=True, default=list) != json.dumps(b, sort_keys=True, default=list):
            raise SemFlowError(f"--config sets {key}={a} but the workdir's model was trained with {b}")
    if resume:
        for key, a, b in (
            ("train.mu_dtype", config.train.mu_dtype, trained_config.train.mu_dtype),
            ("train.ema_decay > 0", config.train.ema_decay > 0, trained_config.train.ema_decay > 0),
            ("data.latents", config.data.latents, trained_config.data.latents),  # another data iterator
        ):
            if a != b:
                raise SemFlowError(
                    f"--config has {key} = {a} but the workdir's checkpoint was written with {b}: "
                    "the training state differs; use a new workdir"
                )


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes workdir/config.json (what eval and SemFlow.from_workdir rebuild the model from)."""
    from semflow_jax.errors import atomic_write_bytes

    os.makedirs(workdir, exist_ok=True)
    atomic_write_bytes(os.path.join(workdir, "config.json"), config.to_json(indent=2).encode())


def load(workdir: str) -> ml_collections.ConfigDict:
    """Reads workdir/config.json back as a validated ConfigDict (lists turned back into tuples)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise SemFlowError(f"{path} not found: is {workdir!r} a semflow_jax training workdir?")
    try:
        raw = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise SemFlowError(f"{path} is not a readable JSON config ({e})") from None
    return from_dict(raw)


def from_dict(raw: dict) -> ml_collections.ConfigDict:
    """A validated ConfigDict from its JSON form (lists turned back into tuples)."""

    def tuplify(x):
        if isinstance(x, dict):
            return {k: tuplify(v) for k, v in x.items()}
        return tuple(tuplify(v) for v in x) if isinstance(x, list) else x

    return validate(ml_collections.ConfigDict(tuplify(raw)))


# Shared by the published-dataset configs in configs/ (coco, cityscapes, celebamask, ade20k, folder).
def paper_config(
    name, num_classes, size, *, lr, schedule, warmup, steps, per_device_batch, dtype="float32", grad_accum=1
):
    """A published dataset's config: the paper's anchors (k = 6, s = 50), beta = 0.05, AdamW (wd 0.01,
    clip 1.0) and the given learning rate, schedule, warm-up, steps, per-device batch and compute dtype;
    the state split over every device (FSDP) and the batch in `grad_accum` micro-batches, so that a step
    fits a 16 GiB TPU v5e chip (`python -m semflow_jax.plan` checks). size is a side or (height, width)."""
    height, width = (size, 0) if isinstance(size, int) else size
    c = base_config()
    c.data.name = name
    c.data.num_classes = num_classes
    c.data.image_size = height
    c.data.image_width = width
    c.data.num_threads = 16
    c.data.prefetch = 8
    c.anchors.base, c.anchors.spacing = 6, 50.0  # 216 anchors: channel values 0, 50, ..., 250
    c.flow.beta = 6.375  # +-0.05 in [-1, 1] units
    c.flow.steps = 25
    # The paper's setting: Stable Diffusion's UNet fine-tuned between latents of its frozen VAE, both from
    # the `pretrained=DIR` option (a semflow_jax.convert output). The pixel-UNet sizes below apply with
    # --config.model.kind=unet --config.flow.space=pixel.
    c.model.kind, c.flow.space, c.model.remat = "sd", "latent", True
    c.model.attention_chunk = 1024  # 512^2 images: 4096 latent positions, attended in 4 chunks
    c.model.channels = 128
    c.model.channel_mults = (1, 1, 2, 2, 4, 4)
    c.model.num_res_blocks = 2
    c.model.attention_resolutions = (32, 16)
    c.model.num_heads = 8
    c.model.num_groups = 32
    c.train.weight_decay, c.train.b1, c.train.b2, c.train.grad_clip = 0.01, 0.9, 0.999, 1.0
    c.train.ema_decay = 0.0  # the official code keeps no EMA (and it costs a parameter copy at SD scale)
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.train.sample_every = 2000
    c.train.keep_checkpoints = 3
    c.eval.num_examples = -1  # the whole validation split
    c.eval.batch_size = 64
    c.eval.steps_list = (1, 2, 5, 10, 25, 50, 100)  # the paper's Table 2 ablation
    c.eval.fid_steps = (5, 25)
    # A real-data segmenter for label alignment: wider and longer than the shapes one.
    c.segmenter.channels, c.segmenter.channel_mults, c.segmenter.num_res_blocks = 64, (1, 2, 4, 4), 2
    c.segmenter.num_groups, c.segmenter.steps, c.segmenter.batch_size = 32, 40_000, 16
    c.segmenter.lr, c.segmenter.warmup_steps = 1e-3, 1000
    c.train.lr, c.train.lr_schedule, c.train.warmup_steps = lr, schedule, warmup
    c.train.steps, c.train.batch_size_per_device, c.model.dtype = steps, per_device_batch, dtype
    # Memory, not the method (the update is the same at any split); on 80 GB GPUs grad_accum_steps=1 is faster.
    c.mesh, c.train.grad_accum_steps = (("data", 1), ("fsdp", -1)), grad_accum
    return c


def apply_options(c, arg, known=()):
    """Applies "key=value" options of --config=FILE:opts (root=/data/coco: data.root; pretrained=DIR:
    model.pretrained; the `known` ones: data.*); returns c."""
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in ("root", "pretrained", *known):
            raise ValueError(
                f"unknown option {key!r} (known: root, pretrained{''.join(', ' + k for k in known)})"
            )
        section = c.model if key == "pretrained" else c.data
        section[key] = type(section[key])(value)
    return c
