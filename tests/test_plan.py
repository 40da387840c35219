"""The planner's parts that need no TPU compiler: slice names, the HLO reader, the jaxpr FLOP count, the
refusal parsing and the one-line errors. (The compiles themselves are tests/test_tpu.py.)"""

import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from semflow_jax import config_lib, plan
from semflow_jax.aot import flops, hlo, jaxprs, slices
from semflow_jax.errors import SemFlowError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name,chips,hosts,layout",
    [
        ("v5p-64", 32, 8, "v5:2x4x4"),  # TensorCores: two per chip
        ("v4-32", 16, 4, "v4:2x2x4"),
        ("v5e-8", 8, 1, "v5e:2x4"),  # chips; up to 8 on one host
        ("v5litepod-16", 16, 4, "v5e:4x4"),  # the TPU API's name; 4-chip hosts above 8
        ("v6e-16", 16, 4, "v6e:4x4"),
        ("v6e-8", 8, 1, "v6e:2x4"),
        ("v5e-4", 4, 1, "v5e:2x2"),
    ],
)
def test_slices_are_counted_the_way_cloud_tpu_names_them(name, chips, hosts, layout):
    s = slices.parse(name)
    assert (s.chips, s.hosts, s.topology_name) == (chips, hosts, layout)


@pytest.mark.parametrize(
    "name,fragment",
    [("v5p-6", "TensorCores"), ("v5e-12", "chips"), ("v9-8", "unknown TPU"), ("tpu", "such as")],
)
def test_bad_slice_names_say_what_is_accepted(name, fragment):
    with pytest.raises(SemFlowError, match=fragment):
        slices.parse(name)


# A hand-written module in the optimized-HLO spelling: a 5-trip while loop whose body all-reduces over fsdp
# and multiplies; the same limit counted in steps of 2 (3 trips; XLA's unrolled windowed einsums) around
# a permute over data; an all-gather over every device in the entry (iota groups), a named-mesh all-reduce
# over data, an iota-transposed one over data, a permute over fsdp, a convolution, and a batched product
# written as a convolution the way the TPU compiler writes them (its batch a dilated spatial dimension).
MODULE = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body.1 (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ar = f32[8,4]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %w = f32[4,4]{1,0} constant({...})
  %d = f32[8,4]{1,0} dot(%ar, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%j, %d)
}

%cond.1 (p: (s32[], f32[8,4])) -> pred[] {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%cond.2 (p: (s32[], f32[8,4])) -> pred[] {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %gt = pred[] compare(%n, %i), direction=GT
}

%body.2 (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %cp = f32[8,4]{1,0} collective-permute(%x), channel_id=6, source_target_pairs={{0,2},{2,0},{1,3},{3,1}}
  %two = s32[] constant(2)
  %j = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%j, %cp)
}

ENTRY %main.9 (x: f32[8], y: f32[8,4], img: f32[2,8,8,8], k: f32[3,3,8,16]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %y = f32[8,4]{1,0} parameter(1)
  %img = f32[2,8,8,8]{3,2,1,0} parameter(2)
  %k = f32[3,3,8,16]{3,2,1,0} parameter(3)
  %ag = f32[32]{0} all-gather(%x), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
  %m = f32[8]{0} all-reduce(%x), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, to_apply=%add
  %t = f32[8]{0} all-reduce(%x), channel_id=4, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
  %cp = f32[8]{0} collective-permute(%x), channel_id=5, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %c = f32[2,6,6,16]{3,2,1,0} convolution(%img, %k), window={size=3x3}, dim_labels=b01f_01io->b01f
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,4]{1,0}) tuple(%zero, %y)
  %loop = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond.1, body=%body.1
  %odd = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond.2, body=%body.1
  %wide = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond.1, body=%body.2
  %q = f32[4,8,5]{2,1,0} parameter(4)
  %kv = f32[4,16,5]{2,1,0} parameter(5)
  %bt = f32[4,8,16]{2,1,0} convolution(%q, %kv), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0bf_0oi->0bf
  ROOT %r = f32[8]{0} add(%m, %t)
}

FunctionNames
1 "train_step"
2 "Conv.__call__"

"""
MESH = {"data": 2, "fsdp": 2}  # device id = 2 * data + fsdp


def test_hlo_collectives_by_kind_axes_and_trip_count():
    c = hlo.collectives(MODULE, MESH)
    rows = {(r["kind"], tuple(r["axes"])): r for r in c["by_kind"]}
    # Inside the 5-trip loop (5 runs of 128 bytes); the loop whose condition we do not read counts once.
    assert rows[("all-reduce", ("fsdp",))]["count"] == 6
    assert rows[("all-reduce", ("fsdp",))]["bytes_per_chip"] == 6 * 8 * 4 * 4
    assert rows[("all-reduce", ("fsdp",))]["in_program"] == 1
    assert c["unknown_trip_counts"] == 1
    # An all-gather moves what it produces: 4 chips' 32 bytes each.
    assert rows[("all-gather", ("data", "fsdp"))]["bytes_per_chip"] == 128
    # The named-mesh and the transposed-iota spellings both group along data.
    assert rows[("all-reduce", ("data",))]["count"] == 2
    assert rows[("collective-permute", ("fsdp",))]["count"] == 1
    assert rows[("collective-permute", ("data",))]["count"] == 3
    assert c["count"] == sum(r["count"] for r in c["by_kind"]) == 6 + 1 + 2 + 1 + 3


def test_hlo_device_group_spellings():
    assert hlo.device_groups("replica_groups=[2,2]<=[2,2]T(1,0)", 4) == [[0, 2], [1, 3]]
    assert hlo.device_groups("replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert hlo.device_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}"
    assert hlo.device_groups(named, 4) == [[0, 1], [2, 3]]
    assert hlo.group_axes([[0, 2], [1, 3]], MESH) == ("data",)
    assert hlo.device_groups("to_apply=%add", 4) is None


def test_hlo_matmul_flops_count_loop_bodies_per_trip():
    dot = 2 * (8 * 4) * 4  # [8, 4] x [4, 4]
    conv = 2 * (2 * 6 * 6 * 16) * 8 * 9  # every output value: 8 input features x a 3x3 window
    batched = 2 * (4 * 8 * 16) * 5  # one tap per output: the other three land on dilation holes
    assert hlo.matmul_flops(MODULE) == 5 * dot + 1 * dot + conv + batched


def test_hlo_function_names_and_shape_bytes():
    assert hlo.function_names(MODULE) == {"train_step", "Conv.__call__"}
    assert hlo.shape_bytes("(bf16[2,3]{1,0}, s8[4])") == 2 * 6 + 4
    assert hlo.shape_bytes("f32[]") == 4


def test_jaxpr_flops_take_one_platforms_branch_and_count_scan_steps():
    def step(x, _):
        one = lambda x: x @ x  # noqa: E731
        two = lambda x: (x @ x) @ x  # noqa: E731
        return jax.lax.platform_dependent(x, cpu=one, default=two), None

    f = lambda x: jax.lax.scan(step, x, None, length=3)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 4)))
    matmul = 2 * 4 * 4 * 4
    assert jaxprs.matmul_flops(jaxpr, "cpu") == 3 * matmul
    assert jaxprs.matmul_flops(jaxpr, "tpu") == 3 * 2 * matmul


def test_conv_taps_skip_padding_and_holes():
    assert flops.window_taps(8, 3, 8, pad_lo=1) == 8 * 3 - 2  # SAME: the two border taps hit padding
    assert flops.window_taps(8, 8, 8, stride=7, lhs_dilate=8) == 8  # a batch dimension as a window
    assert flops.window_taps(4, 3, 7, pad_lo=1, lhs_dilate=2) == 10  # a transposed stride-2 convolution


def test_jaxpr_conv_flops():
    x, k = jnp.ones((2, 8, 8, 6)), jnp.ones((3, 3, 3, 16))  # two feature groups of 3
    f = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert jaxprs.matmul_flops(jax.make_jaxpr(f)(x, k), "tpu") == 2 * (2 * 6 * 6 * 16) * 3 * 9
    same = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x, k = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    assert jaxprs.matmul_flops(jax.make_jaxpr(same)(x, k), "tpu") == 2 * 4 * 3 * 22 * 22  # 22 real taps a row


def test_refusals_are_read_for_what_the_program_needs():
    used = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 19.01G of 15.75G hbm. Exceeded"
    assert plan._needed_bytes(used, 0.0) == pytest.approx(19.01 * 2**30)
    temp = (
        "Ran out of memory in memory space hbm: temporary allocation (20.00G) exceeds available HBM (15.75G)"
    )
    assert plan._needed_bytes(temp, 2**30) == pytest.approx(21 * 2**30)
    assert plan._needed_bytes("INVALID_ARGUMENT: something else", 0.0) is None


def test_shortfall_is_one_line_with_the_knobs():
    from configs import coco

    config = config_lib.resolve_batch(coco.get_config(), 8)  # 16 per chip, 2 micro-batches
    mesh = types.SimpleNamespace(shape={"data": 8, "fsdp": 1}, size=8)
    knobs = plan.memory_knobs(config, "train_step", mesh)
    assert any("fsdp" in k for k in knobs) and any("grad_accum_steps" in k for k in knobs)
    assert any("batch_size_per_device" in k for k in knobs)
    doc = {
        "slice": {"name": "v5e-8"},
        "programs": {
            "sampler": {"fits": True},
            "train_step": {
                "fits": False,
                "peak_gib": 19.0,
                "short_by_gib": 3.25,
                "hbm_gib_per_chip": 15.75,
                "knobs": knobs,
            },  # fmt: skip
        },
    }
    line = plan.shortfall(doc)
    assert "\n" not in line and "train_step needs 19.00 GiB" in line and "3.25 GiB more" in line
    assert plan.shortfall({"slice": {"name": "v5e-8"}, "programs": {"sampler": {"fits": True}}}) is None
    sharded = types.SimpleNamespace(shape={"data": 1, "fsdp": 8}, size=8)
    assert not any("fsdp" in k for k in plan.memory_knobs(config, "train_step", sharded))


def test_mesh_flag():
    assert plan.parse_mesh("data=1,fsdp=-1") == (("data", 1), ("fsdp", -1))
    with pytest.raises(SemFlowError, match="name=size"):
        plan.parse_mesh("data=x")


def _plan_cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no libtpu on the path
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "semflow_jax.plan", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "topology,fragment",
    [("v5e-8", 'pip install "jax[tpu]==0.10.2"'), ("v5p-7", "v5p slices come as")],
)
def test_cli_without_libtpu_or_with_a_bad_slice_is_one_line(topology, fragment, tmp_path):
    out = tmp_path / "plan.json"
    r = _plan_cli("--config=configs/shapes.py:tiny", f"--topology={topology}", f"--out={out}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_pods_table_rows_from_plan_json():
    """benchmarks/pods.py's README table, from a plan JSON of the shape semflow_jax.plan writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pods", os.path.join(ROOT, "benchmarks", "pods.py"))
    pods = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pods)
    program = {"fits": True, "mesh": {"data": 1, "fsdp": 8}, "peak_gib": 15.06, "hbm_gib_per_chip": 15.75,
               "margin_gib": 0.69,
               "images_per_sec_per_chip": 4.2, "mfu_at_roofline": 0.41, "roofline_bound": "compute",
               "collectives": {"bytes_per_chip": 12.5e9}, "compile_sec": 900.0}  # fmt: skip
    doc = {
        "slice": {"chips": 8, "hosts": 1},
        "config": {
            "mesh": [["data", 1], ["fsdp", 8]],
            "train.batch_size_per_device": 16,
            "train.grad_accum_steps": 2,
        },
        "programs": {"train_step": program, "sampler": {**program, "fits": False, "short_by_gib": 1.0}},
    }
    row = pods._row("coco", "v5e-8", doc)
    assert row["train_fits"] and not row["all_fit"] and row["train_collective_gb_per_step"] == 12.5
    md = pods.table([row], [("ade20k", "v4-32"), ("ade20k", "v5e-8"), ("coco", "v4-32")])
    line = "| coco | v5e-8 (8, 1) | data 1 x fsdp 8, 2 | 15.06 / 15.75 GiB | yes, 0.69 GiB to spare | 4.2 (compute)"
    assert line + " | 41% | 12.5 GB |" in md
    assert md.splitlines()[-1] == "Not planned here: ade20k on any of v4-32, v5e-8; coco on v4-32."
