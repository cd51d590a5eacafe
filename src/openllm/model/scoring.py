"""Scoring text with a model: token-weighted loss, perplexity and bits per byte.

Text is encoded the way training encoded it (documents as BOS + ids + EOS, packed) and scored
with sliding windows: each window holds up to ``seq_len`` tokens, windows start every ``stride``
tokens (default: half a window), and only targets not scored by an earlier window count, so every
token is scored once, with at least ``seq_len - stride`` tokens of context after the first window.
``stride == seq_len`` gives the trainer's own non-overlapping validation windows.

Bits per byte = total loss in bits / UTF-8 bytes of the evaluated text (for a file: its size; for
a prepared split: its documents' bytes plus one separator byte per document).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from openllm.core.errors import OpenLLMError
from openllm.core.memory import available_memory, gib
from openllm.core.progress import Progress
from openllm.data.corpus import read_text, split_documents
from openllm.data.dataset import load_dataset, token_dtype
from openllm.data.prepare import pack
from openllm.data.tokenizer import Tokenizer
from openllm.model import LanguageModel


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    source: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def window_plan(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for each window over targets 1..n_tokens-1; ``scored`` are its last targets."""
    if stride > seq_len or stride <= 0:
        raise OpenLLMError(f"--stride must be between 1 and the window length {seq_len}, got {stride}")
    plan, done = [], 0
    last = n_tokens - 1  # number of targets
    begin = 0
    while done < last:
        end = min(begin + seq_len, last)
        plan.append((begin, end, end - done))
        done = end
        begin += stride
    return plan


@torch.no_grad()
def stream_nll(
    model: LanguageModel,
    tokens: np.ndarray,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and count of scored targets over a token stream."""
    model.eval()
    plan = window_plan(len(tokens), seq_len, stride)
    check_batch_memory(model, min(batch_size, len(plan)), seq_len, device)
    total, count = 0.0, 0
    i = 0
    progress = Progress(len(plan), "scoring", "windows")
    while i < len(plan):
        length = plan[i][1] - plan[i][0]
        group = [plan[i]]
        while (
            i + len(group) < len(plan)
            and len(group) < batch_size
            and plan[i + len(group)][1] - plan[i + len(group)][0] == length
        ):
            group.append(plan[i + len(group)])
        block = torch.from_numpy(np.stack([np.asarray(tokens[b : e + 1], dtype=np.int64) for b, e, _ in group]))
        x, y = block[:, :-1].to(device), block[:, 1:].to(device)
        logits, _ = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(
            y.shape
        )
        for row, (_, _, scored) in enumerate(group):
            total += float(nll[row, -scored:].double().sum())
            count += scored
        i += len(group)
        progress.update(len(group))
    progress.close()
    return total, count


def check_batch_memory(model: LanguageModel, windows: int, seq_len: int, device) -> None:
    """Refuse a batch whose logits alone would not fit in memory (float32, about three copies: the logits,
    their float32 view and the log-softmax of the loss), before the first forward pass tries."""
    need = windows * seq_len * model.config.vocab_size * 4 * 3
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        raise OpenLLMError(
            f"--batch-size {windows:,} windows of {seq_len:,} tokens need about {gib(need)} for their logits, more "
            f"than the {gib(free)} free; lower --batch-size"
        )


def _result(total: float, count: int, n_bytes: int, source: str) -> EvalResult:
    loss = total / max(count, 1)
    return EvalResult(loss, math.exp(min(loss, 700)), total / math.log(2) / max(n_bytes, 1), count, n_bytes, source)


def encode_file(tokenizer: Tokenizer, path: str | os.PathLike) -> tuple[np.ndarray, int, str]:
    """Packed tokens, byte count and sha256 of a text file."""
    text, raw = read_text(path)
    docs = split_documents(text)
    if not docs:
        raise OpenLLMError(f"{path} holds no text")
    return pack(tokenizer, docs, token_dtype(tokenizer.vocab_size)), len(raw), hashlib.sha256(raw).hexdigest()


def evaluate_file(
    model: LanguageModel,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device="cpu",
) -> EvalResult:
    seq_len = min(seq_len or model.config.block_size, model.config.block_size)
    tokens, n_bytes, _ = encode_file(tokenizer, path)
    total, count = stream_nll(model, tokens, seq_len, stride or max(1, seq_len // 2), batch_size, device)
    return _result(total, count, n_bytes, str(path))


def evaluate_dataset(
    model: LanguageModel,
    dataset_dir: str | os.PathLike,
    split: str = "val",
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device="cpu",
) -> EvalResult:
    ds = load_dataset(dataset_dir)
    seq_len = min(seq_len or model.config.block_size, model.config.block_size)
    tokens = ds.val if split == "val" else ds.train
    total, count = stream_nll(model, tokens, seq_len, stride or max(1, seq_len // 2), batch_size, device)
    n_bytes = ds.meta[f"{split}_text_bytes"] + ds.meta[f"{split}_documents"]
    return _result(total, count, n_bytes, f"{Path(dataset_dir)} ({split})")
