"""The tiny config's train step and sampler compiled by libtpu for a one-host (v5e-4) and a two-host (v5p-16)
TPU slice, ahead of time on this CPU host: they compile, both directions are one executable, the compiled
shardings are those the config asks for, no CPU-only form of models/layers.py reaches them (read from the
compiled HLO against a CPU compile of the same programs), and the planner's JSON is sane.

The compiles run in their own process (tests/tpu_worker.py, started by conftest.py when the session starts
so that it overlaps the other tests), because an importable libtpu changes how jax starts; the rest of the
suite never has it on its path. libtpu is installed by the README's test command into .venv/libtpu.
"""

import json

import pytest
import tpu_process

MESHES = {"v5e-4": {"data": 2, "fsdp": 2}, "v5p-16": {"data": 2, "fsdp": 4}}


@pytest.fixture(scope="module")
def facts():
    return tpu_process.facts()


@pytest.mark.parametrize("name", sorted(MESHES))
def test_slices_compile_for_their_chips_and_hosts(facts, name):
    s = facts["slices"][name]
    assert (s["chips"], s["processes"]) == {"v5e-4": (4, 1), "v5p-16": (8, 2)}[name]
    assert s["train"]["platform"] == "tpu"


@pytest.mark.parametrize("name", sorted(MESHES))
def test_compiled_shardings_are_the_configs(facts, name):
    t = facts["slices"][name]["train"]
    assert t["batch_spec_asked"] == "P(('data', 'fsdp'),)"
    assert t["batch_specs"] == [t["batch_spec_asked"]] * 2  # image and label, split over every chip
    assert t["state_specs"] == t["state_specs_asked"]  # each array by the FSDP rule, as compiled
    assert t["state_out_specs"] == t["state_specs_asked"]  # the donated state comes back laid out the same
    assert t["split_arrays"] >= 10 and any("'fsdp'" in s for s in t["state_specs"])


@pytest.mark.parametrize("name", sorted(MESHES))
def test_both_directions_are_one_executable(facts, name):
    s = facts["slices"][name]["sampler"]
    assert s["same_lowering"]  # direction +1 and -1 lower to the same program: it is an argument
    assert s["z_spec"] == ["P(('data', 'fsdp'),)"]


@pytest.mark.parametrize("name", sorted(MESHES))
def test_tpu_programs_hold_no_cpu_form(facts, name):
    s = facts["slices"][name]
    for program in ("train", "sampler"):
        assert s[program]["cpu_forms"] == [], program
        assert s[program]["heap_option"] is False, program  # read from the serialized executable


def test_cpu_compiles_of_the_same_code_do_hold_them(facts):
    """The control: were the HLO reading blind, the TPU test above could not fail."""
    c = facts["cpu"]
    assert facts["malloc_applied"], "the worker applies the CPU malloc settings, as the CLIs do"
    assert {"_sum_of_parts", "_group_norm_of_parts"} <= set(c["train_cpu_forms"])
    assert c["train_heap_option"] is True
    assert "_winograd_layer" in c["winograd_cpu_forms"] and c["winograd_tpu_forms"] == []
    assert "amx_product" in c["amx_cpu_forms"] and c["amx_tpu_forms"] == []


def test_plan_json_holds_the_fields_with_sane_values(facts):
    doc, a = facts["plan"], facts["analytic"]
    assert doc["slice"]["name"] == "v5e-4" and doc["slice"]["chips"] == 4
    assert "not a measured run" in doc["note"]
    assert set(doc["programs"]) == {"train_step", "sampler"}
    forward = a["forward_flops_per_example"]
    expected = {  # analytic FLOPs per chip: a train step is forward + backward (2x), a sampler N forwards
        "train_step": 3 * forward * a["train_examples"] / 4,
        "sampler": a["flow_steps"] * forward * a["sampler_examples"] / 4,
    }
    assert a["solver"] == "euler" and not a["remat"]
    for name, p in doc["programs"].items():
        assert p["fits"] and 0 < p["peak_gib"] < p["hbm_gib_per_chip"] and 15 < p["hbm_gib_per_chip"] <= 16
        assert p["margin_gib"] == pytest.approx(p["hbm_gib_per_chip"] - p["peak_gib"])
        assert p["state_gib_per_chip"] > 0 and p["temporaries_gib"] >= 0  # tiny programs may need none
        assert 0.5 < p["model_flops_per_chip"] / expected[name] < 2, name
        assert 0.5 < p["compiled_flops_per_chip"] / expected[name] < 2, name
        assert p["compiled_flops_per_chip"] >= 0.99 * p["model_flops_per_chip"]
        assert p["bytes_accessed_per_chip"] > 0
        assert p["roofline_sec"] > 0 and p["roofline_bound"] in ("compute", "memory")
        assert p["images_per_sec_per_chip"] == pytest.approx(p["examples_per_chip"] / p["roofline_sec"])
        assert 0 < p["mfu_at_roofline"] <= 1
        c = p["collectives"]
        assert c["count"] > 0 and c["bytes_per_chip"] > 0 and c["unknown_trip_counts"] == 0
        for row in c["by_kind"]:
            assert row["kind"] in (
                "all-reduce",
                "all-gather",
                "reduce-scatter",
                "all-to-all",
                "collective-permute",
            )
            assert set(row["axes"]) <= {"data", "fsdp"} and row["count"] >= row["in_program"] >= 1
    kinds = {r["kind"] for r in doc["programs"]["train_step"]["collectives"]["by_kind"]}
    assert "all-gather" in kinds  # FSDP gathers the parameters it split
    json.dumps(doc)
