"""Training curves of a run directory: loss against step, learning rate, best and stop marked."""

from __future__ import annotations

import os
from pathlib import Path

from openllm.checkpoint.format import load_checkpoint, read_info
from openllm.checkpoint.rundir import FINAL
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import read_json


def _records(path: Path, what: str, needed: tuple[str, ...]) -> list[dict]:
    """A log file as a list of records that each hold a number for every ``needed`` key, or one error naming
    the file and the first record that does not (valid JSON of another shape is as unusable as broken JSON)."""
    data = read_json(path, what)
    if not isinstance(data, list):
        raise OpenLLMError(f"{what} {path} must hold a list of records, not a {type(data).__name__}")
    for i, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise OpenLLMError(f"{what} {path}: record {i} is a {type(record).__name__}, not an object")
        for key in needed:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problem = "lacks" if key not in record else f"has a {type(value).__name__} for"
                raise OpenLLMError(f"{what} {path}: record {i} {problem} {key!r} (a number is needed)")
    return data


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``training_curves.png`` (or ``output``) for a run directory; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, and a quarter second less import

    run_dir = Path(run_dir)
    train = _records(run_dir / "training_log.json", "training log", ("step", "loss", "learning_rate"))
    val_file = run_dir / "validation_log.json"
    val = _records(val_file, "validation log", ("step", "validation_loss")) if val_file.is_file() else []
    if not train:
        raise OpenLLMError(f"{run_dir}: the training log is empty; nothing to plot")
    stop_reason = None
    final = run_dir / FINAL
    if final.is_file():  # why the run stopped (max steps, early stopping) is in its final checkpoint
        try:
            stop_reason = read_info(load_checkpoint(final, mmap=True)).stop_reason
        except OpenLLMError:
            stop_reason = None

    fig = Figure(figsize=(9, 7))
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.6, label="training loss")
    if val:
        vs = [r["step"] for r in val]
        vl = [r["validation_loss"] for r in val]
        ax.plot(vs, vl, "o-", color="C1", label="validation loss")
        best = min(range(len(vl)), key=lambda i: vl[i])
        ax.scatter(
            [vs[best]],
            [vl[best]],
            s=160,
            marker="*",
            color="C3",
            zorder=5,
            label=f"best: {vl[best]:.4f} at step {vs[best]}",
        )
    reason = f"\n{stop_reason[:90]}" if stop_reason else ""
    ax.axvline(steps[-1], color="grey", ls="--", lw=1, label=f"stopped at step {steps[-1]}{reason}")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r["learning_rate"] for r in train], color="C2")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"OpenLLM run {run_dir.name}")
    fig.tight_layout()
    out = Path(output) if output else run_dir / "training_curves.png"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    return out
