"""``openllm eval --tasks``: lm-evaluation-harness tasks in this process, on the model as ``generate`` loads it.

:class:`HarnessModel` is an ``lm_eval`` model (registered as ``openllm``, so ``lm_eval --model openllm
--model_args pretrained=PATH`` works once this module is imported). It asks the harness's questions the way
its ``hf`` model asks them of an export, so the two give the same numbers:

* text is encoded with the model's own tokenizer, with the document start it trained with (bos when the
  tokenizer adds one); an empty context is the document start alone (lm_eval's ``prefix_token_id``);
* ``loglikelihood``: the harness's pairing of context and continuation (``TemplateLM``), then one forward pass
  per batch of up to ``batch_size`` requests, longest first, padded on the right (a causal model's earlier
  positions do not see the padding), log-softmax in float32;
* ``loglikelihood_rolling``: the harness's disjoint rolling windows of the context length, scored as above;
* ``generate_until``: the inference engine (KV cache, continuous batching over ``batch_size`` rows), the
  prompt cut on the left to leave ``max_gen_toks`` of room, stopped at eos or when a stop string appears,
  and the continuation's tokens decoded alone and cut at the first stop string, as the harness does.

Only this module imports ``lm_eval`` (the ``eval`` extra); :mod:`openllm.inference.evaluate` imports it when
``--tasks`` is given.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from openllm.core.errors import OpenLLMError, first_line
from openllm.inference.engine import Collected, Engine, Finished
from openllm.inference.loading import LoadedModel, load_model
from openllm.inference.sampling import SamplingOptions

# generation settings a task may give, as the engine takes them; any other is refused by name
SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed"}


@register_model("openllm")
class HarnessModel(TemplateLM):
    def __init__(
        self,
        pretrained: str | os.PathLike | LoadedModel | None = None,
        batch_size: int | str = 8,
        device: str | torch.device = "cpu",
        max_gen_toks: int = 256,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise OpenLLMError(f"the openllm harness model takes no argument {sorted(unknown)[0]!r}")
        if pretrained is None:
            raise OpenLLMError("the openllm harness model needs pretrained=PATH (a checkpoint, run or export)")
        loaded = pretrained if isinstance(pretrained, LoadedModel) else load_model(pretrained, device)
        self.loaded, self.tok, self.model = loaded, loaded.tokenizer, loaded.model.eval()
        self._device = torch.device(device)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise OpenLLMError(f"the openllm harness model takes a batch size of 1 or more, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.model.config.block_size
        self.start = self.tok.prompt_ids("")  # a document's start (bos, or the end of the one before)

    # -- what TemplateLM needs to pair contexts and continuations

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.start[-1]

    @property
    def prefix_token_id(self) -> int:  # (the harness's `hf` model: bos, else eos)
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        prefix = [] if add_special_tokens is False else self.tok.prefix()
        return prefix + self.tok.encode(string)

    # -- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(sum of log-probabilities, greedy?) of each request's continuation tokens after its context tokens."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        size = override_bs or self.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            rows = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not continuation or len(continuation) > self.max_length:
                    raise OpenLLMError(
                        f"a harness request has a continuation of {len(continuation)} tokens to score; the model's "
                        f"context is {self.max_length}"
                    )
                rows.append((context + continuation)[-(self.max_length + 1) :][:-1])
            width = max(len(r) for r in rows)
            batch = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                batch[j, : len(r)] = torch.tensor(r)
            logits, _ = self.model(batch.to(self.device))
            logp = torch.log_softmax(logits.float(), dim=-1)
            for j, i in enumerate(chunk):
                (key, _, continuation), n = requests[i], len(rows[j])
                wanted = torch.tensor(continuation, device=self.device)
                rows_logp = logp[j, n - len(continuation) : n]
                total = float(rows_logp.gather(1, wanted[:, None]).sum())
                answer = (total, bool((rows_logp.argmax(-1) == wanted).all()))
                out[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[n] += logprob
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    # -- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        # stepped here (no engine thread): after each step, a row whose text holds a stop string is closed
        engine = Engine(self.model, min(self.batch_size, len(requests)), self.device, thread=False)
        jobs: list[tuple[Collected, list[str], list[int]]] = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            room = int(kwargs.pop("max_gen_toks"))
            opts = _sampling(kwargs, room)
            if room >= self.max_length:
                raise OpenLLMError(f"a task asks for {room} new tokens; the model's context is {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - room) :]
            reader = Collected()
            engine.submit(ids, opts, self.tok.eos_id, reader=reader)
            jobs.append((reader, until, []))
        done = [False] * len(jobs)
        while not all(done):
            engine.step()
            for n, (reader, until, tokens) in enumerate(jobs):
                while reader.items and not done[n]:
                    item = reader.items.popleft()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, Finished):
                        done[n] = True
                        break
                    tokens.append(item.token)
                    if until and any(s and s in self.tok.decode(tokens) for s in until):
                        reader.close()  # (a stop string: the engine frees the row at its next step)
                        done[n] = True
        answers = []
        for request, (_, until, tokens) in zip(requests, jobs, strict=True):
            text = postprocess_generated_text(self.tok.decode(tokens), until, None)
            answers.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return answers


def _sampling(kwargs: dict, room: int) -> SamplingOptions:
    """A task's generation settings (after the harness normalised them) as the engine's options."""
    unknown = sorted(set(kwargs) - SAMPLING_KEYS)
    if unknown:
        raise OpenLLMError(f"a task's generation setting {unknown[0]!r} is not supported by the openllm model")
    greedy = not kwargs.get("do_sample") or not kwargs.get("temperature")
    return SamplingOptions(
        max_new_tokens=room,
        temperature=0.0 if greedy else float(kwargs["temperature"]),
        top_k=kwargs.get("top_k") or None,
        top_p=kwargs.get("top_p"),
        repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
        seed=kwargs.get("seed"),
    )


def run_tasks(
    loaded: LoadedModel,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    log_samples: bool = False,
) -> dict:
    """The harness's ``simple_evaluate`` of ``tasks`` on ``loaded``: its results dict (``results`` per task:
    each metric and its stderr; ``samples`` per task with ``log_samples``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import get_task_dict

    if include_path is not None and not Path(include_path).is_dir():
        raise OpenLLMError(f"--include-path {include_path} is not a directory")
    manager = task_manager(None if include_path is None else str(Path(include_path).resolve()), tuple(tasks))
    for name in tasks:
        if name not in manager.all_tasks:
            raise OpenLLMError(
                f"unknown task {name!r}: `lm_eval ls tasks` lists the harness's tasks; --include-path DIR adds "
                "a folder of task YAML files"
            )
        try:  # (each on its own, so a failure names its task; the data it fetched is cached for the run)
            loaded_tasks = get_task_dict([name], manager)
        except Exception as exc:  # (the harness and `datasets` raise many kinds: network, missing files, YAML)
            raise OpenLLMError(f"task {name}: its data could not be loaded ({_one_line(exc)})") from None
        if num_fewshot:  # (the harness keeps a task's own 0 shots and only logs that it did)
            zero = [t for t in _leaf_tasks(loaded_tasks) if t.get_config("num_fewshot") == 0]
            if zero:
                raise OpenLLMError(f"--num-fewshot {num_fewshot}: task {zero[0].config.task} is zero-shot only")
    model = HarnessModel(loaded, batch_size=batch_size, device=device)
    try:
        results = simple_evaluate(
            model=model,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
        )
    except OpenLLMError:
        raise
    except Exception as exc:  # (a task the harness cannot run here: unsafe code, other modalities, bad settings)
        raise OpenLLMError(f"lm-evaluation-harness could not run {', '.join(tasks)} ({_one_line(exc)})") from None
    if results is None:  # (only on a non-zero rank of a distributed harness run)
        raise OpenLLMError("the harness returned no results")
    return results


def task_manager(include_path: str | None, tasks: tuple[str, ...]):
    """The harness's index of tasks: only the folder of ``include_path`` when it holds every task asked for (the
    harness's own 14,000 take seconds to index), else theirs too. Kept for the process's later calls."""
    if include_path is not None:
        local = _index(include_path, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return _index(include_path, True)


@functools.lru_cache(maxsize=4)
def _index(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _leaf_tasks(tree) -> list:
    """The Task objects of the harness's (nested) task dict."""
    out = []
    for value in tree.values():
        out += _leaf_tasks(value) if isinstance(value, dict) else [value]
    return out


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def task_summary(results: dict) -> dict[str, dict[str, float | int]]:
    """Per task, its metrics and their standard errors, as ``{"acc": 0.6, "acc_stderr": 0.2}`` (the harness
    writes ``acc,none``: the metric and its filter; a filter other than ``none`` stays in the name, as in
    ``exact_match,strict-match`` and ``exact_match,strict-match_stderr``), and the shots each task ran with."""
    summary: dict[str, dict[str, float | int]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float | int] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            base, err = (metric[: -len("_stderr")], "_stderr") if metric.endswith("_stderr") else (metric, "")
            row[(base if filt == "none" else f"{base},{filt}") + err] = float(value)
        shots = (results.get("n-shot") or {}).get(task)
        if isinstance(shots, int):
            row["n_shot"] = shots
        summary[task] = row
    return summary
