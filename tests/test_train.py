import json
import math
import os
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
from openllm.model.config import get_preset, model_config_for
from openllm.model.gpt import GPT
from openllm.training.config import TrainConfig
from openllm.training.loop import TrainingStopped, lr_at, train
from tests import clirunner
from tests.conftest import GPT2_TINY, GPT2_TINY_FLAGS, cli, load, quiet

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def config(dataset, out, **kw):
    base = dict(
        data=str(dataset.path),
        output_dir=str(out),
        model_size="tiny",
        **GPT2_TINY,
        batch_size=4,
        seq_len=32,
        max_steps=12,
        eval_every=4,
        save_every=4,
        eval_batches=4,
        warmup_steps=2,
        log_every=100,
        learning_rate=3e-3,
        min_lr=3e-4,
    )
    base.update(kw)
    return TrainConfig(**base)


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_run_directory_layout_and_checkpoint_keys(small_dataset, tmp_path):
    out = tmp_path / "run"
    result = train(config(small_dataset, out), log=quiet)
    for name in (
        "best_model.pt",
        "final_model.pt",
        "checkpoint_step_4.pt",
        "checkpoint_step_8.pt",
        "training_log.json",
        "validation_log.json",
        "training_config.json",
        "config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "metrics.jsonl",
    ):
        assert (out / name).is_file(), name
    final = load(out / "final_model.pt")
    assert set(ck.REQUIRED_KEYS) <= set(final)
    assert final["step"] == 12 and result.step == 12
    assert ck.verify_checkpoint(out / "final_model.pt").ok
    rng = final["resume_state"]["rng"]
    assert {"python", "numpy", "torch_cpu", "torch_cuda"} <= set(rng)
    entry = final["training_log"][0]
    assert {"step", "loss", "perplexity", "learning_rate", "step_time", "tokens_per_second", "memory_mb"} <= set(entry)
    assert {"step", "validation_loss", "validation_perplexity"} == set(final["validation_log"][0])
    # best_model.pt holds the step of the lowest validation loss and is not the final model
    val = json.loads((out / "validation_log.json").read_text())
    best_entry = min(val, key=lambda r: r["validation_loss"])
    best = load(out / "best_model.pt")
    assert best["step"] == best_entry["step"] == result.best_step
    assert best["best_validation_loss"] == best_entry["validation_loss"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3
    card = (out / "README.md").read_text()
    assert f"{best_entry['validation_loss']:.4f}" in card
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_best_model_is_never_overwritten_by_a_worse_final(small_dataset, tmp_path):
    out = tmp_path / "run"
    # a learning rate this high makes the later evaluations worse than the first ones
    train(
        config(small_dataset, out, learning_rate=0.5, min_lr=0.5, warmup_steps=0, grad_clip=0.0, max_bad_steps=50),
        log=quiet,
    )
    val = json.loads((out / "validation_log.json").read_text())
    best = load(out / "best_model.pt")
    final = load(out / "final_model.pt")
    finite = [r for r in val if math.isfinite(r["validation_loss"])]
    assert best["step"] == min(finite, key=lambda r: r["validation_loss"])["step"]
    if best["step"] != final["step"]:
        assert not same_weights(best["model_state_dict"], final["model_state_dict"])


@pytest.mark.parametrize(
    "accum, optimizer, arch, schedule",
    [
        (1, "adamw", "gpt2", "cosine"),
        (3, "adamw", "gpt2", "cosine"),
        (1, "muon", "gpt2", "cosine"),
        (1, "adamw", "llama", "cosine"),
        (1, "muon", "llama", "wsd"),  # the tiny preset's own recipe
    ],
)
def test_exact_resume_is_bit_identical(small_dataset, tmp_path, small_corpus, accum, optimizer, arch, schedule):
    paras = small_corpus.read_text().split("\n\n")
    val_file = tmp_path / "val.txt"
    val_file.write_text("\n\n".join(paras[:20]))
    common = dict(
        gradient_accumulation_steps=accum,
        dropout=0.1,
        lr_decay_steps=16,
        data=None,
        data_file=str(small_corpus),
        validation_data=str(val_file),
        vocab_size=400,
        optimizer=optimizer,
        arch=arch,
        lr_schedule=schedule,
    )
    straight = train(config(small_dataset, tmp_path / "a", max_steps=16, **common), log=quiet)
    train(config(small_dataset, tmp_path / "b", max_steps=8, **common), log=quiet)
    resumed = train(config(small_dataset, tmp_path / "b", max_steps=16, resume="auto", **common), log=quiet)
    a, b = load(straight.final_checkpoint), load(resumed.final_checkpoint)
    assert same_weights(a["model_state_dict"], b["model_state_dict"])
    assert [r["loss"] for r in a["training_log"]] == [r["loss"] for r in b["training_log"]]
    assert a["validation_log"] == b["validation_log"]
    assert a["resume_state"]["samples_seen"] == b["resume_state"]["samples_seen"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))
    assert a["training_config"]["optimizer"] == optimizer and a["config"]["arch"] == arch
    if arch == "llama":
        assert "model.layers.0.mlp.gate_proj.weight" in a["model_state_dict"]
    if optimizer == "muon":  # both parts' state is in the checkpoint, and AdamW cannot take it over
        assert set(a["optimizer_state_dict"]) == {"muon", "adamw"} and a["optimizer_state_dict"]["muon"]["state"]
        with pytest.raises(OpenLLMError, match="trained with --optimizer muon; resume with --optimizer muon"):
            train(
                config(small_dataset, tmp_path / "b", max_steps=20, resume="auto", **{**common, "optimizer": "adamw"}),
                log=quiet,
            )


def test_resume_from_mid_run_checkpoint_drops_later_metrics(small_dataset, tmp_path):
    out = tmp_path / "run"
    straight = train(config(small_dataset, tmp_path / "straight"), log=quiet)
    train(config(small_dataset, out), log=quiet)
    # as if the process had died after step 9: only checkpoint_step_8 survives, metrics ran ahead
    for name in ("final_model.pt", "best_model.pt", "checkpoint_step_12.pt"):
        (out / name).unlink(missing_ok=True)
    resumed = train(config(small_dataset, out, resume="auto"), log=quiet)
    assert same_weights(
        load(straight.final_checkpoint)["model_state_dict"], load(resumed.final_checkpoint)["model_state_dict"]
    )
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_early_stopping_with_zero_learning_rate(small_dataset, tmp_path):
    out = tmp_path / "run"
    result = train(
        config(small_dataset, out, learning_rate=0.0, min_lr=0.0, max_steps=40, early_stopping_patience=2), log=quiet
    )
    val = json.loads((out / "validation_log.json").read_text())
    assert len(val) <= 3 and result.step < 40
    assert "early stopping" in result.stop_reason
    final = load(out / "final_model.pt")
    assert final["training_stats"]["stop_reason"] == result.stop_reason
    assert final["resume_state"]["run_state"]["bad_evals"] == 2
    messages = []
    again = train(
        config(
            small_dataset, out, learning_rate=0.0, min_lr=0.0, max_steps=40, early_stopping_patience=2, resume="auto"
        ),
        log=messages.append,
    )
    assert again is None and any("already stopped" in m for m in messages)


def test_early_stopping_counter_survives_resume(small_dataset, tmp_path):
    out = tmp_path / "run"
    kw = dict(learning_rate=0.0, min_lr=0.0, early_stopping_patience=3, eval_every=2, save_every=2)
    train(config(small_dataset, out, max_steps=4, **kw), log=quiet)  # evals at 2 (best), 4 (bad 1)
    assert load(out / "final_model.pt")["resume_state"]["run_state"]["bad_evals"] == 1
    result = train(config(small_dataset, out, max_steps=40, resume="auto", **kw), log=quiet)
    assert result.step == 8  # bad evals at 6 and 8 reach the patience of 3


def test_rotation_keeps_last_and_protects_best_and_resumed(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(config(small_dataset, out, max_steps=8, save_every=1, eval_every=100, keep_last=2), log=quiet)
    assert [s for s, _ in rundir.step_checkpoints(out)] == [6, 7]
    train(
        config(
            small_dataset,
            out,
            max_steps=12,
            save_every=1,
            eval_every=100,
            keep_last=2,
            resume=str(out / "checkpoint_step_6.pt"),
        ),
        log=quiet,
    )
    assert [s for s, _ in rundir.step_checkpoints(out)] == [6, 10, 11]


def test_resume_auto_skips_a_corrupt_newest_checkpoint(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(config(small_dataset, out, max_steps=9, eval_every=100), log=quiet)
    (out / "final_model.pt").unlink()
    (out / "best_model.pt").unlink()
    with open(out / "checkpoint_step_8.pt", "r+b") as f:
        f.truncate(os.path.getsize(out / "checkpoint_step_8.pt") // 2)
    messages = []
    result = train(config(small_dataset, out, max_steps=10, eval_every=100, resume="auto"), log=messages.append)
    assert any("skipping checkpoint_step_8.pt" in m for m in messages)
    assert any("resumed from" in m and "checkpoint_step_4.pt" in m for m in messages)
    assert result.step == 10


def test_resume_mismatches_are_refused_with_the_difference(small_dataset, small_corpus, tmp_path):
    out = tmp_path / "run"
    train(config(small_dataset, out, max_steps=4), log=quiet)
    with pytest.raises(OpenLLMError, match="model config differs.*n_layer"):
        train(config(small_dataset, out, max_steps=8, model_size="small", resume="auto"), log=quiet)
    from openllm.data.prepare import prepare_dataset

    other = prepare_dataset([small_corpus], tmp_path / "other", tokenizer=small_dataset.path, seed=5)
    with pytest.raises(OpenLLMError, match="dataset differs"):
        train(config(other, out, max_steps=8, resume="auto"), log=quiet)
    retok = prepare_dataset([small_corpus], tmp_path / "retok", vocab_size=420, doc_mode="line")
    with pytest.raises(OpenLLMError, match="tokenizer differs"):
        train(config(retok, out, max_steps=8, resume="auto"), log=quiet)
    result = train(config(other, out, max_steps=8, resume="auto", allow_data_change=True), log=quiet)
    assert result.step == 8


def test_existing_run_is_not_overwritten_without_resume(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(config(small_dataset, out, max_steps=4), log=quiet)
    before = (out / "final_model.pt").read_bytes()
    with pytest.raises(OpenLLMError, match="already holds a training run"):
        train(config(small_dataset, out, max_steps=4), log=quiet)
    assert (out / "final_model.pt").read_bytes() == before


def test_nonfinite_loss_skips_then_rolls_back(small_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_forward = GPT.forward
    calls = {"n": 0}

    def flaky(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)[:2]
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 3 or calls["n"] >= 7:  # one bad step, later a run of them
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", flaky)
    with pytest.raises(TrainingStopped, match=r"not finite for 3 steps in a row.*rolled back to checkpoint_step_4.pt"):
        train(config(small_dataset, out, max_steps=20, max_bad_steps=3), log=quiet)
    log = json.loads((out / "training_log.json").read_text())  # written at the last good save (step 4)
    assert [r["skipped"] for r in log] == [False, False, True, False]
    assert not (out / "final_model.pt").exists()
    assert load(out / "checkpoint_step_4.pt")["training_stats"]["skipped_steps"] == 1


def test_nonfinite_steps_are_acted_on_at_the_next_read_with_the_same_message(small_dataset, tmp_path, monkeypatch):
    """Between reads a step's figures stay on the device: the run of bad steps 7-9 is seen at the next read
    (the log line of step 10), stops with the message it had at step 9, and the logs end at step 9."""
    out = tmp_path / "run"
    real_forward = GPT.forward
    calls = {"n": 0}

    def flaky(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)[:2]
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 7:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", flaky)
    with pytest.raises(
        TrainingStopped, match=r"not finite for 3 steps in a row \(steps 7-9\).*rolled back to checkpoint_step_4.pt"
    ):
        train(config(small_dataset, out, max_steps=20, max_bad_steps=3, log_every=5), log=quiet)
    assert calls["n"] == 10  # reads after steps 4, 5, 8 (eval, save) and 10 (log)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    assert load(out / "checkpoint_step_8.pt")["training_stats"]["skipped_steps"] == 2  # read before saving


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_steps_that_do_not_log_never_wait_for_the_device(small_dataset, tmp_path, monkeypatch, optimizer):
    """No OpenLLM code reads a tensor's value (item, tolist, float, bool, ...) on a step that does not log,
    validate or save: on a GPU each such read would stall the host until the device caught up."""
    import openllm.training.loop as T

    src = str(ROOT / "src" / "openllm")
    current, reads = {"step": 0}, set()

    def watch(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            if sys._getframe(1).f_code.co_filename.startswith(src):
                reads.add(current["step"])
            return real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
        watch(name)
    real_step = T.train_step

    def step(run):
        current["step"] = run.state.step + 1
        return real_step(run)

    monkeypatch.setattr(T, "train_step", step)
    kw = dict(max_steps=12, log_every=5, eval_every=10, save_every=10, optimizer=optimizer)
    result = train(config(small_dataset, tmp_path / "run", **kw), log=quiet)
    assert result.step == 12
    assert 5 in reads and reads - {0} <= {5, 10, 12}, sorted(reads)  # 0: set-up, before the first step
    log = load(tmp_path / "run" / "final_model.pt")["training_log"]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.parametrize("kind", ["adamw", "muon", "unfused adamw"])
def test_a_bad_step_is_skipped_on_the_device_and_a_good_one_is_the_plain_step(kind):
    """step_unless hands the non-finite flag to the optimizer: set, the weights and the optimizer state stay bit
    for bit; clear, the step is the optimizer's own. Only an unfused AdamW (as an old CPU checkpoint restores
    it) cannot skip on the device; it reads the flag on the host."""
    from openllm.training.optim import MuonAdamW, configure_optimizer, skips_on_device, step_unless

    def build():
        torch.manual_seed(0)
        model = GPT(model_config_for("tiny", arch="gpt2", vocab_size=64, n_layer=1))
        if kind == "unfused adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            cfg = TrainConfig(model_size="tiny", optimizer=kind).resolved()
            opt = configure_optimizer(model, cfg.optimization, cfg.learning_rate, torch.device("cpu"))
        for _ in range(2):  # some optimizer state to keep
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        return model, opt

    def snapshot(model, opt):
        state = opt.state_dict()
        parts = state.values() if isinstance(opt, MuonAdamW) else [state]
        kept = [v for part in parts for s in part["state"].values() for v in s.values()]
        return [p.detach().clone() for p in model.parameters()] + [t.clone() for t in kept]

    model, opt = build()
    parts = list(opt.parts.values()) if isinstance(opt, MuonAdamW) else [opt]
    assert all(skips_on_device(p) for p in parts) == (kind != "unfused adamw")
    before = snapshot(model, opt)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_unless(opt, torch.tensor(True))
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(model, opt), strict=True))
    (a, a_opt), (b, b_opt) = build(), build()
    torch.manual_seed(1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    a_opt.step()
    step_unless(b_opt, torch.tensor(False))
    assert all(torch.equal(x, y) for x, y in zip(snapshot(a, a_opt), snapshot(b, b_opt), strict=True))


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(
        model_size="tiny", lr_schedule="cosine", learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110
    ).resolved()
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(200, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices(small_dataset):
    from openllm.training.optim import configure_optimizer

    model = GPT(model_config_for("tiny", arch="gpt2"))
    cfg = TrainConfig(model_size="tiny", optimizer="adamw").resolved()
    opt = configure_optimizer(model, cfg.optimization, cfg.learning_rate, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


# ------------------------------------------------------------------------------- processes


def cli_args(dataset, out, *extra):
    return [
        "train",
        "--data",
        str(dataset.path),
        "--output-dir",
        str(out),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--max-steps",
        "12",
        "--eval-every",
        "4",
        "--save-every",
        "4",
        "--eval-batches",
        "4",
        "--warmup-steps",
        "2",
        "--sample-tokens",
        "5",
        *GPT2_TINY_FLAGS,
        *extra,
    ]


def test_sigkill_in_mid_save_leaves_previous_checkpoints_and_resume_finishes(small_dataset, tmp_path):
    """Killed half-way through writing a step checkpoint, in the foreground and in the background
    (--async-save, whose thread is writing while training goes on): the previous checkpoints are whole (and the
    one written in the background is the one written in the foreground), and the resumed run ends with the
    weights of the run never interrupted."""
    straight = tmp_path / "straight"
    assert cli(*cli_args(small_dataset, straight)).returncode == 0
    for mode in ([], ["--async-save"]):
        out = tmp_path / f"killed{len(mode)}"
        # saves: best@4 (1), step_4 (2), best@8 (3), step_8 (4): die half-way through the 4th
        r = cli(*cli_args(small_dataset, out, *mode), env={"OPENLLM_FAULT": "save:4"})
        assert r.returncode == -signal.SIGKILL
        assert not (out / "checkpoint_step_8.pt").exists() and (out / "checkpoint_step_4.pt").is_file()
        assert ck.verify_checkpoint(out / "checkpoint_step_4.pt").ok and ck.verify_checkpoint(out / "best_model.pt").ok
        # the killed writer may leave its temporary file, but every file under a final name is whole
        assert all(ck.verify_checkpoint(p).ok for p in out.glob("*.pt"))
        if mode:
            break  # (the resume from a whole file is the one below)
        r = cli(*cli_args(small_dataset, out, "--resume", "auto", *mode))
        assert r.returncode == 0, r.stderr
        assert same_weights(
            load(straight / "final_model.pt")["model_state_dict"], load(out / "final_model.pt")["model_state_dict"]
        )
    written = [load(tmp_path / f"killed{n}" / "checkpoint_step_4.pt") for n in (0, 1)]
    assert same_weights(written[0]["model_state_dict"], written[1]["model_state_dict"])  # (a copy of step 4's)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_says_how_to_resume(small_dataset, tmp_path, sig):
    out = tmp_path / "run"
    proc = clirunner.start(
        [
            *cli_args(small_dataset, out)[:-8],
            "--max-steps",
            "100000",
            "--save-every",
            "100000",
            "--eval-every",
            "100000",
            "--sample-tokens",
            "5",
        ],
        dict(os.environ),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume auto" in stderr and "Traceback" not in stderr
    saved = rundir.step_checkpoints(out)
    assert len(saved) == 1 and ck.verify_checkpoint(saved[0][1]).ok
    card = (out / "README.md").read_text()  # the records say what happened, not "still running"
    assert f"stopped because: stopped by {sig.name}" in card and "still running" not in card
    assert f"stopped by {sig.name}" in (out / "train.log").read_text()


def test_yaml_config_with_command_line_winning(small_dataset, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"data: {small_dataset.path}\nmax-steps: 50\nbatch_size: 4\nseq-len: 32\neval_every: 3\n"
        "save_every: 3\neval-batches: 2\n"
    )
    r = cli(
        "train",
        "--config",
        str(cfg_file),
        "--max-steps",
        "3",
        "--output-dir",
        str(tmp_path / "run"),
        "--sample-tokens",
        "1",
    )
    assert r.returncode == 0, r.stderr
    tc = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert tc["max_steps"] == 3 and tc["batch_size"] == 4 and tc["eval_every"] == 3
    cfg_file.write_text("learning_rat: 0.1\n")
    r = cli("train", "--config", str(cfg_file), "--output-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown option 'learning_rat'" in r.stderr


@pytest.mark.parametrize(
    "args,match",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
        (["--seq-len", "4096"], "above the model's context"),
        (["--dropout", "1.5"], "--dropout"),
        (["--device", "tpu"], "invalid choice"),
        (["--dtype", "float16", "--device", "cpu"], "float16 needs a CUDA GPU"),
        (["--resume", "/nonexistent/ckpt.pt"], "checkpoint not found"),
    ],
)
def test_bad_train_options_are_one_line_errors(small_dataset, tmp_path, args, match):
    r = cli(
        "train", "--data", str(small_dataset.path), "--output-dir", str(tmp_path / "run"), "--max-steps", "2", *args
    )
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not list((tmp_path / "run").glob("*.pt")) if (tmp_path / "run").exists() else True


def test_legacy_entry_point_and_defaults(small_corpus, tmp_path):
    sys.path.insert(0, str(ROOT / "core" / "src"))
    try:
        import train_model_improved as legacy
    finally:
        sys.path.pop(0)
    argv = "--model-size small --max-steps 10000 --output-dir models/improved-10k --save-every 500 --early-stopping-patience 3 --validation-data data/clean/validation_data.txt".split()
    from openllm.cli import build_parser, train_config_from_args

    cfg = train_config_from_args(build_parser().parse_args(legacy.legacy_argv(argv)))
    assert (cfg.model_size, cfg.max_steps, cfg.output_dir, cfg.save_every, cfg.early_stopping_patience) == (
        "small",
        10000,
        "models/improved-10k",
        500,
        3,
    )
    assert cfg.data_file == "data/clean/training_data.txt"
    assert cfg.validation_data == "data/clean/validation_data.txt"
    # and the script runs as written (tiny and short here) in a legacy-layout directory
    (tmp_path / "data" / "clean").mkdir(parents=True)
    shutil.copy(small_corpus, tmp_path / "data" / "clean" / "training_data.txt")
    paras = small_corpus.read_text().split("\n\n")
    (tmp_path / "data" / "clean" / "validation_data.txt").write_text("\n\n".join(paras[:30]))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "core" / "src" / "train_model_improved.py"),
            "--model-size",
            "tiny",
            "--max-steps",
            "4",
            "--output-dir",
            "models/improved-10k",
            "--save-every",
            "2",
            "--early-stopping-patience",
            "3",
            "--validation-data",
            "data/clean/validation_data.txt",
            "--vocab-size",
            "400",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--eval-every",
            "2",
            "--sample-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "improved-10k" / "best_model.pt").is_file()


def test_tiny_defaults_to_its_recipe_and_older_runs_resume_with_what_they_ran():
    fresh = TrainConfig(model_size="tiny").resolved()
    assert (fresh.arch, fresh.optimizer, fresh.lr_schedule) == ("llama", "muon", "wsd")
    legacy = TrainConfig(model_size="small").resolved()
    assert (legacy.arch, legacy.optimizer, legacy.lr_schedule) == ("gpt2", "adamw", "cosine")
    # a checkpoint written before --optimizer / --lr-schedule existed recorded neither: it ran AdamW + cosine
    old = TrainConfig(model_size="tiny", **GPT2_TINY).resolved().to_dict()
    del old["optimizer"], old["lr_schedule"]
    resumed = TrainConfig().resolved(old)
    assert (resumed.optimizer, resumed.lr_schedule) == ("adamw", "cosine")
    assert TrainConfig(optimizer="muon").resolved(old).optimizer == "muon"  # unless told otherwise
    recorded = TrainConfig(model_size="tiny").resolved().to_dict()  # a run that recorded them keeps them
    assert TrainConfig().resolved(recorded).optimizer == "muon"


def test_min_lr_follows_a_learning_rate_the_user_gave(small_dataset, tmp_path):
    cfg = TrainConfig(model_size="tiny", learning_rate=1e-4).resolved()
    assert cfg.min_lr == pytest.approx(1e-5)  # a tenth, as the presets decay
    assert TrainConfig(model_size="tiny").resolved().min_lr == pytest.approx(get_preset("tiny").learning_rate / 10)
    with pytest.raises(OpenLLMError, match="--min-lr"):  # an explicit contradiction is still an error
        TrainConfig(model_size="tiny", learning_rate=1e-4, min_lr=1e-3).resolved()
    r = cli(*cli_args(small_dataset, tmp_path / "run", "--model-size", "tiny", "--learning-rate", "1e-4"))
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "run" / "final_model.pt")["training_config"]["min_lr"] == pytest.approx(1e-5)


def test_zero_learning_rate_without_warmup_measures_and_stops_early(small_dataset, tmp_path):
    r = cli(
        *cli_args(
            small_dataset,
            tmp_path / "run",
            "--learning-rate",
            "0",
            "--warmup-steps",
            "0",
            "--early-stopping-patience",
            "2",
            "--max-steps",
            "40",
            "--eval-every",
            "2",
        )
    )
    assert r.returncode == 0, r.stderr
    final = load(tmp_path / "run" / "final_model.pt")
    assert final["step"] == 6 and "early stopping" in final["training_stats"]["stop_reason"]
