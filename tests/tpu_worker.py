"""The TPU compiles of test_tpu.py, in their own process (libtpu on its path): `python tests/tpu_worker.py OUT.json`.

An importable libtpu changes how jax starts, so the rest of the suite never sees it. For a single-host slice
(v5e-4) and a two-host one (v5p-16, 8 chips) this compiles the tiny config's train step and sampler with
libtpu's compiler and writes what the tests assert on: the compiled programs' input and output shardings
against the ones the config asks for, the two directions' lowerings, the Python functions each compiled
program was traced in (and those of the same programs compiled for the CPU, the positive control), whether
the executable carries the CPU-only malloc heap option, and the planner's JSON with an analytic FLOP count.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`

from semflow_jax import plan  # noqa: E402  (imports no jax)

plan.compile_only_environment()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import shapes as shapes_config  # noqa: E402
from semflow_jax import config_lib, sharding  # noqa: E402
from semflow_jax.aot import hlo, programs, slices  # noqa: E402
from semflow_jax.cpu import kernels, malloc_options  # noqa: E402
from semflow_jax.models import layers  # noqa: E402

SLICES = {"v5e-4": (("data", 2), ("fsdp", 2)), "v5p-16": (("data", 2), ("fsdp", 4))}


def tiny_config(mesh):
    """The tests' tiny shapes config (one UNet level, no attention), every array of 256+ elements split."""
    config = shapes_config.get_config("tiny")
    config.model.channel_mults, config.model.attention_resolutions = (1,), ()
    config.fsdp_min_size = 256
    config.mesh = mesh
    config.train.batch_size = 16
    config.eval.batch_size = 16
    return config


def cpu_forms(compiled_text: str) -> list[str]:
    """The CPU-only forms of cpu/kernels.py whose code is in a compiled program (by traced function name)."""
    names = hlo.function_names(compiled_text)
    return sorted(f for f in kernels.CPU_FORMS if any(f in n for n in names))


def carries_heap_option(compiled) -> bool | None:
    """Whether the executable was compiled with malloc_options' heap-size option (its serialized form holds
    its compile options); None where this executable cannot be serialized."""
    try:
        return b"multiheap_size_constraint_per_heap" in compiled.runtime_executable().serialize()
    except Exception:  # an executable type without serialization
        return None


def specs(tree) -> list[str]:
    return [str(s.spec) for s in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "spec"))]


def analytic_forward_flops(config) -> float:
    """2 x multiply-adds of every Conv and Dense of one UNet forward pass over one example, from each layer's
    input shape and kernel, and attention's two L x L products (flax interception): an architecture count
    independent of jaxprs and HLO."""
    from semflow_jax.models import build_model

    model, total = build_model(config), [0.0]
    h, w = config_lib.image_hw(config)

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.name == "query":  # softmax(q k^T) v: 2 products
            total[0] += 4.0 * np.prod(out.shape) * out.shape[1]  # [B, L, heads, head_dim] against L keys
        if context.method_name == "__call__" and isinstance(module, (layers.Conv, layers.Dense)):
            kernel = module.variables["params"]["kernel"]
            if isinstance(module, layers.Conv):
                total[0] += 2.0 * np.prod(out.shape[:-1]) * np.prod(kernel.shape)
            else:
                n = module.axes
                total[0] += 2.0 * np.prod(out.shape) * np.prod(kernel.shape[:n])
        return out

    z = jnp.zeros((1, h, w, 3))
    with nn.intercept_methods(count):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), z, jnp.zeros((1,))))
    return total[0]


def slice_facts(name, mesh_axes, compiled=None, config=None):
    """Compiles the tiny train step and sampler for slice `name` (or takes `compiled`: {program name:
    (program, executable)} of `config`, as plan.plan(keep=...) leaves them); returns the facts test_tpu.py
    checks."""
    config = config or tiny_config(mesh_axes)
    devices = slices.compile_only_devices(slices.parse(name))
    if compiled is None:
        train, sampler = programs.programs(config, devices, ("train_step", "sampler"))
        compiled = {"train_step": (train, None), "sampler": (sampler, None)}
    (train, train_exe), (sampler, sampler_exe) = compiled["train_step"], compiled["sampler"]
    facts = {"processes": len({d.process_index for d in devices}), "chips": len(devices)}

    compiled = train_exe or train.jitted.lower(*train.args).compile()
    state, batch = train.args
    (in_state, in_batch), _ = compiled.input_shardings
    expected = sharding.state_sharding(state, train.mesh, config.fsdp_min_size)
    facts["train"] = {
        "batch_specs": specs(in_batch),
        "batch_spec_asked": str(sharding.batch_sharding(train.mesh).spec),
        "state_specs": specs(in_state),
        "state_specs_asked": specs(expected),
        "state_out_specs": specs(compiled.output_shardings[0]),
        "split_arrays": sum(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(expected)),
        "cpu_forms": cpu_forms(compiled.as_text()),
        "heap_option": carries_heap_option(compiled),
        "platform": train.mesh.devices.flat[0].platform,
    }

    params, z, _ = sampler.args
    forward = sampler.jitted.lower(params, z, jnp.float32(1.0))
    backward = sampler.jitted.lower(params, z, jnp.float32(-1.0))
    compiled = sampler_exe or forward.compile()
    facts["sampler"] = {
        "same_lowering": forward.as_text() == backward.as_text(),
        "cpu_forms": cpu_forms(compiled.as_text()),
        "heap_option": carries_heap_option(compiled),
        "z_spec": specs(compiled.input_shardings[0][1]),
    }
    return facts


def cpu_control():
    """The same tiny train step compiled for 4 CPU devices, and two layers that take the other CPU forms: a
    wide float32 Conv (Winograd) and a bfloat16 one with XLA's YNNPACK dots on (AMX); each also for a TPU."""
    config = tiny_config((("data", 2), ("fsdp", 2)))
    (train,) = programs.programs(config, jax.devices("cpu")[:4], ("train_step",))
    compiled = train.jitted.lower(*train.args).compile()
    out = {
        "train_cpu_forms": cpu_forms(compiled.as_text()),
        "train_heap_option": carries_heap_option(compiled),
    }
    tpu = slices.compile_only_devices(slices.parse("v5e-4"))[0]
    for label, dtype in (("winograd", jnp.float32), ("amx", jnp.bfloat16)):
        conv = layers.Conv(128, dtype=dtype)
        x = jnp.zeros((2, 16, 16, 128), dtype)
        params = jax.eval_shape(lambda conv=conv, x=x: conv.init(jax.random.PRNGKey(0), x))

        def loss(p, x, conv=conv):
            return jnp.sum(conv.apply(p, x).astype(jnp.float32))

        for platform, device in (("cpu", jax.devices("cpu")[0]), ("tpu", tpu)):
            one = jax.sharding.SingleDeviceSharding(device)
            f = jax.jit(jax.grad(loss), in_shardings=(one, one), out_shardings=one)
            args = jax.tree.map(lambda s, one=one: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                                (params, x))  # fmt: skip
            text = f.lower(*args).compile().as_text()
            out[f"{label}_{platform}_forms"] = cpu_forms(text)
            out[f"{label}_{platform}_functions"] = sorted(hlo.function_names(text))
    return out


def main(path):
    # The CPU tuning applied as the CLIs apply it, so the TPU programs below are compiled in a process where
    # the CPU train step does get the heap option (the control) and must still not carry it.
    facts = {"malloc_applied": malloc_options.apply()}
    # The v5e-4 programs are the planner's own compiles, of layers as wide as a TPU's 128 lanes (the FLOP
    # count needs them: the compiler pads 8 channels to 128); v5p-16's are the tiny config's.
    config = tiny_config(SLICES["v5e-4"])
    config.model.channels = 128
    keep = {}
    facts["plan"] = plan.plan(config, "v5e-4", wanted=("train_step", "sampler"), quiet=True, keep=keep)
    facts["slices"] = {
        "v5e-4": slice_facts("v5e-4", SLICES["v5e-4"], keep, config_lib.resolve_batch(config, 4))
    }
    facts["slices"]["v5p-16"] = slice_facts("v5p-16", SLICES["v5p-16"])
    facts["cpu"] = cpu_control()
    one = config_lib.resolve_batch(config, 4)
    facts["analytic"] = {
        "forward_flops_per_example": analytic_forward_flops(one),
        "train_examples": int(one.train.batch_size),
        "sampler_examples": int(one.eval.batch_size),
        "flow_steps": int(one.flow.steps),
        "solver": one.flow.solver,
        "remat": bool(one.model.remat),
    }
    with open(path, "w") as f:
        json.dump(facts, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
