"""The CPU tuning is one explicit call (semflow_jax.cpu.tuning.tune) that the command-line tools make first,
never a side effect of importing the package: what it sets, where it leaves the user's choices alone, and
what it says when it comes too late."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the test session itself sets (conftest.py) or a user might: none of it in the fresh interpreters here.
_OURS = (
    "XLA_FLAGS",
    "JAX_NUM_CPU_DEVICES",
    "SEMFLOW_XLA_DEFAULTS",
    "SEMFLOW_CPU_TUNING",
    "SEMFLOW_CPU_DEVICES",
)


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    """python -c code in a fresh interpreter, with none of _OURS in its environment, plus env."""
    base = {k: v for k, v in os.environ.items() if k not in _OURS}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**base, **env}
    )


def test_importing_the_package_changes_nothing_in_the_process():
    """`import semflow_jax, jax` leaves XLA_FLAGS unset and one CPU device; then every module of the package
    imported: no environment variable set or changed, glibc's mallopt never looked up, one device."""
    r = _fresh("import os, semflow_jax, jax; print(os.environ.get('XLA_FLAGS'), len(jax.devices()))")
    assert r.returncode == 0 and r.stdout.strip() == "None 1", r.stderr
    code = """
import ctypes, importlib, os, pkgutil
looked_up = []
class Spy(ctypes.CDLL):
    def __getattr__(self, name):
        looked_up.append(name)
        return super().__getattr__(name)
ctypes.CDLL = Spy
import jax  # jax's own import sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY: not ours to check
before = dict(os.environ)
import semflow_jax
names = [m.name for m in pkgutil.walk_packages(semflow_jax.__path__, "semflow_jax.")]
for name in names:
    importlib.import_module(name)
from semflow_jax.cpu import malloc_options
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(len(names), changed, "mallopt" in looked_up, malloc_options.APPLIED, len(jax.devices()))
"""
    r = _fresh(code)
    assert r.returncode == 0, r.stderr
    count, rest = r.stdout.strip().split(" ", 1)
    assert int(count) > 40 and rest == "[] False {} 1", r.stdout


def test_tune_adds_the_defaults_and_the_device_split_and_leaves_the_users_choices_alone():
    from semflow_jax.cpu import xla_options

    code = (
        "import os; from semflow_jax.cpu import tuning; t = tuning.tune(); import jax; "
        "print(os.environ.get('XLA_FLAGS', '') + '|' + str(len(jax.devices())) + '|' + t.summary())"
    )

    def after_tune(**env):
        r = _fresh(code, **env)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
        return r.stdout.strip().split("|")

    devices = xla_options.cpu_devices({})
    split = [f"{xla_options.DEVICE_COUNT_OPTION}={devices}"] if devices > 1 else []
    flags, count, summary = after_tune()
    assert flags == " ".join([*xla_options.cpu_defaults(), *split]) and int(count) == devices
    assert summary.startswith("CPU tuned: ") and "malloc M_MMAP_MAX=0" in summary
    assert after_tune(SEMFLOW_CPU_DEVICES="1")[:2] == [" ".join(xla_options.cpu_defaults()), "1"]
    assert after_tune(SEMFLOW_XLA_DEFAULTS="0")[:2] == ["", "1"]
    assert after_tune(SEMFLOW_CPU_TUNING="0") == ["", "1", "no CPU tuning (SEMFLOW_CPU_TUNING=0)"]
    mine = "--xla_cpu_experimental_ynn_fusion_type=eltwise"
    users = f"{xla_options.DEVICE_COUNT_OPTION}=3 {mine}"
    assert after_tune(XLA_FLAGS=users)[:2] == [users, "3"]  # the user's own values are kept
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_options.apply(env) == list(xla_options.cpu_defaults())
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 --xla_cpu")


def test_tune_after_jax_started_says_in_one_line_what_it_could_not_apply():
    code = (
        "import os, jax; jax.devices(); from semflow_jax.cpu import tuning; t = tuning.tune(); "
        "print(os.environ.get('XLA_FLAGS'), len(jax.devices()), bool(t.not_applied), bool(t.malloc))"
    )
    r = _fresh(code)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "jax had already started" in lines[0] and "not applied" in lines[0], r.stderr
    assert r.stdout.strip() == "None 1 True True"  # $XLA_FLAGS left alone: it could not act any more


def test_the_command_line_tools_start_tuned_and_say_so():
    r = subprocess.run(
        [sys.executable, "-m", "semflow_jax.segment", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in _OURS},
    )
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("semflow_jax.segment: CPU tuned: ") and "XLA xla_cpu_experimental_ynn" in first


def test_ynnpacks_bfloat16_dots_are_asked_for_only_where_the_cpu_has_amx(tmp_path):
    from semflow_jax.cpu import xla_options

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert xla_options.cpu_has_amx(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert not xla_options.cpu_has_amx(str(info))
    assert not xla_options.cpu_has_amx(str(tmp_path / "missing"))
    assert xla_options.cpu_defaults(amx=False) == ("--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce",)
    assert xla_options.cpu_defaults(amx=True) == (
        "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce,individual_dot",
    )
    flags = "--xla_cpu_experimental_ynn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type=eltwise,individual_dot"
    assert xla_options.ynn_fusions({"XLA_FLAGS": flags}) == {"eltwise", "individual_dot"}  # the last one wins
    assert xla_options.ynn_fusions({}) == set()


def test_the_cpu_is_split_into_devices_unless_the_user_chose_a_count(monkeypatch):
    from semflow_jax.cpu import xla_options

    monkeypatch.setattr(xla_options, "usable_cores", lambda: 16)
    assert xla_options.cpu_devices({}) == xla_options.DEFAULT_CPU_DEVICES == 2
    monkeypatch.setattr(xla_options, "usable_cores", lambda: 1)
    assert xla_options.cpu_devices({}) == 1
    env = {}
    assert xla_options.apply(env) == list(xla_options.cpu_defaults())  # one core: nothing to split
    assert xla_options.cpu_devices({"SEMFLOW_CPU_DEVICES": " 3 "}) == 3
    env = {"SEMFLOW_CPU_DEVICES": "3"}
    assert xla_options.apply(env)[-1] == "--xla_force_host_platform_device_count=3"
    env = {"SEMFLOW_CPU_DEVICES": "3", "JAX_NUM_CPU_DEVICES": "4"}  # jax's own setting wins
    assert xla_options.apply(env) == list(xla_options.cpu_defaults())
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="SEMFLOW_CPU_DEVICES"):
            xla_options.cpu_devices({"SEMFLOW_CPU_DEVICES": bad})


def test_a_bad_cpu_device_count_is_one_line_and_exit_2():
    """Read by the tuning call every command-line tool makes first: it refuses to run."""
    env = {**os.environ, "SEMFLOW_CPU_DEVICES": "many"}
    for module in ("semflow_jax.train", "semflow_jax.eval"):
        proc = subprocess.run(
            [
                sys.executable,
                "-W",
                "ignore",
                "-m",
                module,
                "--config=configs/shapes.py:tiny",
                "--workdir=unused",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "SEMFLOW_CPU_DEVICES='many'" in lines[0]


def test_no_cpu_options_where_a_tpu_or_gpu_backend_does_the_work(monkeypatch):
    from semflow_jax.cpu import xla_options

    monkeypatch.setattr(xla_options, "accelerator_installed", lambda: True)
    env = {}
    assert xla_options.apply(env) == [] and "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cpu", "SEMFLOW_CPU_DEVICES": "1"}  # the accelerator is there, but the user
    assert xla_options.apply(env) == list(xla_options.cpu_defaults())  # asked for the CPU


# Allocates, touches, frees and reallocates 48 MiB (above glibc's largest dynamic mmap threshold, 32 MiB, so
# by default a fresh mapping each time, as XLA's temporary buffers are) on the main thread: the memory paged in
# by the second block is what a second XLA call would pay.
_REUSE = """
import ctypes, resource
from semflow_jax.cpu import tuning
tuning.tune()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 48 << 20
p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _on_glibc():
    from semflow_jax.cpu import malloc_options

    return malloc_options.glibc()


def _run_without_malloc_env(script: str, **env) -> str:
    """stdout of script in a fresh Python whose environment has no malloc settings of ours or glibc's, plus env."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SEMFLOW_MALLOC", "MALLOC_"))}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env={**base, **env}
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# The settings exist only in glibc's malloc (the package sets nothing on macOS, Windows or musl); CI runs on glibc.
@pytest.mark.skipif(not _on_glibc(), reason="the malloc settings are glibc's; nothing is set elsewhere")
def test_freed_large_blocks_are_reused_not_mapped_again():
    def mib_paged_in_again(**env):
        return int(_run_without_malloc_env(_REUSE, **env)) * os.sysconf("SC_PAGE_SIZE") / 2**20

    assert mib_paged_in_again() < 4  # the package's defaults: the same pages again
    assert mib_paged_in_again(SEMFLOW_MALLOC_DEFAULTS="0") > 40  # glibc's: all 48 MiB mapped and faulted anew
    assert mib_paged_in_again(MALLOC_TRIM_THRESHOLD_="131072") > 40  # the user's own setting wins


# A program whose temporaries (eight 16 MiB arrays, live together) exceed the 64 MiB a thread's malloc heap
# holds, jitted as the train step is, run on XLA's threads: what a call pages in once the heaps are warm (the
# median of nine calls: under a loaded CI runner a call now and then lands on a thread whose heap is still cold).
_SPLIT = """
import resource, jax, jax.numpy as jnp
from semflow_jax.cpu import malloc_options, tuning
tuning.tune()
def f(x):
    ys = jax.lax.optimization_barrier(tuple(jnp.sin(x * (i + 1)) for i in range(8)))
    return sum(jnp.sum(y) for y in ys)
g = jax.jit(f, compiler_options=malloc_options.compiler_options() or None)
x = jnp.ones((2048, 2048), jnp.float32)
temp = g.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(10):
    g(x).block_until_ready()
paged = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    g(x).block_until_ready()
    paged.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() >> 20)
print(temp >> 20, sorted(paged)[len(paged) // 2])
"""


@pytest.mark.skipif(not _on_glibc(), reason="the malloc settings are glibc's; nothing is set elsewhere")
def test_temporaries_larger_than_a_thread_heap_are_kept_between_calls():
    def temp_and_mib_paged_in_per_call(**env):
        # XLA_FLAGS empty: the tuning's own device split, as the command-line tools run.
        return tuple(int(v) for v in _run_without_malloc_env(_SPLIT, XLA_FLAGS="", **env).split())

    temp, paged = temp_and_mib_paged_in_per_call()
    assert temp >= 128 and paged < 16  # split into heap-sized blocks, which malloc keeps
    # The mallopt settings alone (the user's own here, so no split is asked for): one 128 MiB block, which glibc
    # maps afresh on every call whatever they say.
    temp, paged = temp_and_mib_paged_in_per_call(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    assert temp >= 128 and paged >= 100


def test_the_train_step_is_compiled_with_the_malloc_compiler_options(monkeypatch):
    import jax

    from configs import shapes as shapes_config
    from semflow_jax import sharding, train
    from semflow_jax.cpu import malloc_options
    from semflow_jax.data import pipeline

    option = {"xla_multiheap_size_constraint_per_heap": 40 << 20}
    monkeypatch.setattr(malloc_options, "compiler_options", lambda platform="cpu": option)
    config = shapes_config.get_config("tiny")
    mesh = sharding.mesh_from_config((("data", 1), ("fsdp", 1)), jax.devices()[:1])
    _, template, _, step = train.build_training(config, mesh, init=False)
    host = next(pipeline.train_iterator(config))
    lowered = step.lower(template, {k: sharding.to_global(host[k], mesh) for k in ("image", "label")})
    assert set(option.items()) <= set(lowered._lowering._compiler_options_kvs)  # jax 0.10's Lowered


def test_malloc_defaults_only_where_the_cpu_computes_and_the_user_did_not_choose(monkeypatch):
    from semflow_jax.cpu import malloc_options, xla_options

    monkeypatch.setattr(malloc_options, "APPLIED", {})
    monkeypatch.setattr(xla_options, "accelerator_installed", lambda: True)
    assert malloc_options.apply({}) == {}  # a GPU or TPU computes: host malloc left alone
    monkeypatch.setattr(xla_options, "accelerator_installed", lambda: False)
    for env, reason in (
        ({"SEMFLOW_MALLOC_DEFAULTS": "off"}, "SEMFLOW_MALLOC_DEFAULTS=0"),
        ({"MALLOC_MMAP_MAX_": "1"}, "MALLOC_MMAP_MAX_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD"),
    ):
        assert malloc_options.user_chose(env) == reason and malloc_options.apply(env) == {}
    assert malloc_options.user_chose({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"}) is None
    monkeypatch.setattr(malloc_options, "glibc", lambda: False)
    assert malloc_options.apply({}) == {}  # macOS, musl: these parameter numbers are glibc's
