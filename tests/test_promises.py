"""Every promise holds (issue 11): options honoured, records true, reproducible runs, whole files, untrusted
input refused quickly, and a server that can be exposed."""

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch
import yaml

from openllm.checkpoint import format as ck
from openllm.checkpoint import rundir
from openllm.core.errors import OpenLLMError
from openllm.core.fileio import directory_lock
from openllm.training.loop import train
from tests.conftest import ROOT, cli, live_server, load, quiet, random_model_app
from tests.conftest import small_args as args
from tests.conftest import small_config as small


def weights_hash(path):
    state = load(path)["model_state_dict"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ options and records


def test_validation_data_beside_a_prepared_dataset_is_used(small_dataset, shakespeare_path, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = cli(*args(small_dataset, tmp_path / "a", "--validation-data", str(empty)))
    assert r.returncode == 2 and "holds no text" in r.stderr, r.stderr
    other = tmp_path / "other.txt"
    other.write_text(shakespeare_path.read_text()[-20000:])
    train(small(small_dataset, tmp_path / "held"), log=quiet)
    train(small(small_dataset, tmp_path / "file", validation_data=str(other)), log=quiet)
    held, file = load(tmp_path / "held" / "final_model.pt"), load(tmp_path / "file" / "final_model.pt")
    assert held["training_config"]["validation_fingerprint"] != file["training_config"]["validation_fingerprint"]
    assert held["validation_log"][0]["validation_loss"] != file["validation_log"][0]["validation_loss"]


def test_records_state_the_model_that_was_trained(small_dataset, tmp_path):
    train(small(small_dataset, tmp_path / "run", model_size="tiny"), log=quiet)  # the preset's vocab is 1,024
    recorded = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert recorded["vocab_size"] == small_dataset.meta["vocab_size"] == 420
    assert recorded["torch_threads"] == torch.get_num_threads()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "validation loss" in log and "training tiny" in log


def test_extending_a_run_says_what_the_schedule_does(small_dataset, tmp_path):
    out = tmp_path / "cos"
    train(small(small_dataset, out), log=quiet)
    said = []
    train(small(small_dataset, out, max_steps=9, resume="auto"), log=said.append)
    assert any("learning-rate schedule changes" in m for m in said), said
    # warmup-stable-decay: extended during its stable phase, the learning rate does not move
    out = tmp_path / "wsd"
    train(small(small_dataset, out, lr_schedule="wsd", max_steps=20, save_every=4, eval_every=4), log=quiet)
    lr_before = load(out / "checkpoint_step_8.pt")["training_log"][-1]["learning_rate"]
    shutil_rm = [p.unlink() for p in out.glob("*.pt") if p.name != "checkpoint_step_8.pt"]
    assert shutil_rm
    shutil.copytree(out, tmp_path / "shorter")  # the same run stopped at step 8, for the shorter resume below
    said = []
    train(
        small(
            small_dataset,
            out,
            lr_schedule="wsd",
            max_steps=40,
            save_every=4,
            eval_every=4,
            resume="auto",
            allow_data_change=True,
        ),
        log=said.append,
    )
    # the next step's rate is as before, but the cooldown moved with --max-steps: said, naming a later step
    notes = [m for m in said if "schedule changes" in m]
    assert len(notes) == 1 and "step 9 gets" not in notes[0], said
    log = load(out / "final_model.pt")["training_log"]
    assert next(r for r in log if r["step"] == 9)["learning_rate"] == lr_before
    # a smaller --max-steps re-plans the cooldown too, and says so
    said = []
    shorter = small(small_dataset, tmp_path / "shorter", lr_schedule="wsd", max_steps=12, save_every=4, eval_every=4)
    train(dataclasses.replace(shorter, resume="auto", allow_data_change=True), log=said.append)
    assert any("schedule changes with this resume: step 11 gets" in m for m in said), "\n".join(said)


def test_resume_on_other_validation_text_starts_the_best_afresh(small_dataset, shakespeare_path, tmp_path):
    out = tmp_path / "run"
    train(small(small_dataset, out), log=quiet)
    other = tmp_path / "other.txt"
    other.write_text(shakespeare_path.read_text()[:30000])
    said = []
    result = train(small(small_dataset, out, max_steps=9, resume="auto", validation_data=str(other)), log=said.append)
    assert any("not comparable" in m for m in said), said
    assert result.best_step == 9  # chosen on the new text, never "at step None"


def test_a_finished_run_killed_before_its_card_is_completed(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(small(small_dataset, out), log=quiet)
    (out / "README.md").unlink()
    (out / "training_curves.png").unlink()
    (out / ".final_model.pt.tmp-999999").write_bytes(b"x" * 1000)  # what a killed save leaves
    r = cli(*args(small_dataset, out, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").is_file() and (out / "training_curves.png").is_file()
    assert not list(out.glob(".*.tmp-*"))


def test_metrics_keep_every_step_when_killed_in_a_best_model_save(small_dataset, tmp_path):
    out = tmp_path / "run"
    r = cli(*args(small_dataset, out, "--save-every", "100"), env={"OPENLLM_FAULT": "save:1"})
    assert r.returncode == -9  # killed inside the first save: best_model.pt at step 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_second_process_on_the_same_run_directory_is_refused(small_dataset, tmp_path):
    done = tmp_path / "done"
    train(small(small_dataset, done), log=quiet)
    exported = tmp_path / "exported"
    assert cli("export", "--checkpoint", str(done), "--output-dir", str(exported)).returncode == 0
    out, hf = tmp_path / "run", tmp_path / "hf"
    with directory_lock(out, "run directory"), directory_lock(hf, "export directory"):
        r = cli(*args(small_dataset, out))
        e = cli("export", "--checkpoint", str(done), "--output-dir", str(hf))
        c = cli("convert", "--input-dir", str(exported), "--output-dir", str(out))
    for p in (r, e, c):
        assert p.returncode == 2 and f"pid {os.getpid()}" in p.stderr and "in use" in p.stderr, p.stderr
    assert not out.exists() and not hf.exists() and not list(tmp_path.glob(".*.lock"))


def test_the_legacy_command_without_its_data_explains_and_leaves_nothing(tmp_path):
    script = ROOT / "core" / "src" / "train_model_improved.py"
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model-size",
            "small",
            "--output-dir",
            "models/improved-10k",
            "--validation-data",
            "data/clean/validation_data.txt",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "data/clean/training_data.txt" in r.stderr and "--data-file" in r.stderr
    assert r.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_batch_beyond_memory_is_refused_before_writing(small_dataset, tmp_path):
    r = cli(*args(small_dataset, tmp_path / "run", "--batch-size", "100000000"))
    assert r.returncode == 2 and "GiB" in r.stderr and "--batch-size" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@contextlib.contextmanager
def small_disk(disk):
    """A real 3 MB file system at ``disk`` (a tmpfs; root can mount one), unmounted afterwards; yields False
    where mounting is not allowed (the tests then raise what each writer's library raises on a full disk)."""
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk_is_one_clear_error(small_dataset, tmp_path):
    """A 3 MB tmpfs (root can mount one); where mounting is not allowed, the same write failure is raised
    the way torch reports it, so the translation is still checked."""
    disk = tmp_path / "disk"
    with small_disk(disk) as mounted:
        out = disk / "run"
        if mounted:
            r = cli(*args(small_dataset, out, "--model-size", "tiny"))
            message = r.stderr
            assert r.returncode == 2, r.stderr
        else:
            real = torch.save

            def failing(*a, **k):
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file"
                )

            torch.save = failing
            try:
                with pytest.raises(OpenLLMError) as exc:
                    train(small(small_dataset, out), log=quiet)
                message = str(exc.value)
            finally:
                torch.save = real
        assert ("disk full" in message or "could not write" in message) and "intact" in message, message
        assert "internal error" not in message and "enforce fail" not in message
        assert not list(out.glob(".*.tmp-*"))


def _corpus(path, paragraphs=12000):
    """About 4 MB of distinct paragraphs (duplicates would be dropped before they are spooled)."""
    import random

    words = (ROOT / "src" / "openllm" / "corpus" / "tinyshakespeare.txt").read_text().split()
    rng = random.Random(0)
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(60)) + "\n\n" for _ in range(paragraphs)))
    return path


def _simulated_full_disk(monkeypatch, writer: str):
    """Without a tmpfs (not root): the failure each writer really reports on a full disk, with the disk full."""
    import errno

    from safetensors import SafetensorError

    from openllm.core import fileio

    failures = {
        "prepare": ("openllm.data.prepare._prepare", OSError(errno.ENOSPC, "No space left on device")),
        "export": (
            "safetensors.torch.save_file",
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        ),
        "gguf export": ("openllm.interop.export.write_gguf", OSError("49152 requested and 24912 written")),
    }
    target, exc = failures[writer]

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(target, fail)
    monkeypatch.setattr(fileio, "_free_bytes", lambda path: 24912)


@pytest.mark.parametrize("writer", ["prepare", "export", "gguf export"])
def test_a_full_disk_is_the_same_clear_error_for_every_writer(writer, llama_run, tmp_path, monkeypatch):
    """prepare, export and GGUF export say what train and convert say, whatever their library raised (an
    OSError, safetensors' SafetensorError, numpy's "N requested and M written"), and leave nothing behind."""
    from openllm.data.prepare import prepare_dataset
    from openllm.interop.export import export_checkpoint

    disk = tmp_path / "disk"
    with small_disk(disk) as mounted:
        out = disk / "out"
        corpus = _corpus(tmp_path / "corpus.txt") if writer == "prepare" else None
        command = {
            "prepare": ["prepare", "--input", str(corpus), "--output-dir", str(out)],
            "export": ["export", "--checkpoint", str(llama_run), "--output-dir", str(out)],
            "gguf export": ["export", "--checkpoint", str(llama_run), "--output-dir", str(out), "--format", "gguf"],
        }[writer]
        if mounted:
            if writer != "prepare":  # an export of this small model fits in 3 MB: leave it 256 kB
                free = shutil.disk_usage(disk).free
                (disk / "ballast").write_bytes(b"\0" * (free - 256 * 1024))
            r = cli(*command)
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            message = r.stderr
        else:
            _simulated_full_disk(monkeypatch, writer)
            with pytest.raises(OpenLLMError) as exc:
                if writer == "prepare":
                    prepare_dataset([corpus], out)
                else:
                    export_checkpoint(llama_run, out, format="gguf" if writer == "gguf export" else "hf")
            message = str(exc.value)
        assert f"disk full while writing {out}" in message and "the previous files are intact" in message, message
        assert "internal error" not in message and "Traceback" not in message
        assert not out.exists() and not [p for p in disk.iterdir() if p.name != "ballast"]


# ------------------------------------------------------------------------------------ reproducibility


def test_identical_runs_are_bit_identical_while_the_cpu_is_busy(small_dataset, tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<60: pass"])
    try:
        hashes = []
        for i in range(3):
            out = tmp_path / f"r{i}"
            train(small(small_dataset, out, model_size="tiny", max_steps=12, eval_every=12, save_every=12), log=quiet)
            hashes.append(weights_hash(out / "final_model.pt"))
    finally:
        hog.kill()
    assert len(set(hashes)) == 1, hashes


# ------------------------------------------------------------------------------------ untrusted input


def test_absurd_model_configs_are_refused_quickly(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(small(small_dataset, out), log=quiet)
    ckpt = load(out / "best_model.pt")
    ckpt["config"]["n_layer"] = 10**9
    ckpt["checksum"] = ck.compute_checksum(ckpt)
    bomb = tmp_path / "bomb.pt"
    torch.save(ckpt, bomb)
    t0 = time.time()
    v = ck.verify_checkpoint(bomb)
    assert not v.ok and "lacks" in v.problems[0]
    r = cli("generate", "--model", str(bomb), "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    hf = tmp_path / "hf"
    assert cli("export", "--checkpoint", str(out), "--output-dir", str(hf)).returncode == 0
    config = json.loads((hf / "config.json").read_text())
    config["vocab_size"] = 10**12
    (hf / "config.json").write_text(json.dumps(config))
    r = cli("convert", "--input-dir", str(hf), "--output-dir", str(tmp_path / "conv"))
    assert r.returncode == 2 and "vocab_size" in r.stderr, r.stderr
    assert time.time() - t0 < 60


def test_future_format_versions_are_refused(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(small(small_dataset, out), log=quiet)
    ckpt = load(out / "best_model.pt")
    ckpt["format_version"] = 99
    ckpt["checksum"] = ck.compute_checksum(ckpt)
    torch.save(ckpt, out / "best_model.pt")
    v = ck.verify_checkpoint(out / "best_model.pt")
    assert not v.ok and "format version 99" in v.problems[0]


def test_yaml_aliases_deep_nesting_and_huge_numbers_are_refused(small_dataset, tmp_path):
    cases = {
        "alias": "a: &a [1, 2]\nb: [*a, *a]\n",
        "deep": "max_steps: " + "[" * 5000 + "\n",
        "huge": f"seed: {2**70}\n",
    }
    for name, text in cases.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        r = cli("train", "--config", str(f), "--data", str(small_dataset.path), "--output-dir", str(tmp_path / name))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert not (tmp_path / name).exists()
    r = cli(*args(small_dataset, tmp_path / "s", "--seed", str(2**64)))
    assert r.returncode == 2 and "--seed" in r.stderr


def test_unreadable_checkpoints_are_described_in_our_words(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(OpenLLMError) as exc:
        ck.load_checkpoint(bad)
    assert "truncated, corrupt or not a checkpoint" in str(exc.value) and "Weights only" not in str(exc.value)


def test_degenerate_sampling_settings_still_generate():
    from openllm.inference.generate import SamplingOptions, generate_ids
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0)).eval()
    for opts in (
        SamplingOptions(max_new_tokens=5, temperature=1e-30, seed=0),
        SamplingOptions(max_new_tokens=5, temperature=1.0, repetition_penalty=1e-30, seed=0),
        SamplingOptions(max_new_tokens=5, temperature=2.0, top_p=1e-9, top_k=1, seed=0),
    ):
        out = list(generate_ids(model, [2, 5, 7], opts))
        assert all(0 <= t < 50 for t in out)


# ----------------------------------------------------------------------------------- whole directories


def test_interrupted_export_and_convert_are_completed_by_a_rerun(small_dataset, tmp_path):
    run = tmp_path / "run"
    train(small(small_dataset, run), log=quiet)
    hf = tmp_path / "hf"
    (tmp_path / ".hf.tmp-999999").mkdir()  # a killed export's staging directory
    (tmp_path / ".hf.tmp-999999" / "model.safetensors").write_bytes(b"half")
    assert cli("export", "--checkpoint", str(run), "--output-dir", str(hf)).returncode == 0
    assert not (tmp_path / ".hf.tmp-999999").exists()
    before = (hf / "model.safetensors").stat().st_ino
    r = cli("export", "--checkpoint", str(run), "--output-dir", str(hf), "--force")
    assert r.returncode == 0, r.stderr
    assert (hf / "model.safetensors").stat().st_ino != before and not list(tmp_path.glob(".hf.*"))
    conv = tmp_path / "conv"
    (tmp_path / ".conv.tmp-999999").mkdir()  # a killed convert: nothing under the final name
    r = cli("convert", "--input-dir", str(hf), "--output-dir", str(conv))
    assert r.returncode == 0, r.stderr
    assert ck.verify_checkpoint(conv / rundir.BEST).ok and not list(tmp_path.glob(".conv.*"))


# --------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def guarded(small_dataset):
    from openllm.data.tokenizer import load_tokenizer
    from openllm.inference.loading import LoadedModel
    from openllm.inference.server import ServerLimits, ServerSecurity, create_app
    from openllm.model.config import ModelConfig
    from openllm.model.gpt import GPT

    tok = load_tokenizer(small_dataset.path)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64, dropout=0.0))
    security = ServerSecurity(api_key="sekret", allowed_hosts=("localhost", "127.0.0.1"))
    return create_app(
        LoadedModel(model.eval(), tok, small_dataset.path), "guarded", ServerLimits(max_tokens=64), security=security
    )


def test_the_server_checks_key_host_and_content_type(guarded):
    async def go():
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            key = {"Authorization": "Bearer sekret"}
            body = {"prompt": "Hello", "max_tokens": 2}
            results = {
                "no key": await c.post("/v1/completions", json=body),
                "wrong key": await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}),
                "ok": await c.post("/v1/completions", json=body, headers=key),
                "rebinding": await c.post("/v1/completions", json=body, headers={**key, "Host": "evil.example"}),
                "text/plain": await c.post(
                    "/v1/completions", content=json.dumps(body), headers={**key, "Content-Type": "text/plain"}
                ),
                "surrogate": await c.post(
                    "/v1/completions",
                    content='{"prompt": "a\\ud800"}',
                    headers={**key, "Content-Type": "application/json"},
                ),
                "nested": await c.post(
                    "/v1/completions", content="[" * 100000, headers={**key, "Content-Type": "application/json"}
                ),
                "unsupported": await c.post("/v1/completions", json={**body, "suffix": "end"}, headers=key),
                "health": await c.get("/health"),
            }
            return results

    import asyncio

    r = asyncio.run(go())
    expected = {
        "no key": 401,
        "wrong key": 401,
        "ok": 200,
        "rebinding": 421,
        "text/plain": 415,
        "surrogate": 400,
        "nested": 400,
        "unsupported": 400,
        "health": 200,
    }
    assert {k: v.status_code for k, v in r.items()} == expected
    for name in ("no key", "rebinding", "text/plain", "surrogate", "nested", "unsupported"):
        assert "message" in r[name].json()["error"], name
    assert r["unsupported"].json()["error"]["param"] == "suffix"


def test_abandoned_requests_stop_generating(small_dataset):
    import dataclasses
    import threading

    # a model slow enough (long generations past its context) that clients give up mid-way
    app = random_model_app(small_dataset, max_tokens=2000, n_layer=4, n_embd=128, block_size=32)
    engine = app.state.engine
    tok = engine.loaded.tokenizer  # without an eos token this random model cannot end its texts early by chance
    tok.special = dataclasses.replace(tok.special, eos=None)
    with live_server(app) as base:

        def abandon():
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 2000, "seed": 0}, timeout=0.3)

        threads = [threading.Thread(target=abandon) for _ in range(4)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.time() + 60
        while time.time() < deadline and engine.waiting:
            time.sleep(0.05)
        elapsed = time.time() - t0
        # every abandoned request that reached the engine was stopped, not generated to its end for nobody
        # (a request whose client left while its body was still being read may never reach the engine)
        assert engine.waiting == 0 and engine.served == engine.cancelled >= 3, (engine.served, engine.cancelled)
        assert elapsed < 20  # one of these generations alone takes several seconds on this model


def test_yaml_is_still_yaml(tmp_path):  # the alias guard leaves ordinary files alone
    from openllm.training.config import load_yaml_options

    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump({"max-steps": 5, "learning_rate": 0.001}))
    assert load_yaml_options(path) == {"max_steps": 5, "learning_rate": 0.001}


def test_long_operations_report_progress_when_not_on_a_terminal(small_dataset, small_corpus, tmp_path):
    out = tmp_path / "run"
    train(small(small_dataset, out), log=quiet)
    env = {"OPENLLM_PROGRESS_SECONDS": "0"}
    r = cli("eval", "--model", str(out), "--data", str(small_corpus), "--allow-training-data", env=env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("scoring:")]
    assert lines and "windows" in lines[-1] and "100%" in lines[-1]
    r = cli(
        "prepare", "--input", str(small_corpus), "--output-dir", str(tmp_path / "ds"), "--vocab-size", "420", env=env
    )
    assert r.returncode == 0 and "encoding:" in r.stderr, r.stderr


def test_hugging_face_configs_with_values_of_the_wrong_kind_are_one_error(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(small(small_dataset, out), log=quiet)
    hf = tmp_path / "hf"
    assert cli("export", "--checkpoint", str(out), "--output-dir", str(hf)).returncode == 0
    config = json.loads((hf / "config.json").read_text())
    config["n_layer"] = "many"
    (hf / "config.json").write_text(json.dumps(config))
    r = cli("convert", "--input-dir", str(hf), "--output-dir", str(tmp_path / "conv"))
    assert r.returncode == 2 and "n_layer must be a whole number" in r.stderr and "'many'" in r.stderr, r.stderr
    assert "internal error" not in r.stderr and r.stderr.count("\n") == 1


def test_resuming_a_converted_model_on_new_text_uses_its_tokenizer_and_a_refusal_leaves_nothing(
    small_dataset, small_corpus, shakespeare_path, tmp_path
):
    run, hf, conv = tmp_path / "run", tmp_path / "hf", tmp_path / "conv"
    train(small(small_dataset, run), log=quiet)
    assert cli("export", "--checkpoint", str(run), "--output-dir", str(hf)).returncode == 0
    assert cli("convert", "--input-dir", str(hf), "--output-dir", str(conv), "--training-steps", "6").returncode == 0
    more = tmp_path / "more.txt"
    more.write_text(shakespeare_path.read_text()[-60000:])

    def resume_on_more(checkpoint, out):
        options = ["--max-steps", "8", "--batch-size", "4", "--seq-len", "32", "--sample-tokens", "0"]
        return cli("train", "--resume", str(checkpoint), "--data-file", str(more), "--output-dir", str(out), *options)

    r = resume_on_more(conv / "best_model.pt", tmp_path / "next")
    assert r.returncode == 0, r.stderr
    assert "resumed model's tokenizer" in r.stdout
    assert (
        load(tmp_path / "next" / "final_model.pt")["tokenizer_sha256"]
        == load(conv / "best_model.pt")["tokenizer_sha256"]
    )
    # a resume the checks refuse (other text for a run that knows its data) leaves no directory behind
    r = resume_on_more(run / "best_model.pt", tmp_path / "refused")
    assert r.returncode == 2 and "--allow-data-change" in r.stderr, r.stderr
    assert not (tmp_path / "refused").exists()
