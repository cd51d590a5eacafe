"""Fault injection: kills at random moments, a full disk, a vanishing directory, broken files."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.core.errors import OpenLLMError
from openllm.training.loop import train
from tests import clirunner
from tests.conftest import built_once, cli, quiet, small_args, small_config


def args(dataset, out, steps=24):
    return small_args(
        dataset, out, "--max-steps", str(steps), "--warmup-steps", "2", "--keep-last", "2", "--resume", "auto"
    )


def launch(cmd, env=None):
    return clirunner.start(cmd, dict(os.environ, **(env or {})))


def weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def kill_and_resume(dataset, tmp_path, kills, seed):
    """Kill a run `kills` times at random moments, resuming with --resume auto after each; then compare."""
    ref = tmp_path / "reference"
    p = launch(args(dataset, ref))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    rng = random.Random(seed)
    out = tmp_path / "killed"
    survived, finished_early = 0, 0
    for _i in range(kills):
        kind = rng.choice(["timed", "save", "eval", "step"])
        done = max([step for step, _ in rundir.step_checkpoints(out)], default=0)
        left = 24 - done  # aim the kill at work that still lies ahead of the newest checkpoint
        n = {"step": left, "eval": 2 * (left // 3), "save": left // 3}.get(kind, 0)
        env = {} if kind == "timed" else {"OPENLLM_FAULT": f"{kind}:{rng.randint(1, max(1, n))}"}
        p = launch(args(dataset, out), env)
        if kind == "timed":
            time.sleep(rng.uniform(0.5, 3.0))
            p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=300)
        stderr = p.stderr.read()
        assert "Traceback" not in stderr, stderr
        if rc == -signal.SIGKILL:
            survived += 1
            # whatever moment it died at, every file under a final name is whole
            for f in out.glob("*.pt"):
                assert ck.verify_checkpoint(f).ok, f
        else:
            assert rc == 0, stderr
            finished_early += 1
            if (out / rundir.FINAL).is_file():
                shutil.rmtree(out)  # it finished before the kill point: start the next round afresh
    p = launch(args(dataset, out))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    a, b = weights(ref / rundir.FINAL), weights(out / rundir.FINAL)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 25))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))
    print(f"kills survived: {survived}, runs that finished before their kill point: {finished_early}")
    return survived


def test_sigkill_sample_resumes_bit_identically(small_dataset, tmp_path):
    assert kill_and_resume(small_dataset, tmp_path, kills=3, seed=1) >= 2


@pytest.mark.slow
def test_sigkill_twenty_times_resumes_bit_identically(small_dataset, tmp_path):
    assert kill_and_resume(small_dataset, tmp_path, kills=20, seed=2) >= 17


def config(dataset, out, **kw):
    return small_config(dataset, out, **{"max_steps": 12, **kw})


def test_disk_full_while_saving_keeps_previous_checkpoints(small_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # best@3, step@3, best@6, step@6, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(OpenLLMError, match="disk full while writing .*best_model.pt; the previous files are intact"):
        train(config(small_dataset, out), log=quiet)
    assert ck.verify_checkpoint(out / "checkpoint_step_6.pt").ok
    assert torch.load(out / "best_model.pt", weights_only=True)["step"] == 6
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"
    monkeypatch.setattr(ck.torch, "save", real_save)
    result = train(config(small_dataset, out, resume="auto"), log=quiet)
    assert result.step == 12


def test_disk_full_through_the_cli_is_one_line(small_dataset, tmp_path):
    # the real thing: a tiny file system is out of reach without mounts, so fill the write with an
    # injected ENOSPC from a sitecustomize shim in a subprocess
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import errno, torch\n_real = torch.save\n_n = [0]\n"
        "def _save(obj, f, *a, **k):\n    _n[0] += 1\n"
        "    if _n[0] == 3:\n        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _real(obj, f, *a, **k)\ntorch.save = _save\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run(
        [sys.executable, "-m", "openllm", *args(small_dataset, tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "disk full" in r.stderr, r.stderr


def test_output_directory_vanishing_mid_run_is_a_clear_error(small_dataset, tmp_path, monkeypatch):
    import openllm.training.loop as T

    out = tmp_path / "run"
    real_step = T.train_step

    def step_then_vanish(run):
        record = real_step(run)
        if run.state.step == 4:
            shutil.rmtree(out)
        return record

    monkeypatch.setattr(T, "train_step", step_then_vanish)
    with pytest.raises(OpenLLMError, match="no longer exists"):
        train(config(small_dataset, out), log=quiet)


def test_unwritable_output_locations_are_clear_errors(small_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OpenLLMError, match="not a directory|cannot create"):
        train(config(small_dataset, blocker / "run"), log=quiet)
    import openllm.core.fileio as fio

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fio.os, "replace", read_only)
    with pytest.raises(OpenLLMError, match="Read-only file system"):
        train(config(small_dataset, tmp_path / "ro"), log=quiet)


def test_checkpoint_deleted_during_the_run(small_dataset, tmp_path, monkeypatch):
    import openllm.training.loop as T

    out = tmp_path / "run"
    real_step = T.train_step

    def step_and_delete(run):
        record = real_step(run)
        if run.state.step == 4:
            (out / "checkpoint_step_3.pt").unlink()
        return record

    monkeypatch.setattr(T, "train_step", step_and_delete)
    result = train(config(small_dataset, out), log=quiet)
    assert result.step == 12 and ck.verify_checkpoint(out / rundir.FINAL).ok


# ---------------------------------------------------------------------------- broken files


def _resave(path, mutate):
    c = torch.load(path, weights_only=True)
    mutate(c)
    c["checksum"] = ck.compute_checksum(c)
    torch.save(c, path)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/openllm-pwned-resume",))


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "flipped bit": lambda p: p.write_bytes(
        (lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1 :])(p.read_bytes())
    ),
    "empty": lambda p: p.write_bytes(b""),
    "not a checkpoint": lambda p: p.write_bytes(random.Random(0).randbytes(4096)),
    "missing keys": lambda p: _resave(p, lambda c: c.pop("optimizer_state_dict")),
    "wrong shape": lambda p: _resave(
        p, lambda c: c["model_state_dict"].__setitem__("transformer.wpe.weight", torch.zeros(3, 3))
    ),
    "different model config": lambda p: _resave(p, lambda c: c["config"].__setitem__("n_layer", 7)),
    "pickled code": lambda p: torch.save({"model_state_dict": {}, "x": Evil()}, p),
}
EXPECTED = {
    "truncated": "truncated",
    "flipped bit": "checksum|corrupt|truncated",
    "empty": "truncated",
    "not a checkpoint": "truncated|corrupt",
    "missing keys": "missing keys",
    "wrong shape": "shape",
    "different model config": "lacks|unexpected",
    "pickled code": "refused",
}


@pytest.fixture(scope="session")
def nine_steps(small_dataset, tmp_path_factory):
    """A run of 9 steps (checkpoints at 3, 6, 9; no validation), shared read-only."""

    def run(directory):
        train(config(small_dataset, directory / "run", max_steps=9, eval_every=100), log=quiet)

    return built_once(tmp_path_factory, "faults-nine-steps", run) / "run"


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_auto_skips_broken_checkpoints_and_verify_names_the_problem(nine_steps, small_dataset, tmp_path, kind):
    out = tmp_path / "run"
    shutil.copytree(nine_steps, out)
    (out / rundir.FINAL).unlink()
    (out / rundir.BEST).unlink()
    newest = out / "checkpoint_step_6.pt"
    CORRUPTIONS[kind](newest)
    r = cli("verify", str(newest))
    assert r.returncode == 1 and "BAD" in r.stdout, r.stdout + r.stderr
    assert __import__("re").search(EXPECTED[kind], r.stdout), r.stdout
    messages = []
    result = train(config(small_dataset, out, max_steps=10, eval_every=100, resume="auto"), log=messages.append)
    assert any("skipping checkpoint_step_6.pt" in m for m in messages), messages
    assert any("resumed from" in m and "checkpoint_step_3.pt" in m for m in messages), messages
    assert result.step == 10
    assert not os.path.exists("/tmp/openllm-pwned-resume")


def test_logs_that_are_not_json_are_clear_errors(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(config(small_dataset, out, max_steps=3), log=quiet)
    (out / "training_log.json").write_text("{not json")
    r = cli("plot", str(out))
    assert r.returncode == 2 and "not valid JSON" in r.stderr and r.stderr.count("\n") == 1
    # resuming does not depend on the JSON copies: the checkpoint holds the logs and rewrites them
    result = train(config(small_dataset, out, max_steps=6, resume="auto"), log=quiet)
    assert len(json.loads((out / "training_log.json").read_text())) == 6 and result.step == 6
    (small_dataset.path / "meta.json").read_text()
    bad_ds = tmp_path / "ds"
    shutil.copytree(small_dataset.path, bad_ds)
    (bad_ds / "meta.json").write_text("[1,")
    with pytest.raises(OpenLLMError, match="not valid JSON"):
        train(config(small_dataset, tmp_path / "r2", data=str(bad_ds)), log=quiet)
