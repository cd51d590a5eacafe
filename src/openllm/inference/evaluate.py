"""``openllm eval``: score one or more models on held-out text, with the guards that keep the figures honest.

The scoring itself (sliding windows, bits per byte) is in :mod:`openllm.model.scoring`. This module
adds what a user needs to trust a report: the dataset's tokenizer must be the model's, and a
model's own training text is refused unless asked for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from openllm.core.device import DeviceOption, resolve_device
from openllm.core.errors import OpenLLMError
from openllm.core.extras import require
from openllm.core.options import Opt, checked, nonneg_int, positive_int
from openllm.core.progress import Progress
from openllm.core.untrusted import read_json
from openllm.data.dataset import load_dataset
from openllm.inference.loading import LoadedModel, load_model
from openllm.model.scoring import encode_file, evaluate_dataset, evaluate_file


def evaluate_models(
    models: Annotated[
        Sequence[str | os.PathLike], Opt("checkpoint files, run directories or exports", flag="--model", nargs="+")
    ],
    data: Annotated[
        str | os.PathLike | None, Opt("a text file, or a prepared dataset directory (its val split)")
    ] = None,
    *,
    chat_data: Annotated[
        Sequence[str] | None,
        Opt(
            "conversations (JSON lines or Parquet, as `openllm finetune` reads them) whose last message is the "
            "assistant's answer: the loss on assistant tokens and the exact-match rate of greedy answers",
            nargs="+",
            metavar="FILE",
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        Opt(
            "lm-evaluation-harness tasks to run on the model, in this process (HellaSwag: hellaswag; the `eval` extra)",
            metavar="NAME[,NAME...]",
        ),
    ] = None,
    include_path: Annotated[
        str | None, Opt("a folder of harness task YAML files of your own, for --tasks", metavar="DIR")
    ] = None,
    limit: Annotated[
        float | None,
        Opt(
            "--tasks: examples per task at most (below 1: that fraction of each)", parse=TASK_LIMIT, default_text="all"
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None, Opt("--tasks: examples shown before each question", parse=nonneg_int, default_text="the task's")
    ] = None,
    max_answer_tokens: Annotated[
        int | None, Opt("longest greedy answer for --chat-data", parse=positive_int, default_text="64")
    ] = None,
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
    """One result dict per model: model, loss, perplexity, bits_per_byte, tokens, bytes, source (with
    ``chat_data``: model, assistant_loss, exact_match, conversations, assistant_tokens; with ``tasks``: model
    and tasks, each task's metrics and their stderr)."""
    if sum(x is not None for x in (data, chat_data, tasks)) != 1:
        raise OpenLLMError("give --data (text), --chat-data (conversations) or --tasks (harness tasks), one of them")
    if tasks is None:
        given = {"--include-path": include_path, "--limit": limit, "--num-fewshot": num_fewshot}
        wrong_task = [flag for flag, v in given.items() if v is not None]
        if wrong_task:
            raise OpenLLMError(f"{wrong_task[0]} goes with --tasks")
    else:
        given = {"--seq-len": seq_len, "--stride": stride, "--max-answer-tokens": max_answer_tokens}
        wrong_task = [flag for flag, v in given.items() if v is not None]
        if allow_training_data:
            wrong_task.append("--allow-training-data")
        if wrong_task:
            raise OpenLLMError(f"{wrong_task[0]} does not go with --tasks")
        names = _task_names(tasks)
        return [evaluate_tasks(path, names, include_path, limit, num_fewshot, batch_size, device) for path in models]
    text_only = {"--seq-len": seq_len, "--stride": stride}
    wrong = [flag for flag, v in text_only.items() if v is not None] if chat_data is not None else []
    if chat_data is None and max_answer_tokens is not None:
        wrong = ["--max-answer-tokens"]
    if wrong:
        other = "--data" if chat_data is not None else "--chat-data"
        raise OpenLLMError(f"{wrong[0]} goes with {other}, not with {'--chat-data' if other == '--data' else '--data'}")
    dev = resolve_device(device)
    results = []
    for path in models:
        loaded = load_model(path, dev)
        hashes = training_sources(loaded.info.training_config)
        if chat_data is not None:
            from openllm.data.sources import expand_inputs, sha256_file

            files = expand_inputs(list(chat_data))
            seen = [f for f in files if sha256_file(f) in hashes]
            if seen and not allow_training_data:
                raise OpenLLMError(
                    f"{seen[0]} holds conversations {path} was fine-tuned on; pass --allow-training-data to report "
                    "anyway"
                )
            results.append(
                {"model": str(path), **evaluate_chat(loaded, chat_data, batch_size, max_answer_tokens or 64, dev)}
            )
            _record(path, loaded, [str(f.resolve()) for f in files], bool(seen), results[-1])
            continue
        assert data is not None
        if Path(data).is_dir():
            ds = load_dataset(data)
            if ds.meta["tokenizer_sha256"] != loaded.tokenizer.sha256:
                raise OpenLLMError(f"{data} was tokenized with a different tokenizer than {path}")
            r = evaluate_dataset(loaded.model, data, "val", seq_len, stride, batch_size, dev)
            trained_on = False  # (its validation split: held out from training)
        else:
            trained_on = bool(hashes) and encode_file(loaded.tokenizer, data)[2] in hashes
            if trained_on and not allow_training_data:
                raise OpenLLMError(
                    f"{data} is the text {path} was trained on (its training split included); "
                    "pass --allow-training-data to report anyway"
                )
            r = evaluate_file(loaded.model, loaded.tokenizer, data, seq_len, stride, batch_size, dev)
        results.append({"model": str(path), **r.to_dict()})
        _record(path, loaded, [str(Path(data).resolve())], trained_on, results[-1])
    return results


def _task_names(tasks: str) -> list[str]:
    names = [t.strip() for t in tasks.split(",")]
    if not all(names):
        raise OpenLLMError(f"--tasks {tasks!r} names an empty task: give NAME[,NAME...]")
    return list(dict.fromkeys(names))


def evaluate_tasks(path, tasks: list[str], include_path, limit, num_fewshot, batch_size: int, device) -> dict:
    """The harness's tasks on one model (:mod:`openllm.inference.harness`), recorded in its run directory."""
    require("lm_eval", "eval", "openllm eval --tasks")
    from openllm.inference.harness import run_tasks, task_summary

    dev = resolve_device(device)
    loaded = load_model(path, dev)
    results = run_tasks(
        loaded,
        tasks,
        include_path=include_path,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=dev,
    )
    summary = {"model": str(path), "tasks": task_summary(results)}
    settings = {"limit": limit, "num_fewshot": num_fewshot}
    _record(path, loaded, list(tasks), False, {**summary, "settings": settings}, what="tasks")
    return summary


def _limit(text: str) -> float:
    value = float(text)
    if value >= 1 and not value.is_integer():
        raise ValueError(text)
    return int(value) if value >= 1 else value


TASK_LIMIT = checked(_limit, lambda v: 0 < v, "a whole number of examples, or a fraction below 1")


def _record(path, loaded, data: list[str], trained_on: bool, result: dict, what: str = "data") -> None:
    """A run's own checkpoint evaluated: the results go into its run directory, for its report (``trained_on``:
    the data is what the run trained on, reported with --allow-training-data)."""
    from openllm.checkpoint.report import EVALUATIONS, record_evaluation, run_dir_of

    run_dir = run_dir_of(path)
    if run_dir is None:
        return
    results = {k: v for k, v in result.items() if k not in ("model", "correct")}
    record = {"checkpoint": Path(loaded.source).name, "step": loaded.info.step, what: ", ".join(data)}
    record_evaluation(run_dir, {**record, "training_data": trained_on, "results": results})
    print(f"recorded in {run_dir / EVALUATIONS} (`openllm report {run_dir}` adds it to the report)", file=sys.stderr)


def training_sources(training_config: dict) -> set[str]:
    """sha256 of the files a checkpoint's run trained on (when its dataset directory is still there)."""
    hashes: set[str] = set()
    dirs = training_config.get("dataset_dirs") or [training_config.get("dataset_dir")]  # (a mixture: each one)
    for ds_dir in dirs if isinstance(dirs, list) else []:
        for name in ("meta.json", "conversations.json"):  # a prepared dataset, or a fine-tune's conversations
            if isinstance(ds_dir, str) and (Path(ds_dir) / name).is_file():
                try:
                    ds_meta = read_json(Path(ds_dir) / name, "dataset metadata")
                    hashes |= {i["sha256"] for i in ds_meta.get("inputs", [])}
                except (OpenLLMError, AttributeError, KeyError, TypeError):
                    pass  # no readable record of the training files: nothing to compare with
    return hashes


def evaluate_chat(
    loaded: LoadedModel,
    files: Sequence[str],
    batch_size: int,
    max_answer_tokens: int,
    device,
    per_conversation: bool = False,
) -> dict:
    """A chat model on conversations: the token-weighted loss on what the assistant says (with its end of turn),
    through the chat template the model was fine-tuned with; and how many greedy answers to the last user turn
    equal the last assistant message exactly (surrounding whitespace aside). ``per_conversation`` adds
    ``correct``: whether each conversation's answer was right, in order."""
    import torch

    from openllm.data.chat import encode_chat, end_of_turn_ids
    from openllm.data.conversations import ConversationReader
    from openllm.data.sources import expand_inputs
    from openllm.inference.engine import Engine, TokenStream
    from openllm.inference.sampling import SamplingOptions

    tok, model = loaded.tokenizer, loaded.model.eval()
    if not tok.chat_template:
        raise OpenLLMError(
            f"{loaded.source} has no chat template: fine-tune it on conversations first (openllm finetune)"
        )
    chats = [r.messages for r in ConversationReader().records(expand_inputs(list(files)))]
    if not chats:
        raise OpenLLMError("--chat-data holds no conversations")
    context = model.config.block_size
    total, counted, prompts, answers = 0.0, 0, [], []
    progress = Progress(2 * len(chats), "scoring conversations", "steps")  # the losses, then the answers
    for i, messages in enumerate(chats):
        progress.update()
        if messages[-1]["role"] != "assistant":
            raise OpenLLMError(f"--chat-data: conversation {i + 1} does not end with the assistant's answer")
        ids, mask = encode_chat(tok, messages)
        if len(ids) > context + 1:
            raise OpenLLMError(f"--chat-data: conversation {i + 1} has {len(ids)} tokens, more than the context")
        x, y = torch.tensor([ids[:-1]], device=device), torch.tensor([ids[1:]], device=device)
        y[0, ~torch.tensor(mask[1:], device=device)] = -1
        with torch.no_grad():
            _, loss = model(x, y)
        n = int((y != -1).sum())
        total, counted = total + float(loss) * n, counted + n
        prompts.append(encode_chat(tok, messages[:-1], add_generation_prompt=True)[0])
        answers.append(messages[-1]["content"].strip())
    engine = Engine(model, min(batch_size, len(prompts)), device)
    stop = frozenset(end_of_turn_ids(tok)) or None
    streams: list[TokenStream] = []
    for ids in prompts:
        room = min(max_answer_tokens, context - len(ids))
        if room < 1:
            raise OpenLLMError("--chat-data: a conversation leaves no room in the context for an answer")
        streams.append(TokenStream())
        engine.submit(ids, SamplingOptions(max_new_tokens=room, temperature=0), stop, reader=streams[-1])
    correct = []
    for stream, want in zip(streams, answers, strict=True):  # (each waits for its answer)
        correct.append(tok.decode([s.token for s in stream]).strip() == want)
        progress.update()
    progress.close()
    right = sum(correct)
    return {
        **({"correct": correct} if per_conversation else {}),
        "assistant_loss": total / max(counted, 1),
        "exact_match": right / len(answers),
        "conversations": len(answers),
        "assistant_tokens": counted,
    }
