"""Evaluation reports beside metrics.json: the steps ablation as a Markdown table and a plot, and the
per-class IoU table."""

from __future__ import annotations

import io
import math

from semflow_jax.errors import atomic_write_bytes


def _fmt(x, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def steps_table(metrics: dict) -> str:
    """Markdown: one row per step count N with segmentation mIoU and synthesis FID where measured."""
    seg = metrics["segmentation"]["miou_by_steps"]
    fid_by = (metrics["synthesis"].get("fid") or {}).get("by_steps", {})
    steps = sorted({int(n) for n in seg} | {int(n) for n in fid_by})
    lines = [
        f"Steps ablation ({metrics['solver']}, {metrics['num_examples']} {metrics['split']} examples of "
        f"{metrics['dataset']})",
        "",
        "| N | segmentation mIoU | synthesis FID |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {n} | {_fmt(seg.get(str(n)))} | {_fmt(fid_by.get(str(n)))} |" for n in steps]
    return "\n".join(lines) + "\n"


def per_class_table(per_class: dict) -> str:
    """Markdown: class name and IoU (– for a class absent from both ground truth and prediction)."""
    lines = ["| class | IoU |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(v)} |" for name, v in per_class.items()]
    return "\n".join(lines) + "\n"


def plot_steps(metrics: dict, path: str) -> None:
    """PNG: segmentation mIoU against N, and synthesis FID against N when measured (log-scale N)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    seg = {int(n): v for n, v in metrics["segmentation"]["miou_by_steps"].items()}
    fid_by = {int(n): v for n, v in ((metrics["synthesis"].get("fid") or {}).get("by_steps", {})).items()}
    panels = 2 if fid_by else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), dpi=120, squeeze=False)
    ax = axes[0][0]
    ax.plot(sorted(seg), [seg[n] for n in sorted(seg)], "o-", color="tab:blue")
    ax.set(xscale="log", xlabel="Euler steps N", ylabel="mIoU", title="segmentation")
    ax.set_xticks(sorted(seg), [str(n) for n in sorted(seg)])
    ax.grid(alpha=0.3)
    if fid_by:
        ax = axes[0][1]
        ax.plot(sorted(fid_by), [fid_by[n] for n in sorted(fid_by)], "s-", color="tab:red")
        ax.set(xscale="log", xlabel="Euler steps N", ylabel="FID", title="synthesis")
        ax.set_xticks(sorted(fid_by), [str(n) for n in sorted(fid_by)])
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured N are labelled
    fig.suptitle(f"{metrics['dataset']}: steps ablation", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
