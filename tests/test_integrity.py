"""Every command reads checkpoints through one checked loader: a checkpoint of an unknown format version, or
one whose contents no longer match its checksum, is refused with one line by every command that would use
it, and `inspect` shows it under a first line saying it is damaged."""

from __future__ import annotations

import shutil

import pytest
import torch

from openllm.checkpoint import format as ck
from openllm.cli import main
from tests.conftest import load

DAMAGE = {
    "format version 999": "unknown checkpoint format version 999",
    "stale checksum": "checksum mismatch",
}


@pytest.fixture(scope="module")
def damaged_runs(small_dataset, trained_run, tmp_path_factory):
    """A small trained run, and copies of it whose best_model.pt is damaged in each way of DAMAGE."""
    root = tmp_path_factory.mktemp("integrity")
    good = root / "good"
    shutil.copytree(trained_run, good)
    runs = {}
    for i, kind in enumerate(DAMAGE):
        run = root / f"damaged{i}"
        shutil.copytree(good, run)
        ckpt = load(run / "best_model.pt")
        if kind == "format version 999":
            ckpt["format_version"] = 999
            ckpt["checksum"] = ck.compute_checksum(ckpt)  # a consistent file of a format this OpenLLM cannot know
        else:
            ckpt["model_state_dict"]["transformer.wte.weight"][0, 0] += 1.0  # changed after saving
        torch.save(ckpt, run / "best_model.pt")
        runs[kind] = run
    return good, runs, small_dataset


COMMANDS = {
    "generate": lambda run, good, ds, tmp: ["generate", "--model", str(run), "--max-new-tokens", "2"],
    "eval": lambda run, good, ds, tmp: ["eval", "--model", str(run), "--data", str(ds.path)],
    "serve": lambda run, good, ds, tmp: ["serve", "--model", str(run), "--port", "8799"],
    "compare": lambda run, good, ds, tmp: ["compare", str(good), str(run)],
    "export": lambda run, good, ds, tmp: ["export", "--checkpoint", str(run), "--output-dir", str(tmp / "hf")],
    "train --resume": lambda run, good, ds, tmp: [
        "train",
        "--resume",
        str(run / "best_model.pt"),
        "--output-dir",
        str(run),
        "--max-steps",
        "9",
    ],  # fmt: skip
}


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_damaged_checkpoint_in_one_line(damaged_runs, command, kind, tmp_path, capsys):
    import uvicorn

    good, runs, ds = damaged_runs
    served = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(uvicorn, "run", lambda *a, **k: served.append(a))  # a server that started would return here
    try:
        rc = main(COMMANDS[command](runs[kind], good, ds, tmp_path))
    finally:
        monkey.undo()
    out, err = capsys.readouterr()
    assert rc == 2 and not served, (rc, out, err)
    assert err.count("\n") == 1 and DAMAGE[kind] in err and "best_model.pt" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_and_inspect_name_the_damage(damaged_runs, kind, capsys):
    good, runs, _ = damaged_runs
    assert main(["verify", str(runs[kind] / "best_model.pt")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("BAD ") and DAMAGE[kind] in out
    assert main(["inspect", str(runs[kind])]) == 1  # shown, but never as if it were sound
    first, *rest = capsys.readouterr().out.splitlines()
    assert first.startswith("DAMAGED: ") and DAMAGE[kind] in first and any("parameters:" in line for line in rest)
    assert main(["inspect", "--json", str(runs[kind] / "best_model.pt")]) == 1
    assert DAMAGE[kind] in capsys.readouterr().out
    assert main(["inspect", str(good)]) == 0 and "DAMAGED" not in capsys.readouterr().out
