"""Batches of a fine-tune: conversations (:mod:`openllm.data.conversations`) as padded rows with a loss mask.

One conversation per row, padded at its end to the longest row of the micro-batch: causal attention never
reaches from one conversation into another and the padding comes after everything real, so no attention mask is
needed and every kernel (SDPA's fused ones included) stays in use. The cost is the padding's compute: the
tokens of a micro-batch are ``batch_size x`` its longest conversation, against the sum of its lengths for packed
rows with a block-diagonal mask (the training log's tokens count only the real ones). Targets the loss must not
count (padding, and what the user and system say unless ``--train-on all``) are -1, the index the models'
cross-entropy ignores.

Sample ``k`` of the run is conversation ``perm[k mod n]`` of epoch ``k // n`` (a permutation from the seed and
the epoch), so the data position stays the one integer a checkpoint records and resume continues exactly.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from openllm.core.errors import OpenLLMError
from openllm.data.conversations import ConversationSplit

IGNORE = -1  # the target id the models' loss leaves out (model.base: F.cross_entropy(..., ignore_index=-1))


def padded(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> torch.Tensor:
    """Inputs and targets of ``rows`` (ids, mask) as one int64 tensor of shape 2 x rows x (longest - 1): one copy
    moves both to the device. Target t of a row is id t+1 where its mask is set, else IGNORE."""
    width = max(len(ids) for ids, _ in rows) - 1
    block = np.full((2, len(rows), width), IGNORE, dtype=np.int64)
    block[0].fill(pad_id)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        block[0, r, :n] = ids[:-1]
        block[1, r, :n] = np.where(mask[1:], ids[1:], IGNORE)
    return torch.from_numpy(block)


class ConversationSampler:
    """Deterministic training rows from a conversation split (the same contract as data.batches.BatchSampler:
    ``windows_per_epoch`` and ``windows(first_sample, batch_size)``, here a 2 x B x T block of inputs and
    targets; :func:`inputs_targets` takes it apart)."""

    def __init__(self, split: ConversationSplit, seed: int, pad_id: int):
        if len(split) == 0:
            raise OpenLLMError("the training split holds no conversations")
        self.split, self.seed, self.pad_id = split, seed, pad_id
        self.windows_per_epoch = len(split)
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _rows(self, first_sample: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        rows = []
        for k in range(first_sample, first_sample + count):
            epoch, i = divmod(k, self.windows_per_epoch)
            if epoch != self._epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
                self._epoch = epoch
            rows.append(self.split[int(self._perm[i])])
        return rows

    def windows(self, first_sample: int, batch_size: int) -> torch.Tensor:
        return padded(self._rows(first_sample, batch_size), self.pad_id)

    def tokens_in(self, first_sample: int, count: int) -> int:
        """The real input tokens of samples first..first+count-1 (each conversation's, without the padding)."""
        return sum(len(ids) - 1 for ids, _ in self._rows(first_sample, count))

    def counted_targets(self, first_sample: int, count: int) -> int:
        """How many targets the loss counts in samples first..first+count-1 (the masked ones, as in ``padded``)."""
        return sum(int(np.count_nonzero(mask[1:])) for _, mask in self._rows(first_sample, count))


class ConversationEvalBatches:
    """The validation conversations in order, ``batch_size`` rows at a time (at most ``max_batches`` batches),
    on ``device``; read from the memory-mapped split each time they are iterated."""

    def __init__(self, split: ConversationSplit, batch_size: int, max_batches: int | None, pad_id: int, device=None):
        self.split, self.batch_size, self.pad_id, self.device = split, batch_size, pad_id, device
        n = len(split)
        self.count = n if max_batches is None else min(n, max_batches * batch_size)

    def __iter__(self):
        for start in range(0, self.count, self.batch_size):
            rows = [self.split[i] for i in range(start, min(start + self.batch_size, self.count))]
            block = padded(rows, self.pad_id)
            if self.device is not None:
                block = block.to(self.device)
            yield block[0], block[1]

    def __bool__(self) -> bool:
        return self.count > 0


def inputs_targets(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and targets of a sampler's block: the two slices of a token window (B x T+1), or the two
    planes of a conversation block (2 x B x T)."""
    if block.dim() == 3:
        return block[0], block[1]
    return block[:, :-1], block[:, 1:]


def split_digest(split: ConversationSplit) -> str:
    """sha256 of a split's ids and masks (the validation text's fingerprint)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.offsets).tobytes())
    digest.update(np.ascontiguousarray(split.ids).tobytes())
    digest.update(np.ascontiguousarray(split.mask).tobytes())
    return digest.hexdigest()
