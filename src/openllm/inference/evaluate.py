"""``openllm eval``: score one or more models on held-out text, with the guards that keep the figures honest.

The scoring itself (sliding windows, bits per byte) is in :mod:`openllm.model.scoring`. This module
adds what a user needs to trust a report: the dataset's tokenizer must be the model's, and a
model's own training text is refused unless asked for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from openllm.core.device import DeviceOption, resolve_device
from openllm.core.errors import OpenLLMError
from openllm.core.options import Opt, positive_int
from openllm.core.untrusted import read_json
from openllm.data.dataset import load_dataset
from openllm.inference.loading import load_model
from openllm.model.scoring import encode_file, evaluate_dataset, evaluate_file


def evaluate_models(
    models: Annotated[
        Sequence[str | os.PathLike], Opt("checkpoint files, run directories or exports", flag="--model", nargs="+")
    ],
    data: Annotated[str | os.PathLike, Opt("a text file, or a prepared dataset directory (its val split)")],
    *,
    batch_size: Annotated[int, Opt("windows per forward pass", parse=positive_int)] = 8,
    seq_len: Annotated[int | None, Opt("window length", parse=positive_int, default_text="the model's context")] = None,
    stride: Annotated[
        int | None,
        Opt(
            "window step (--stride = --seq-len reproduces the trainer's validation)",
            parse=positive_int,
            default_text="half the window",
        ),
    ] = None,
    device: DeviceOption = "auto",
    allow_training_data: Annotated[bool, Opt("report even on text the model trained on")] = False,
) -> list[dict]:
    """One result dict per model: model, loss, perplexity, bits_per_byte, tokens, bytes, source."""
    dev = resolve_device(device)
    results = []
    for path in models:
        loaded = load_model(path, dev)
        if Path(data).is_dir():
            ds = load_dataset(data)
            if ds.meta["tokenizer_sha256"] != loaded.tokenizer.sha256:
                raise OpenLLMError(f"{data} was tokenized with a different tokenizer than {path}")
            r = evaluate_dataset(loaded.model, data, "val", seq_len, stride, batch_size, dev)
        else:
            hashes = training_sources(loaded.info.training_config)
            if hashes and not allow_training_data:
                _, _, sha = encode_file(loaded.tokenizer, data)
                if sha in hashes:
                    raise OpenLLMError(
                        f"{data} is the text {path} was trained on (its training split included); "
                        "pass --allow-training-data to report anyway"
                    )
            r = evaluate_file(loaded.model, loaded.tokenizer, data, seq_len, stride, batch_size, dev)
        results.append({"model": str(path), **r.to_dict()})
    return results


def training_sources(training_config: dict) -> set[str]:
    """sha256 of the files a checkpoint's run trained on (when its dataset directory is still there)."""
    hashes: set[str] = set()
    ds_dir = training_config.get("dataset_dir")
    if ds_dir and (Path(ds_dir) / "meta.json").is_file():
        try:
            ds_meta = read_json(Path(ds_dir) / "meta.json", "dataset metadata")
            hashes = {i["sha256"] for i in ds_meta.get("inputs", [])}
        except (OpenLLMError, AttributeError, KeyError, TypeError):
            pass  # no readable record of the training files: nothing to compare with
    return hashes
