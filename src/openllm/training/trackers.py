"""Experiment trackers (``--report-to tensorboard,wandb,trackio,mlflow``): the run's step records, validations,
configuration, results and final report, where a team already looks.

Each tracker gets what ``metrics.jsonl`` gets, under the same names (``train/loss``, ``train/learning_rate``,
... and ``validation/loss``), at the same steps, a step's figures in one call. A tracker's run is named after the
run directory and lives in ``--tracker-project``; its identity is kept in ``RUN_DIR/trackers.json``, so a resumed
run continues the same tracker run. On resuming, each tracker is asked which steps it holds (``held``) and is sent
the rest of the records, then the new steps: a kill that lost a tracker's buffer leaves no gap, and a step it
holds is not sent twice (TensorBoard, whose readers can be told to forget, drops everything and gets it all
again). A redone step keeps the figures the tracker holds, which an exact resume reproduces; when they differ,
the run says so once. Each library is an optional extra, imported only when asked for; a tracker that cannot
start is one error before training begins, one that fails later a warning (the run goes on without it).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from openllm.core.errors import OpenLLMError, first_line
from openllm.core.extras import require
from openllm.core.fileio import atomic_write_json
from openllm.core.options import checked
from openllm.core.untrusted import BadDocument, parse_json, read_json

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # the choices of --report-to
TRACKER_PACKAGES = {  # each tracker's module and the extra that installs it
    "tensorboard": ("tensorboardX", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}
STATE = "trackers.json"  # each tracker's run identity, for a resumed run
COMPARED = ("train/loss", "train/learning_rate", "train/grad_norm")  # what a redone step must reproduce
TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "memory_mb", "mfu")


def tracker_names(value: str | None) -> tuple[str, ...]:
    """``--report-to``'s comma-separated list, checked against :data:`TRACKERS` (empty: none)."""
    if not value:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",")))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise OpenLLMError(f"--report-to: unknown tracker {unknown[0]!r} (choose from {', '.join(TRACKERS)})")
    return names


def wanted(report_to: str | None, tensorboard: bool) -> tuple[str, ...]:
    """The trackers a run asks for: ``--report-to``'s, and TensorBoard with ``--tensorboard`` (the older flag)."""
    return tuple(dict.fromkeys(tracker_names(report_to) + (("tensorboard",) if tensorboard else ())))


def _joined(text: str) -> str:
    try:
        return ",".join(tracker_names(text))
    except OpenLLMError:
        raise ValueError(text) from None


tracker_list = checked(_joined, lambda v: True, "trackers among " + ", ".join(TRACKERS))  # (--report-to's parser)


def step_values(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record's figures as trackers name them (non-finite and absent ones left out)."""
    return {f"train/{k}": float(record[k]) for k in TRAIN_KEYS if _finite(record.get(k))}


def validation_values(record: dict) -> dict[str, float]:
    """A ``validation_log`` record's losses: the loss, and a mixture's loss on each dataset."""
    values: dict[str, Any] = {"validation/loss": record.get("validation_loss")}
    values |= {f"validation/loss/{n}": v for n, v in (record.get("validation_loss_by_dataset") or {}).items()}
    return {k: float(v) for k, v in values.items() if _finite(v)}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Trackers:
    """The trackers of one run (rank 0's). Each says which step it already holds (``held``, asked of the tracker's
    store: a killed run loses what a tracker had not written yet); it is sent what ``history`` (the records up to
    ``start_step``) has after that, then the new steps after it."""

    def __init__(
        self,
        names: Sequence[str],
        run_dir: Path,
        project: str,
        config: dict,
        start_step: int,
        history: Callable[[], Iterable[tuple[int, dict[str, float]]]] = lambda: (),
        warn: Callable[[str], None] = print,
        earlier: dict[int, dict[str, float]] | None = None,
    ) -> None:
        self.run_dir, self.warn = run_dir, warn
        self.pending: tuple[int, dict[str, float]] | None = None  # the latest step's figures, not sent yet
        self.earlier = earlier or {}  # the figures an interrupted attempt logged of steps after start_step
        self.changed: list[int] = []  # redone steps whose figures differ from those a tracker kept
        state_path = run_dir / STATE
        state = read_json(state_path, "tracker state") if state_path.is_file() else {}
        if not isinstance(state, dict):
            raise OpenLLMError(f"{state_path} does not hold tracker runs")
        self.open: list[Any] = []
        try:
            for name in names:
                known = state.get(name) if isinstance(state.get(name), dict) else {}
                try:
                    self.open.append(OPENERS[name](run_dir, project, config, start_step, known))
                except OpenLLMError:
                    raise
                except Exception as exc:  # (a library's own failure to start: one line naming the tracker)
                    raise _starting(name, exc) from None
            kept = {**state, **{t.name: t.identity for t in self.open}}
            if kept != state:
                atomic_write_json(state_path, kept)
            if any(t.held < start_step for t in self.open):  # (new to the run, or lost what a killed run sent)
                for step, values in history():
                    if step <= start_step:
                        self.step(step, values)
                self.flush()
        except BaseException:
            self.close()
            raise

    def step(self, step: int, values: dict[str, float]) -> None:
        """Figures of ``step``; those of one step (its training record, then its validation) go in one call, so
        that a tracker holds a step whole or not at all."""
        if self.pending is not None and self.pending[0] == step:
            self.pending[1].update(values)
            return
        self.flush()
        self.pending = (step, dict(values))

    def flush(self) -> None:
        if self.pending is not None and self.pending[1]:
            step, values = self.pending
            before = self.earlier.get(step, {})
            keeping = [t.name for t in self.open if step <= t.held]
            if keeping and any(before.get(k, values[k]) != values[k] for k in COMPARED if k in values):
                if not self.changed:
                    self.warn(
                        f"warning: step {step} is redone with other figures than before the interruption (other "
                        f"options, or a device that is not deterministic); {', '.join(keeping)} keep the first "
                        "figures of the steps they already hold (a tracker cannot forget them)"
                    )
                self.changed.append(step)
            self._each("log", step, values, only_after=step)
        self.pending = None

    def finish(self, results: dict[str, Any], report: Path | None) -> None:
        """The run's results (best and final validation loss, bits per byte, ...) and its report."""
        self.flush()
        self._each("summary", {k: v for k, v in results.items() if v is not None})
        if report is not None and report.is_file():
            self._each("report", report)

    def _each(self, method: str, *args, only_after: int | None = None) -> None:
        for tracker in list(self.open):
            if only_after is not None and only_after <= tracker.held:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # (a tracker's outage must not end the training run)
                self.warn(
                    f"warning: --report-to {tracker.name} failed ({type(exc).__name__}: {exc}); going on without it"
                )
                self.open.remove(tracker)
                _close_quietly(tracker)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for tracker in self.open:
                _close_quietly(tracker)
            self.open = []


def _close_quietly(tracker) -> None:
    try:
        tracker.close()
    except Exception:
        pass


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested configuration as flat ``a.b`` keys of scalars (what MLflow's parameters can hold)."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat |= _flat(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return flat


def _same(tracker: str, what: str, now, recorded) -> None:
    """A resumed run's tracker run is where the run began: another project or store is refused by name."""
    if recorded is not None and now != recorded:
        raise OpenLLMError(
            f"--report-to {tracker}: {what} is {now!r}, but this run's {tracker} run is in {recorded!r} "
            f"({STATE}); resume with that, or start a new run directory"
        )


def _starting(name: str, exc: Exception) -> OpenLLMError:
    return OpenLLMError(f"--report-to {name}: could not start its run ({type(exc).__name__}: {first_line(exc)})")


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, project: str, config: dict, start_step: int, known: dict) -> None:
        writer = require("tensorboardX", "tensorboard", "--report-to tensorboard").SummaryWriter
        # (every earlier event is dropped by the readers and written again from the records: events a killed run
        # had not flushed are not lost, and the steps after the checkpoint are the redone ones)
        self.writer = writer(str(run_dir / "tensorboard"), purge_step=1)
        self.identity = {"directory": "tensorboard"}
        self.held = 0
        self.last = start_step
        self.writer.add_text("config", "```\n" + _yaml(config) + "\n```", start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.last = step

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            if _finite(value):
                self.writer.add_scalar(f"results/{key}", value, self.last)

    def report(self, path: Path) -> None:
        self.writer.add_text("report", path.read_text(encoding="utf-8"), self.last)

    def close(self) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, project: str, config: dict, start_step: int, known: dict) -> None:
        wandb = require("wandb", "wandb", "--report-to wandb")
        _same(self.name, "--tracker-project", project, known.get("project"))
        run_id = known.get("id") or uuid.uuid4().hex[:8]
        try:  # (WANDB_MODE=offline writes under RUN_DIR/wandb, for `wandb sync` later)
            self.run = wandb.init(
                project=project,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:
            raise _starting(self.name, exc) from None
        self.identity = {"id": run_id, "project": project}
        self.held = 0
        if known:  # online: the server's step; offline: what the earlier attempts' files hold (a kill loses some)
            files = run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")
            steps = [row.get("_step", 0) for f in files for row in wandb_offline_history(f)]
            self.held = max(steps, default=0) if self.run.offline else max(self.run.step - 1, 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def report(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


def wandb_offline_history(path: Path) -> list[dict]:
    """The history rows (``{"_step": 3, "train/loss": ...}``) of a wandb offline run file (``run-ID.wandb``:
    a 7-byte header, then LevelDB-style log blocks of 32 KiB holding protobuf records; ``wandb sync`` reads the
    same). A torn end (a killed run) ends the rows."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    rows: list[dict] = []
    if data[:4] != b":W&B":
        return rows
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # (a block's tail too short for a header is padding)
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one cut over blocks
            record = pb.Record()  # type: ignore[attr-defined]
            try:
                record.ParseFromString(pending)
            except Exception:  # (protobuf's DecodeError: a torn record)
                break
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


class Trackio:
    name = "trackio"

    def __init__(self, run_dir: Path, project: str, config: dict, start_step: int, known: dict) -> None:
        self.trackio = require("trackio", "trackio", "--report-to trackio")
        _same(self.name, "--tracker-project", project, known.get("project"))
        try:  # (local by default, in TRACKIO_DIR; TRACKIO_SPACE_ID or TRACKIO_SERVER_URL send it elsewhere)
            self.run = self.trackio.init(
                project=project,
                name=run_dir.name,
                config=config,
                resume="allow" if known else "never",
                auto_log_cpu=False,  # (the step records only: the history is metrics.jsonl's)
                auto_log_gpu=False,
            )
        except Exception as exc:
            raise _starting(self.name, exc) from None
        self.identity = {"project": project, "name": run_dir.name}
        # (what its store holds, local or remote, as trackio itself asks on resuming; a killed run loses what
        # trackio had not written yet)
        self.held = max(int(getattr(self.run, "_next_step", 0)) - 1, 0) if known else 0
        self.last = start_step

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)
        self.last = step

    def summary(self, values: dict) -> None:
        self.run.log({f"results/{k}": v for k, v in values.items() if _finite(v)}, step=self.last)

    def report(self, path: Path) -> None:
        pass  # (trackio keeps metrics and configuration only; the summary above has the report's figures)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, project: str, config: dict, start_step: int, known: dict) -> None:
        require("mlflow", "mlflow", "--report-to mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        try:  # (MLFLOW_TRACKING_URI says where: a server, or a local store)
            self.client = MlflowClient()
            _same(self.name, "MLFLOW_TRACKING_URI", self.client.tracking_uri, known.get("tracking_uri"))
            _same(self.name, "--tracker-project", project, known.get("experiment"))
            if known.get("run_id"):
                self.run_id = known["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = self.client.get_experiment_by_name(project)
                exp_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
                self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
                for i in range(0, len(params), 100):  # (MLflow takes at most 100 parameters per call)
                    self.client.log_batch(self.run_id, params=params[i : i + 100])
        except OpenLLMError:
            raise
        except Exception as exc:
            raise _starting(self.name, exc) from None
        self.identity = {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri, "experiment": project}
        self.held = 0
        if known.get("run_id"):  # (the last step of any of the run's figures: a non-finite loss is not logged)
            keys = [k for k in self.client.get_run(self.run_id).data.metrics if not k.startswith("results/")]
            self.held = max((m.step for k in keys for m in self.client.get_metric_history(self.run_id, k)), default=0)
        self.last = start_step

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in values.items()])
        self.last = step

    def summary(self, values: dict) -> None:
        self.log(self.last, {f"results/{k}": float(v) for k, v in values.items() if _finite(v)})

    def report(self, path: Path) -> None:
        self.client.log_text(self.run_id, path.read_text(encoding="utf-8"), path.name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def read_records(path: Path) -> Iterator[dict]:
    """The records of ``metrics.jsonl`` (a line torn by a crash left out)."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = parse_json(line)
            except BadDocument:
                continue
            if isinstance(record, dict):
                yield record


OPENERS: dict[str, Callable[..., Any]] = {
    "tensorboard": TensorBoard,
    "wandb": WandB,
    "trackio": Trackio,
    "mlflow": MLflow,
}
assert set(OPENERS) == set(TRACKERS) == set(TRACKER_PACKAGES)
