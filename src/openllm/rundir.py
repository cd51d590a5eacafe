"""The files of a run directory besides the checkpoints: configs, logs, model card, plot.

Layout (Hugging Face Trainer style)::

    best_model.pt  final_model.pt  checkpoint_step_N.pt   full checkpoints (see openllm.checkpoint)
    config.json  training_config.json  generation_config.json
    tokenizer.model  tokenizer_config.json
    training_log.json  validation_log.json  metrics.jsonl
    README.md (model card)  training_curves.png  dataset/ (when trained from --data-file)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from openllm import __version__
from openllm.fileio import atomic_write_json, atomic_write_text
from openllm.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

if TYPE_CHECKING:
    from openllm.train import Run


def generation_config(max_length: int) -> dict:
    return {"max_length": max_length, "max_new_tokens": 256, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
            "do_sample": True, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def model_config_json(config: dict, extra: dict | None = None) -> dict:
    return {"architectures": ["GPT"], "model_type": "openllm-gpt", **config, "openllm_version": __version__,
            **(extra or {})}


def training_config(run: "Run") -> dict:
    cfg = run.cfg.to_dict()
    cfg.update({"world_size": run.dist.world_size, "global_batch_size": run.global_batch,
                "tokens_per_step": run.global_batch * run.cfg.seq_len, "device_type": run.device.type,
                "autocast_dtype": str(run.autocast_dtype).replace("torch.", ""),
                "dataset_dir": str(run.dataset.path)})
    return cfg


def model_info(run: "Run") -> dict:
    m = run.raw_model
    return {"model_size": run.cfg.model_size, "architecture": "GPT-2 (pre-LayerNorm, learned positions, tied head)",
            "parameters": m.num_parameters(), "parameters_without_positions": m.num_parameters(exclude_embeddings=True),
            "vocab_size": run.model_config.vocab_size, "context": run.model_config.block_size,
            "dtype": "float32", "flops_per_token": m.flops_per_token(run.cfg.seq_len)}


def training_stats(run: "Run") -> dict:
    st = run.state
    return {"total_steps": st.step, "samples_seen": st.samples_seen, "tokens_seen": st.tokens_seen,
            "epochs": st.samples_seen / run.sampler.windows_per_epoch,
            "elapsed_seconds": st.elapsed_seconds,
            "average_tokens_per_second": st.tokens_seen / st.elapsed_seconds if st.elapsed_seconds else None,
            "skipped_steps": st.skipped_steps, "best_step": st.best_step,
            "best_validation_loss": st.best_validation_loss,
            "last_validation_loss": st.validation_log[-1]["validation_loss"] if st.validation_log else None,
            "lowest_training_loss": st.lowest_training_loss,
            "last_training_loss": st.training_log[-1]["loss"] if st.training_log else None,
            "stop_reason": st.stop_reason, "resumed_from": list(st.resumed_from),
            "world_size": run.dist.world_size, "device": str(run.device)}


def write_run_files(run: "Run", tokenizer: Tokenizer) -> None:
    d = run.run_dir
    atomic_write_json(d / "config.json", model_config_json(run.model_config.to_dict(), {"model_size": run.cfg.model_size}))
    atomic_write_json(d / "training_config.json", training_config(run))
    atomic_write_json(d / "generation_config.json", generation_config(run.model_config.block_size))
    tokenizer.save(d, model_max_length=run.model_config.block_size)


def write_logs(run: "Run") -> None:
    atomic_write_json(run.run_dir / "training_log.json", run.state.training_log)
    atomic_write_json(run.run_dir / "validation_log.json", run.state.validation_log)


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def model_card(title: str, info: dict, stats: dict, tcfg: dict, provenance: str) -> str:
    lines = [
        f"# {title}", "",
        "A GPT language model trained with OpenLLM. Every figure below was measured during this run.", "",
        "## Model", "",
        f"- architecture: {info.get('architecture', 'GPT-2')}",
        f"- parameters: {_fmt(info.get('parameters'))}",
        f"- vocabulary: {_fmt(info.get('vocab_size'))} SentencePiece BPE tokens; context {_fmt(info.get('context'))}",
        "", "## Training", "",
        f"- provenance: {provenance}",
        f"- steps: {_fmt(stats.get('total_steps'))}; tokens seen: {_fmt(stats.get('tokens_seen'))}; "
        f"epochs: {_fmt(stats.get('epochs'), 2)}",
        f"- best validation loss: {_fmt(stats.get('best_validation_loss'))} at step {_fmt(stats.get('best_step'))} "
        f"(perplexity {_fmt(math.exp(stats['best_validation_loss']) if _finite(stats.get('best_validation_loss')) else None, 2)})",
        f"- last training loss: {_fmt(stats.get('last_training_loss'))}",
        f"- skipped (non-finite) steps: {_fmt(stats.get('skipped_steps'))}",
        f"- wall time: {_fmt(stats.get('elapsed_seconds'), 1)} s; average throughput "
        f"{_fmt(stats.get('average_tokens_per_second'), 0)} tokens/s on {stats.get('device')}",
        f"- stopped because: {stats.get('stop_reason') or 'still running'}",
        f"- batch {tcfg.get('batch_size')} x {tcfg.get('seq_len')} tokens x {tcfg.get('gradient_accumulation_steps')} "
        f"accumulation x {tcfg.get('world_size', 1)} process(es); learning rate {tcfg.get('learning_rate')} -> "
        f"{tcfg.get('min_lr')} (warmup {tcfg.get('warmup_steps')}), weight decay {tcfg.get('weight_decay')}",
        "", "## Use", "",
        "```bash", "openllm generate --model . --prompt \"Once upon a time\"", "openllm export --checkpoint best_model.pt --output-dir hf",
        "```", "",
    ]
    return "\n".join(lines)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def write_model_card(run: "Run") -> None:
    text = model_card(f"OpenLLM {run.cfg.model_size} model", model_info(run), training_stats(run),
                      training_config(run), "trained from scratch with openllm")
    atomic_write_text(run.run_dir / "README.md", text)


def write_plot(run: "Run") -> Path | None:
    try:
        from openllm.plot import plot_run
    except ImportError:  # matplotlib is optional
        return None
    try:
        return plot_run(run.run_dir)
    except ImportError:
        return None
