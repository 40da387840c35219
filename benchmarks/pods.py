"""The paper configs planned for TPU slices: `python benchmarks/pods.py [--configs=coco,...] [--topologies=v5e-8,...]`.

One `python -m semflow_jax.plan` subprocess per (config, slice) row, each writing
benchmarks/results/plans/CONFIG-SLICE.json (a row whose JSON is there is kept unless --force), then the
table of every planned row: benchmarks/results/pods.md and pods.json. `--table_only` only rebuilds the
table. libtpu must be importable by the subprocesses: on PYTHONPATH, or in .venv/libtpu (the test command
installs it there), or at SEMFLOW_LIBTPU_PATH.

These are the TPU compiler's plans, compiled ahead of time on a host without a TPU, not measured runs. On a
2-core host with 24 GB of RAM one SD-1.5 row takes 15-40 minutes (the FSDP train step's compile is most
of it, at up to 23 GB of RAM), so rows are planned one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = os.path.join(ROOT, "benchmarks", "results", "plans")
CONFIGS = ("coco", "cityscapes", "celebamask", "ade20k")
TOPOLOGIES = ("v5e-8", "v4-32", "v5p-64", "v6e-8")


def libtpu_path() -> str:
    """Where the subprocesses find libtpu: SEMFLOW_LIBTPU_PATH, else .venv/libtpu if it is there, else ""."""
    path = os.environ.get("SEMFLOW_LIBTPU_PATH") or os.path.join(ROOT, ".venv", "libtpu")
    return path if os.path.isdir(path) else ""


def plan_row(config: str, topology: str, programs: str = "") -> dict:
    """Plans one row in a subprocess; returns its exit code, wall time and last stderr line."""
    out = os.path.join(PLANS, f"{config}-{topology}.json")
    cmd = [sys.executable, "-m", "semflow_jax.plan", f"--config=configs/{config}.py", f"--topology={topology}",
           f"--out={out}"] + ([f"--programs={programs}"] if programs else [])  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (libtpu_path(), ROOT, env.get("PYTHONPATH"))))
    started = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    return {
        "rc": r.returncode,
        "wall_sec": round(time.perf_counter() - started),
        "last_line": lines[-1] if lines else "",
    }


def _row(config: str, topology: str, doc: dict) -> dict:
    train = doc["programs"].get("train_step", {})
    sampler = doc["programs"].get("sampler", {})
    c = train.get("collectives") or {}
    return {
        "config": config,
        "slice": topology,
        "chips": doc["slice"]["chips"],
        "hosts": doc["slice"]["hosts"],
        "mesh": train.get("mesh") or dict(doc["config"]["mesh"]),  # the sizes the slice gave -1
        "batch_per_chip": doc["config"]["train.batch_size_per_device"],
        "grad_accum_steps": doc["config"]["train.grad_accum_steps"],
        "train_peak_gib": train.get("peak_gib"),
        "hbm_gib": train.get("hbm_gib_per_chip"),
        "train_fits": train.get("fits"),
        "train_margin_gib": train.get("margin_gib", -train.get("short_by_gib", 0.0)),
        "train_images_per_sec_per_chip": train.get("images_per_sec_per_chip"),
        "train_mfu_at_roofline": train.get("mfu_at_roofline"),
        "train_roofline_bound": train.get("roofline_bound"),
        "train_collective_gb_per_step": c.get("bytes_per_chip", 0.0) / 1e9 if c else None,
        "sampler_peak_gib": sampler.get("peak_gib"),
        "sampler_images_per_sec_per_chip": sampler.get("images_per_sec_per_chip"),
        "all_fit": all(p["fits"] for p in doc["programs"].values()),
        "programs": sorted(doc["programs"]),
        "compile_sec": sum(p.get("compile_sec", 0.0) for p in doc["programs"].values()),
        "date": doc.get("environment", {}).get("date", ""),
    }


def _f(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict], missing: list[tuple[str, str]]) -> str:
    """The README's table: one line per planned row, then the rows not planned."""
    lines = [
        "| config | slice (chips, hosts) | mesh, micro-batches | train step peak / HBM per chip | fits "
        "| images/s per chip (roofline) | MFU at roofline | collectives per step per chip "
        "| sampler images/s per chip |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
        fits = "yes" if r["train_fits"] else "**no**"
        fits += f", {abs(r['train_margin_gib']):.2f} GiB {'to spare' if r['train_fits'] else 'short'}"
        lines.append(
            f"| {r['config']} | {r['slice']} ({r['chips']}, {r['hosts']}) | {mesh}, {r['grad_accum_steps']} | "
            f"{_f(r['train_peak_gib'])} / {_f(r['hbm_gib'])} GiB | {fits} | "
            f"{_f(r['train_images_per_sec_per_chip'], 1)} ({r['train_roofline_bound'] or ''}) | "
            f"{_f(100 * r['train_mfu_at_roofline'], 0) + '%' if r['train_mfu_at_roofline'] else ''} | "
            f"{_f(r['train_collective_gb_per_step'], 1)} GB | {_f(r['sampler_images_per_sec_per_chip'], 1)} |"
        )
    if missing:
        by_config: dict[str, list[str]] = {}
        for c, t in missing:
            by_config.setdefault(c, []).append(t)
        planned = {r["slice"] for r in rows} | {t for ts in by_config.values() for t in ts}
        every = [c for c, ts in by_config.items() if set(ts) == planned]
        parts = [f"{', '.join(every)} on any of {', '.join(sorted(planned))}"] if every else []
        parts += [f"{c} on {', '.join(ts)}" for c, ts in by_config.items() if c not in every]
        lines += ["", f"Not planned here: {'; '.join(parts)}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--programs", default="", help="subset of programs, as semflow_jax.plan --programs")
    ap.add_argument("--force", action="store_true", help="replan rows whose JSON exists")
    ap.add_argument("--table_only", action="store_true", help="only rebuild pods.md / pods.json")
    args = ap.parse_args()
    configs, topologies = args.configs.split(","), args.topologies.split(",")
    os.makedirs(PLANS, exist_ok=True)
    runs = {}
    for config in configs:
        for topology in topologies:
            path = os.path.join(PLANS, f"{config}-{topology}.json")
            if args.table_only or (os.path.exists(path) and not args.force):
                continue
            print(f"planning {config} on {topology} ...", flush=True)
            runs[f"{config}-{topology}"] = run = plan_row(config, topology, args.programs)
            print(f"  exit {run['rc']} after {run['wall_sec']} s: {run['last_line']}", flush=True)
    rows, missing = [], []
    for config in configs:
        for topology in topologies:
            path = os.path.join(PLANS, f"{config}-{topology}.json")
            if os.path.exists(path):
                with open(path) as f:
                    rows.append(_row(config, topology, json.load(f)))
            else:
                missing.append((config, topology))
    md = table(rows, missing)
    note = ("The TPU compiler's plans, compiled ahead of time on a host without a TPU (benchmarks/pods.py); "
            "not measured runs.")  # fmt: skip
    with open(os.path.join(ROOT, "benchmarks", "results", "pods.md"), "w") as f:
        f.write(f"{note}\n\n{md}\n")
    doc = {"note": note, "rows": rows, "not_planned": missing, "runs": runs,
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")}  # fmt: skip
    with open(os.path.join(ROOT, "benchmarks", "results", "pods.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(md)
    return 1 if any(r["rc"] == 2 for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
