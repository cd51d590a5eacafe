"""Dataset mixtures: ``openllm train --data A --data B --data-weights 0.7,0.3``.

Each prepared dataset keeps its own split, windows and epochs (a :class:`BatchSampler` of its own); the
mixture decides which dataset each global sample comes from. Samples are dealt in blocks of
:data:`BLOCK`: a block holds each dataset's share of the weights (largest remainders rounded up), in an
order shuffled by the seed and the block's number. Sample ``k`` of the run therefore maps to one dataset
and one sample of it without replaying the run, the data position stays one integer, exact resume
continues the same order for any number of processes, and after ``n`` samples each dataset has supplied
its share within one block's rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from openllm.core.errors import OpenLLMError
from openllm.data.batches import BatchSampler, EvalBatches, WindowSampler
from openllm.data.dataset import PreparedDataset
from openllm.data.tokenizer import Tokenizer

BLOCK = 1000  # samples per block: each dataset's share is exact at every multiple of it


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The weights as shares summing to 1 (equal when None); refused by option name when unusable."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise OpenLLMError(f"--data-weights gives {len(weights)} weight(s) for {count} --data dataset(s)")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise OpenLLMError(f"--data-weights must be positive numbers, got {','.join(f'{w:g}' for w in weights)}")
    total = sum(weights)
    return [w / total for w in weights]


def block_counts(weights: Sequence[float], block: int = BLOCK) -> list[int]:
    """Each dataset's samples in a block: its share, the largest remainders rounded up; at least one each."""
    raw = [w * block for w in weights]
    counts = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    for i in by_remainder[: max(0, block - sum(counts))]:
        counts[i] += 1
    return counts


@dataclass
class DatasetMixture:
    """Prepared datasets with one tokenizer, sampled by weight."""

    parts: list[PreparedDataset]
    weights: list[float]  # normalised

    @classmethod
    def of(cls, parts: list[PreparedDataset], weights: Sequence[float] | None) -> DatasetMixture:
        shares = normalised_weights(weights, len(parts))
        first = parts[0].tokenizer.sha256
        for p in parts[1:]:
            if p.tokenizer.sha256 != first:
                raise OpenLLMError(
                    f"the datasets of a mixture must share one tokenizer: {p.path} was prepared with another "
                    f"tokenizer than {parts[0].path} (prepare it with --tokenizer {parts[0].path})"
                )
        return cls(parts, shares)

    @property
    def names(self) -> list[str]:
        """Each dataset's name in logs and records: its directory's name, numbered where two are the same."""
        names = [p.path.name or str(p.path) for p in self.parts]
        return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return self.parts[0].tokenizer

    @property
    def fingerprint(self) -> str:
        """Of the datasets and their weights: another mixture is other data for a resume."""
        record = {"mixture": [[p.fingerprint, round(w, 12)] for p, w in zip(self.parts, self.weights, strict=True)]}
        return hashlib.sha256(json.dumps(record).encode()).hexdigest()

    def record(self, samples_seen: int, seq_len: int, sampler: MixtureSampler) -> dict:
        """What the checkpoint and the report keep: each dataset, its weight and the tokens it supplied."""
        seen = sampler.samples_by_dataset(samples_seen)
        return {
            "datasets": [
                {"name": n, "path": str(p.path.resolve()), "fingerprint": p.fingerprint, "weight": w}
                for n, p, w in zip(self.names, self.parts, self.weights, strict=True)
            ],
            "tokens_seen": {n: s * seq_len for n, s in zip(self.names, seen, strict=True)},
        }


class MixtureSampler(WindowSampler):
    """Training windows from several datasets by weight (the module docstring says how), drawn from one
    :class:`BatchSampler` per dataset (seeded apart)."""

    def __init__(self, tokens: Sequence[np.ndarray], weights: Sequence[float], seq_len: int, seed: int):
        self.samplers = [BatchSampler(t, seq_len, seed + i) for i, t in enumerate(tokens)]
        self.seq_len, self.seed = seq_len, seed
        self.counts = block_counts(weights)
        self.block = sum(self.counts)
        self.windows_per_epoch = sum(s.windows_per_epoch for s in self.samplers)  # (for the epoch figure)
        self._planned = -1
        self._order = np.empty(0, dtype=np.int64)
        self._rank = np.empty(0, dtype=np.int64)

    def _plan(self, block: int) -> None:
        """Block ``block``'s order: which dataset each of its samples comes from, and its index among them."""
        if block != self._planned:
            deal = np.repeat(np.arange(len(self.counts)), self.counts)
            self._order = np.random.default_rng([self.seed, 7919, block]).permutation(deal)
            rank = np.empty_like(self._order)
            for d in range(len(self.counts)):
                where = self._order == d
                rank[where] = np.arange(int(where.sum()))
            self._rank, self._planned = rank, block

    def locate(self, k: int) -> tuple[int, int]:
        """Sample ``k`` of the run as (dataset, that dataset's own sample number)."""
        block, i = divmod(k, self.block)
        self._plan(block)
        d = int(self._order[i])
        return d, block * self.counts[d] + int(self._rank[i])

    def samples_by_dataset(self, n: int) -> list[int]:
        """How many of samples 0..n-1 each dataset supplied."""
        block, i = divmod(n, self.block)
        self._plan(block)
        within = np.bincount(self._order[:i], minlength=len(self.counts))
        return [block * c + int(w) for c, w in zip(self.counts, within, strict=True)]

    def windows(self, first_sample: int, batch_size: int) -> torch.Tensor:
        rows = [
            self.samplers[d].windows(j, 1) for d, j in map(self.locate, range(first_sample, first_sample + batch_size))
        ]
        return torch.cat(rows)


class MixtureEvalBatches:
    """Each dataset's fixed validation batches (:class:`EvalBatches`), evaluated apart: the mixture's loss is
    their weighted mean, the weights being the training mixture's."""

    def __init__(self, parts: dict[str, EvalBatches], weights: Sequence[float]):
        self.parts, self.weights = parts, list(weights)

    def __bool__(self) -> bool:
        return all(self.parts.values())

    def combine(self, losses: dict[str, float]) -> float:
        return sum(w * losses[n] for n, w in zip(self.parts, self.weights, strict=True))
