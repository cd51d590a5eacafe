"""Two CPU processes with gloo against one process with the same global batch."""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from openllm.checkpoint import rundir
from tests import clirunner
from tests.conftest import GPT2_TINY_FLAGS, cli, load


def torchrun(nproc, *args, restarts=0, env=None):
    # (torchrun's rendezvous store must not be shared with the processes for a restart to reconnect them:
    # pytorch/pytorch#135712; docs/distributed.md says so)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "--max-restarts",
            str(restarts),
            "--monitor-interval",  # (how soon a dead worker is seen: the default waits up to 5 s)
            "0.2",
            "-m",
            "openllm",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def launched(nproc, *args, env=None):
    """``openllm ARGS`` on ``nproc`` processes in one process group, each given the environment torchrun gives its
    workers (forked from the test's command server: no launcher and no torch import per process, which costs
    seconds a run here); rank 0's output, and the first failure's exit status."""
    ranks = start_ranks(nproc, *args, env=env)
    codes = [p.wait(timeout=300) for p in ranks]
    out, err = ranks[0].communicate()
    done = subprocess.CompletedProcess(args, next((c for c in codes if c), 0), out, err)
    done.others = [p.communicate()[0] for p in ranks[1:]]  # type: ignore[attr-defined]  # the other ranks' stdout
    return done


def start_ranks(nproc, *args, env=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc), **(env or {})}
    return [
        clirunner.start(
            list(args), dict(os.environ, **group, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc))
        )
        for r in range(nproc)
    ]


def plain(*args, env=None):
    return cli(*args, env=env, timeout=300)


def common(dataset, out, processes):
    """12 steps of a global batch of 12 samples (2 micro-batches on every process), checkpoints every 3 steps."""
    batch = {1: 6, 2: 3, 3: 2}[processes]
    return [
        "train",
        "--data",
        str(dataset.path),
        "--output-dir",
        str(out),
        "--seq-len",
        "32",
        "--max-steps",
        "12",
        "--lr-decay-steps",
        "12",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "1",
        *GPT2_TINY_FLAGS,
        "--sample-tokens",
        "0",
        "--gradient-accumulation-steps",
        "2",
        "--batch-size",
        str(batch),
        "--dtype",
        "float32",
    ]  # float32: bf16 rounding would differ between per-rank and whole batches


def as_if_killed_after(run, step, copy):
    """A copy of a finished run as it was when it died right after its step checkpoint of ``step``."""
    shutil.copytree(run, copy)
    for name in ("final_model.pt", "best_model.pt"):
        (copy / name).unlink(missing_ok=True)
    for s, path in rundir.step_checkpoints(copy):
        if s > step:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return copy


def test_ddp_and_fsdp_match_one_process_and_resume_on_any_number_of_processes(small_dataset, tmp_path):
    """DDP and FSDP on two processes against one process with the same global batch; an elastic restart after a rank is killed in an asynchronous sharded save ends with the weights of the run
    never interrupted; killed three times, an FSDP run goes on 2 -> 1 -> 2 -> 3 processes with the samples (and
    so the losses) of the run never interrupted; tools read the shards whole."""
    from openllm.checkpoint import format as ck
    from openllm.interop.inspect import verify_path

    r = launched(2, *common(small_dataset, tmp_path / "ddp", 2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done:") == 1 and not any(r.others)  # only rank 0 reports
    r = launched(2, *common(small_dataset, tmp_path / "fsdp", 2), "--fsdp")
    assert r.returncode == 0, r.stderr[-2000:]
    r = plain(*common(small_dataset, tmp_path / "single", 1))
    assert r.returncode == 0, r.stderr[-2000:]
    ddp, single = load(tmp_path / "ddp" / "final_model.pt"), load(tmp_path / "single" / "final_model.pt")
    fsdp = load(tmp_path / "fsdp" / "final_model.pt")  # (gathered whole into one file, as every tool reads)
    assert ddp["resume_state"]["world_size"] == 2 and ddp["training_config"]["global_batch_size"] == 12
    assert fsdp["training_config"]["fsdp"] is True and not ddp["training_config"]["fsdp"]
    for run in (ddp, fsdp):
        assert [r["loss"] for r in run["training_log"]] == pytest.approx(
            [r["loss"] for r in single["training_log"]], rel=1e-5, abs=1e-5
        )
        assert [r["validation_loss"] for r in run["validation_log"]] == pytest.approx(
            [r["validation_loss"] for r in single["validation_log"]], rel=1e-5
        )
    # The weights agree as far as the guarantee goes. The runs see the same batches, but two processes sum their
    # gradients in another order than one process does, so they differ by float rounding. AdamW divides each
    # element's step by its own gradient scale: where a gradient is near zero, a rounding-level difference can
    # change that element's step by up to the learning rate. So an element may differ by a small fraction of the
    # summed learning rates (the furthest AdamW can move it), and the tensor as a whole (its RMS difference) only
    # at rounding scale. Measured on AMD EPYC (AVX2): at most 0.0042 and 0.00011 of the summed rates; a wrong
    # batch or an unaveraged gradient moves weights by a tenth of it or more.
    moved = sum(r["learning_rate"] for r in single["training_log"])
    for run in (ddp, fsdp):
        for k, v in single["model_state_dict"].items():
            diff = run["model_state_dict"][k] - v
            assert diff.abs().max().item() <= 0.05 * moved, k
            assert diff.pow(2).mean().sqrt().item() <= 1e-3 * moved, k
    assert [p.name for _, p in rundir.step_checkpoints(tmp_path / "fsdp")] == [
        f"checkpoint_step_{s}" for s in (3, 6, 9)
    ]

    # rank 1 is killed while its shards of the step-3 checkpoint are written in the background; torchrun starts
    # both processes again, they resume from the newest complete checkpoint by themselves and end where the run
    # never interrupted ended
    elastic = tmp_path / "elastic"
    env = {"OPENLLM_FAULT": "save:1", "OPENLLM_FAULT_RANK": "1"}
    # (with the threads of the processes forked for the other runs: bit-identity needs the same number)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    r = torchrun(2, *common(small_dataset, elastic, 2), "--fsdp", "--async-save", restarts=1, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torchrun restart 1: resuming with --resume auto" in r.stdout and "resumed from" in r.stdout
    again = load(elastic / "final_model.pt")
    assert [r["step"] for r in again["training_log"]] == list(range(1, 13))
    for k, v in fsdp["model_state_dict"].items():
        assert torch.equal(again["model_state_dict"][k], v), k

    # the FSDP run, dead after its sharded step-3 checkpoint, resumes on 1 process (killed in its 4th step: step 7),
    # then from that one's file on 2 (killed at step 10), then from their shards on 3 processes, to the end
    out = as_if_killed_after(tmp_path / "fsdp", 3, tmp_path / "moved")
    for processes, newest in ((1, "checkpoint_step_6.pt"), (2, "checkpoint_step_9")):
        args = [*common(small_dataset, out, processes), "--resume", "auto"]
        kill = {"OPENLLM_FAULT": "step:4"}
        r = plain(*args, env=kill) if processes == 1 else launched(processes, *args, "--fsdp", env=kill)
        assert r.returncode != 0 and f"resuming with {processes} processes, the checkpoint was written by" in r.stdout
        assert rundir.step_checkpoints(out)[-1][1].name == newest
    r = launched(3, *common(small_dataset, out, 3), "--fsdp", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming with 3 processes, the checkpoint was written by 2" in r.stdout
    done = load(out / "final_model.pt")
    assert done["resume_state"]["samples_seen"] == 12 * 12 and done["resume_state"]["world_size"] == 3
    assert [r["step"] for r in done["training_log"]] == list(range(1, 13))
    assert [r["loss"] for r in done["training_log"]] == pytest.approx(
        [r["loss"] for r in single["training_log"]], rel=1e-5, abs=1e-5
    )
    assert [r["validation_loss"] for r in done["validation_log"]] == pytest.approx(
        [r["validation_loss"] for r in single["validation_log"]], rel=1e-5
    )
    assert len(done["training_stats"]["resumed_from"]) == 3

    # a sharded checkpoint reads whole, as the file one process writes; verify names a damaged or missing shard
    sharded = out / "checkpoint_step_9"
    whole = ck.load_checkpoint(sharded)
    assert whole["step"] == 9 and ck.verify_checkpoint(sharded).ok
    assert whole["model_state_dict"].keys() == single["model_state_dict"].keys()
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded, damaged)
    with open(damaged / "__1_0.distcp", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert "shard __1_0.distcp is damaged" in "; ".join(ck.verify_checkpoint(damaged).problems)
    (damaged / "__0_0.distcp").unlink()
    assert "shard __0_0.distcp is missing" in "; ".join(ck.verify_checkpoint(damaged).problems)
    assert {v.path.name: v.ok for v in verify_path(out)} == {
        "best_model.pt": True,
        "final_model.pt": True,
        "checkpoint_step_3": True,
        "checkpoint_step_6.pt": True,
        "checkpoint_step_9": True,
    }  # fmt: skip  (`openllm verify RUN_DIR`: every checkpoint, files and directories)

    # converted, the shards become a run directory of one file, which resumes with the optimizer's moments
    from openllm.interop.convert import convert

    convert(sharded, tmp_path / "gathered")
    single_file = load(tmp_path / "gathered" / "best_model.pt")
    assert single_file["step"] == 9 and ck.verify_checkpoint(tmp_path / "gathered" / "best_model.pt").ok
    for k, v in whole["model_state_dict"].items():
        assert torch.equal(single_file["model_state_dict"][k], v), k
    moments = [m["exp_avg"] for m in single_file["optimizer_state_dict"]["state"].values()]
    assert len(moments) == len(whole["optimizer_state_dict"]["state"]) and all(m.abs().sum() > 0 for m in moments)

    # exported from the shards, the model loads in transformers with the same logits
    transformers = pytest.importorskip("transformers")
    from openllm.inference.loading import load_model
    from openllm.interop.export import export_checkpoint

    export_checkpoint(sharded, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(sharded)
    x = torch.randint(0, ours.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.model(x)[0] - theirs(x).logits).abs().max().item() < 1e-4


@pytest.mark.slow  # (two more processes and two timeouts; CI's ten minutes: run with -m slow)
def test_a_rank_that_hangs_ends_the_run_with_an_error_naming_it(small_dataset, tmp_path):
    """Rank 1 stops (SIGSTOP) in its third step: rank 0's collective times out after --dist-timeout, and the
    roll call names rank 1, in one line."""
    args = [*common(small_dataset, tmp_path / "hang", 2), "--fsdp", "--dist-timeout", "3"]
    first, stopped = start_ranks(2, *args, env={"OPENLLM_FAULT": "step:3:STOP", "OPENLLM_FAULT_RANK": "1"})
    try:
        assert first.wait(timeout=120) == 2
    finally:
        stopped.kill()  # (torchrun would end it; a stopped process takes only SIGKILL)
        stopped.wait()
    line = first.communicate()[1].strip().splitlines()[-1]  # (after gloo's own log lines)
    assert line.startswith("openllm train: error: rank 0: a collective with the other processes failed"), line
    assert "Ranks 1 failed to pass" in line


@pytest.mark.slow  # (three more interpreters with torch: run with -m slow)
def test_a_lora_fine_tune_on_two_processes_matches_one(llama_run, tmp_path):
    """Conversations have unequal numbers of counted targets per row: every target of the global batch weighs
    the same, in whichever micro-batch and process it is, so 2 processes x 2 rows equal 1 process x 4 rows."""
    from openllm.data.synthetic import write_jsonl

    write_jsonl(tmp_path / "chats.jsonl", 120, seed=3)
    args = ["finetune", "--model", str(llama_run), "--data", str(tmp_path / "chats.jsonl"), "--lora-rank", "4",
            "--max-steps", "4", "--seq-len", "64", "--eval-every", "4", "--save-every", "4", "--eval-batches", "2",
            "--sample-tokens", "0", "--gradient-accumulation-steps", "2", "--dtype", "float32"]  # fmt: skip
    r = torchrun(2, *args, "--output-dir", str(tmp_path / "ddp"), "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = plain(*args, "--output-dir", str(tmp_path / "single"), "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    ddp, single = load(tmp_path / "ddp" / "final_model.pt"), load(tmp_path / "single" / "final_model.pt")
    assert [r["loss"] for r in ddp["training_log"]] == pytest.approx(
        [r["loss"] for r in single["training_log"]], rel=1e-5
    )
    assert ddp["validation_log"][-1]["validation_loss"] == pytest.approx(
        single["validation_log"][-1]["validation_loss"], rel=1e-5
    )
