"""`--report-to`: MLflow, trackio and wandb (offline) hold the run's step records and validations exactly as
`metrics.jsonl` and `validation_log.json` have them, each step once, through a kill and a resume; the resumed run
continues the same tracker runs; the results and report reach them. All three write local stores here."""

import importlib.util
import json
import sqlite3
import struct

import pytest

from openllm.core.errors import OpenLLMError
from openllm.training.trackers import wandb_offline_history
from tests.conftest import cli, small_args, small_config

TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "memory_mb")


def test_trackers_hold_each_step_once_through_a_kill_and_resume(small_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    env = {
        "MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    out = tmp_path / "run"
    trackers = "mlflow,trackio,wandb,tensorboard"
    args = small_args(small_dataset, out, "--max-steps", "8", "--report-to", trackers, "--tracker-project", "tests")
    r = cli(*args, env={**env, "OPENLLM_FAULT": "step:8"})  # killed in step 8: steps 1-7 sent, checkpoint at 6
    assert r.returncode != 0 and (out / "checkpoint_step_6.pt").is_file()
    identities = json.loads((out / "trackers.json").read_text())
    r = cli(*args, "--resume", "auto", env=env)  # (the trackers are the run's: --report-to given again or not)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "trackers.json").read_text()) == identities  # the same tracker runs, continued

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 9))
    expected = {(f"train/{k}", s["step"]): s[k] for s in steps for k in TRAIN_KEYS}
    validations = json.loads((out / "validation_log.json").read_text())
    expected |= {("validation/loss", v["step"]): v["validation_loss"] for v in validations}
    assert {step for key, step in expected if key == "validation/loss"} == {3, 6, 8}

    # MLflow: one run in the experiment, every metric's history exactly metrics.jsonl's
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [identities["mlflow"]["run_id"]]
    run_id = identities["mlflow"]["run_id"]
    held = {}
    for key in {k for k, _ in expected}:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key}: a step sent twice"
        held |= {(key, m.step): m.value for m in history}
    assert held == expected
    results = client.get_run(run_id).data
    assert results.metrics["results/best_validation_loss"] == pytest.approx(
        min(v["validation_loss"] for v in validations)
    )
    assert results.params["max_steps"] == "8" and client.get_run(run_id).info.status == "FINISHED"
    assert (
        "## Results"
        in (tmp_path / "mlruns" / experiment.experiment_id / run_id / "artifacts" / "README.md").read_text()
    )

    # trackio: its local SQLite store
    db = sqlite3.connect(tmp_path / "trackio" / "tests.db")
    rows = db.execute("SELECT run_name, step, metrics FROM metrics").fetchall()
    assert {name for name, _, _ in rows} == {"run"}
    held = {}
    for _, step, blob in rows:
        for key, value in json.loads(blob).items():
            if key in {k for k, _ in expected}:
                assert (key, step) not in held, f"{key} at step {step}: sent twice"
                held[(key, step)] = value
    assert held == expected

    # wandb, offline: one run (the same id for both attempts), each step once
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{identities['wandb']['id']}.wandb"}
    held = {}
    for f in files:
        for row in wandb_offline_history(f):
            for key, value in row.items():
                if key in {k for k, _ in expected}:
                    assert (key, row["_step"]) not in held, f"{key} at step {row['_step']}: sent twice"
                    held[(key, row["_step"])] = value
    assert held == expected
    # TensorBoard: the resumed run's event file drops every earlier event (purge from step 1) and holds them all
    held = {}
    for event in tensorboard_events(
        max((out / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    ):
        for value in event.summary.value:
            if value.tag in {k for k, _ in expected}:
                assert (value.tag, event.step) not in held, f"{value.tag} at step {event.step}: written twice"
                held[(value.tag, event.step)] = value.simple_value
    assert held == pytest.approx(expected)  # (TensorBoard keeps float32)
    assert "warning" not in r.stdout + r.stderr  # (the redone step 7 has the figures it had)


def tensorboard_events(path):
    """The events of a TensorBoard file (TFRecord: length, its CRC, the record, its CRC)."""
    from tensorboardX.proto import event_pb2

    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        yield event


def test_report_to_refuses_unknown_and_missing_trackers(small_dataset, tmp_path, monkeypatch):
    r = cli(*small_args(small_dataset, tmp_path / "a", "--report-to", "mlflow,nope"))
    assert r.returncode == 2 and "--report-to" in r.stderr and "nope" in r.stderr and not (tmp_path / "a").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(OpenLLMError, match=r"--report-to wandb needs the wandb package.*setup.sh wandb"):
        small_config(small_dataset, tmp_path / "b", report_to="wandb").resolved()


def test_a_redone_step_with_other_figures_is_said_once(tmp_path):
    """A tracker that already holds a redone step keeps it (it cannot forget); when the redo's figures differ
    from those it holds, the run says so once, naming it."""
    from openllm.training import trackers as T

    class Held:  # a tracker holding steps 1-3, from an attempt whose step 3 had loss 2.0
        name, identity, held, sent = "stand-in", {}, 3, []

        def __init__(self, *args):
            pass

        def log(self, step, values):
            self.sent.append(step)

        def close(self):
            pass

    said = []
    T.OPENERS["stand-in"] = Held
    try:
        t = T.Trackers(["stand-in"], tmp_path, "p", {}, 2, warn=said.append, earlier={3: {"train/loss": 2.0}})
        t.step(3, {"train/loss": 2.5})
        t.step(4, {"train/loss": 1.0})
        t.close()
    finally:
        del T.OPENERS["stand-in"]
    assert (
        t.changed == [3]
        and len(said) == 1
        and "step 3 is redone with other figures" in said[0]
        and "stand-in" in said[0]
    )
    assert (tmp_path / "trackers.json").is_file()
