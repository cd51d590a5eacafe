"""What a training run writes besides its weights: the checkpoint's records and the run directory's files.

Everything here reads a :class:`~openllm.training.run.Run`; the formats themselves live in
:mod:`openllm.checkpoint.format` (the checkpoint) and :mod:`openllm.checkpoint.rundir` (the files).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import report, rundir
from openllm.core.environment import describe_environment
from openllm.core.fileio import atomic_write_json
from openllm.data.mixture import DatasetMixture, MixtureSampler
from openllm.model.lora import lora_state_dict
from openllm.training import sharding
from openllm.training.run import Run
from openllm.training.schedule import scheduler_state
from openllm.training.trackers import Trackers, read_records, step_values, validation_values, wanted


def training_config(run: Run) -> dict:
    cfg, dirs = run.cfg.to_dict(), [str(d) for d in dataset_dirs(run)]
    cfg.update(
        {
            "world_size": run.dist.world_size,
            "global_batch_size": run.global_batch,
            "tokens_per_step": run.global_batch * run.cfg.seq_len,
            "device_type": run.device.type,
            "autocast_dtype": str(run.autocast_dtype).replace("torch.", ""),
            "dataset_dir": dirs[0],  # (absolute: read from anywhere later)
            "dataset_dirs": dirs,  # (a mixture's every dataset, in --data order)
            "vocab_size": run.model_config.vocab_size,  # what the model has, whatever was asked for
            "torch_threads": torch.get_num_threads(),
            "validation_fingerprint": run.validation_fingerprint,
        }
    )
    return cfg


def dataset_dirs(run: Run) -> list[Path]:
    parts = run.dataset.parts if isinstance(run.dataset, DatasetMixture) else [run.dataset]
    return [Path(p.path).resolve() for p in parts]


def mixture_record(run: Run) -> dict | None:
    """A mixture's datasets, weights and the tokens each supplied so far (None for one dataset)."""
    if not isinstance(run.dataset, DatasetMixture) or not isinstance(run.sampler, MixtureSampler):
        return None
    return run.dataset.record(run.state.samples_seen, run.cfg.seq_len, run.sampler)


def model_info(run: Run) -> dict:
    return {
        "model_size": run.cfg.model_size,
        **run.raw_model.summary(run.cfg.seq_len),
        "tokenizer": run.tokenizer.describe(),
    }


def training_stats(run: Run) -> dict:
    return run.state.stats(
        epochs=run.state.samples_seen / run.sampler.windows_per_epoch,
        world_size=run.dist.world_size,
        device=str(run.device),
    )


def build_checkpoint(run: Run, whole: bool = False) -> dict:
    """The run's checkpoint as it is now. Under --fsdp its model and optimizer tensors are this process's shards
    (DTensors), or with ``whole`` gathered whole (every process must then call it: the gathering is collective)."""
    st = run.state
    lora = None
    adapters = run.cfg.finetune.lora()
    if adapters is not None and run.base is not None:  # the adapters, and where their frozen base is
        lora = ck.lora_record(adapters, run.base.path, run.base.sha256)
    model_state = lora_state_dict(run.raw_model) if lora else run.raw_model.state_dict()
    optimizer_state = run.optimizer.state_dict()
    if whole:
        keep = run.dist.is_main  # (the others take part in gathering, and drop what they gathered)
        model_state, optimizer_state = sharding.whole(model_state, keep), sharding.whole(optimizer_state, keep)
    return ck.build_checkpoint(
        model_state=model_state,
        optimizer_state=optimizer_state,
        state=st,
        model_config=run.model_config,
        training_config=training_config(run),
        model_info=model_info(run),
        scheduler=scheduler_state(st.step, run.cfg.schedule),
        training_stats=training_stats(run),
        epoch=st.samples_seen // run.sampler.windows_per_epoch,
        tokenizer_sha256=run.tokenizer_sha256,
        dataset_fingerprint=run.dataset.fingerprint,
        provenance=ck.training_provenance(run.origin, st.step),
        resume=ck.resume_record(
            samples_seen=st.samples_seen,
            tokens_per_sample=run.cfg.seq_len,
            world_size=run.dist.world_size,
            grad_scaler=run.scaler.state_dict() if run.scaler.is_enabled() else {},
        ),
        lora=lora,
        mixture=mixture_record(run),
    )


def write_run_files(run: Run) -> None:
    d = run.run_dir
    atomic_write_json(
        d / "config.json", rundir.model_config_json(run.model_config.to_dict(), {"model_size": run.cfg.model_size})
    )
    atomic_write_json(d / "training_config.json", training_config(run))
    atomic_write_json(
        d / "generation_config.json", rundir.generation_config(run.model_config.block_size, run.tokenizer.special)
    )
    run.tokenizer.save(d, model_max_length=run.model_config.block_size)
    atomic_write_json(d / report.ENVIRONMENT, describe_environment())  # this start's machine, for the report


def write_logs(run: Run) -> None:
    rundir.write_logs(run.run_dir, run.state.training_log, run.state.validation_log)


def write_model_card(run: Run) -> ck.CheckpointView:
    """The run's README.md: its report, from the files the run has written (the newest checkpoint first); returns
    the records it was built from."""
    info = ck.read_info(build_checkpoint(run))  # (the records in memory: no reload)
    report.write_report(run.run_dir, info)
    return info


def write_plot(run: Run) -> Path | None:
    try:
        from openllm.checkpoint.plot import plot_run

        return plot_run(run.run_dir)
    except ImportError:  # matplotlib is optional
        return None


def complete_finished_run(run_dir: Path) -> bool:
    """Write the card and curves of a run killed after final_model.pt was in place; True if any was missing."""
    card, curves = run_dir / "README.md", run_dir / "training_curves.png"
    if card.is_file() and curves.is_file():
        return False
    if not curves.is_file():  # (first: the report shows the curves when they are there)
        try:
            from openllm.checkpoint.plot import plot_run

            plot_run(run_dir)
        except ImportError:
            pass
    if not card.is_file():
        report.write_report(run_dir)
    return True


def open_trackers(run: Run, warn: Callable[[str], None], earlier: dict[int, dict[str, float]]) -> Trackers | None:
    """The run's ``--report-to`` trackers (:mod:`openllm.training.trackers`), opened on rank 0 (None: none asked
    for, or another rank); ``earlier``: the figures an interrupted attempt logged of the steps it will redo."""
    names = wanted(run.cfg.report_to, run.cfg.tensorboard)
    if not names or not run.dist.is_main:
        return None

    def history() -> list[tuple[int, dict[str, float]]]:
        """The run's records so far: metrics.jsonl's steps (cut at the resumed step) and the validations."""
        steps = [(r["step"], step_values(r)) for r in read_records(run.run_dir / "metrics.jsonl")]
        checks = [(r["step"], validation_values(r)) for r in run.state.validation_log]
        return sorted(steps + checks, key=lambda item: item[0])  # (stable: a step's figures, then its validation)

    project, step = run.cfg.tracker_project, run.state.step
    return Trackers(names, run.run_dir, project, training_config(run), step, history, warn, earlier)


def finish_trackers(run: Run, trackers: Trackers | None, info: ck.CheckpointView) -> None:
    """The run's results (from ``info``, the records its report was just written from) and that report to its
    trackers."""
    if trackers is not None:
        trackers.finish(report.run_results(run.run_dir, info), run.run_dir / report.REPORT)
