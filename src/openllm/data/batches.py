"""Training and validation batches from a packed token stream."""

from __future__ import annotations

import numpy as np
import torch

from openllm.core.errors import OpenLLMError


class WindowSampler:
    """What every sampler of fixed windows (one stream, or a mixture of streams) derives from :meth:`windows`:
    inputs and targets, and the tokens a span of samples holds (every window counts all its targets)."""

    seq_len: int

    def windows(self, first_sample: int, batch_size: int) -> torch.Tensor:
        raise NotImplementedError

    def counted_targets(self, first_sample: int, count: int) -> int:
        """How many targets the loss counts in samples first..first+count-1: every one of each window."""
        return count * self.seq_len

    def tokens_in(self, first_sample: int, count: int) -> int:
        """The input tokens of samples first..first+count-1."""
        return count * self.seq_len

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, ``batch_size`` x ``seq_len``) for samples first..first+batch-1."""
        block = self.windows(first_sample, batch_size)
        return block[:, :-1], block[:, 1:]


class BatchSampler(WindowSampler):
    """Deterministic training windows from a packed token stream.

    The stream is cut into ``n`` windows of ``seq_len + 1`` tokens; every epoch uses a fresh
    permutation of them and a fresh offset (both from ``seed`` and the epoch number). Sample
    ``k`` of the run (a global counter) therefore always maps to the same window, so the data
    position is one integer and resuming continues exactly, for any number of processes.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < 2 * seq_len + 1:
            raise OpenLLMError(
                f"the training data holds {len(tokens)} tokens, too few for windows of {seq_len}; "
                "use a smaller --seq-len or more text"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows_per_epoch = (len(tokens) - seq_len) // seq_len
        self._epoch, self._shift = -1, 0
        self._perm: np.ndarray = np.empty(0, dtype=np.int64)

    def _plan(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.windows_per_epoch)
            self._shift = int(rng.integers(self.seq_len)) if epoch else 0
            self._epoch = epoch

    def windows(self, first_sample: int, batch_size: int) -> torch.Tensor:
        """The ``batch_size`` x ``seq_len + 1`` windows of samples first..first+batch-1 (int64): inputs and
        targets are its two overlapping slices, so one copy moves both to a device."""
        rows = []
        for k in range(first_sample, first_sample + batch_size):
            epoch, i = divmod(k, self.windows_per_epoch)
            self._plan(epoch)
            start = self._shift + int(self._perm[i]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None):
    """The fixed validation batches: consecutive windows from the start of the stream.

    With ``max_batches`` None, or when the stream is small enough, every token is covered (the
    remainder as one shorter window). Yields (inputs, targets) pairs, int64.
    """
    n = len(tokens) - 1
    starts = range(0, n, seq_len)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    full = [s for s in starts if s + seq_len <= n]
    for i in range(0, len(full), batch_size):
        block = np.stack([tokens[s : s + seq_len + 1] for s in full[i : i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(block)
        yield t[:, :-1], t[:, 1:]
    tail = [s for s in starts if s + seq_len > n]
    for s in tail:
        t = torch.from_numpy(np.asarray(tokens[s : n + 1], dtype=np.int64))[None]
        yield t[:, :-1], t[:, 1:]


class EvalBatches:
    """The fixed validation batches of :func:`eval_batches`, read from the token stream (a memmap) each
    time they are iterated and moved to ``device``: nothing proportional to the split is held."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None, device=None):
        self.tokens, self.seq_len, self.batch_size, self.max_batches = tokens, seq_len, batch_size, max_batches
        self.device = device

    def __iter__(self):
        for x, y in eval_batches(self.tokens, self.seq_len, self.batch_size, self.max_batches):
            yield (x.to(self.device), y.to(self.device)) if self.device is not None else (x, y)

    def __bool__(self) -> bool:
        return len(self.tokens) > 1
