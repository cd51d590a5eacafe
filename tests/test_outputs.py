"""Output directories: `export` and `convert` (and `prepare`) never write over their input or a training run,
and `--force` replaces only an earlier output of the same command (core/fileio.OutputDir)."""

import hashlib
import shutil

import pytest

from openllm.checkpoint import format as ck
from openllm.core.errors import OpenLLMError
from openllm.data.prepare import prepare_dataset
from openllm.interop.convert import convert
from openllm.interop.export import export_checkpoint
from tests.conftest import cli


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    export_checkpoint(trained_run, out)
    return out


def snapshot(directory):
    """Every file under ``directory`` with its sha256: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*")}


def refused(r, *words):
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_export_into_its_own_run_directory_with_force_is_refused_and_the_run_intact(trained_run):
    before = snapshot(trained_run)
    r = cli("export", "--checkpoint", str(trained_run), "--output-dir", str(trained_run), "--force")
    refused(r, f"--output-dir {trained_run} is the input")
    best = str(trained_run / "best_model.pt")
    r = cli("export", "--checkpoint", best, "--output-dir", str(trained_run), "--force")
    refused(r, "is the input")  # the checkpoint's directory is read too (its tokenizer)
    assert snapshot(trained_run) == before and "checkpoint_step_3.pt" in before and "metrics.jsonl" in before


def test_export_convert_or_prepare_onto_another_training_run_is_refused_and_the_run_intact(
    trained_run, exported, small_corpus, tmp_path
):
    other = tmp_path / "other"
    shutil.copytree(trained_run, other)
    before = snapshot(other)
    r = cli("convert", "--input-dir", str(exported), "--output-dir", str(other), "--force")
    refused(r, f"--output-dir {other} holds a training run (", "metrics.jsonl", "never a run")
    for force in (True, False):
        with pytest.raises(OpenLLMError, match="holds a training run"):
            export_checkpoint(trained_run, other, force=force)
        with pytest.raises(OpenLLMError, match="holds a training run"):
            convert(exported, other, force=force)
    # a run that kept only its best model and the files beside it is still a run, not an earlier conversion
    for name in ("metrics.jsonl", "train.log", "final_model.pt", "checkpoint_step_3.pt"):
        (other / name).unlink(missing_ok=True)
    bare = snapshot(other)
    with pytest.raises(OpenLLMError, match=r"holds a training run \(best_model.pt"):
        convert(exported, other, force=True)
    with pytest.raises(OpenLLMError, match="prepare the dataset into another --output-dir"):
        prepare_dataset([small_corpus], other, vocab_size=300, force=True)
    assert snapshot(other) == bare and before.keys() > bare.keys()


def test_an_output_that_is_contains_or_lies_inside_the_input_is_refused(trained_run, exported, tmp_path):
    run_files, export_files = snapshot(trained_run), snapshot(exported)
    r = cli("convert", "--input-dir", str(exported), "--output-dir", str(exported / "run"))
    refused(r, f"--output-dir {exported / 'run'} lies inside the input {exported.resolve()}")
    cases = [
        (lambda: export_checkpoint(trained_run, trained_run / "hf"), "lies inside the input"),
        (lambda: export_checkpoint(trained_run / "best_model.pt", trained_run / "hf"), "lies inside the input"),
        (lambda: export_checkpoint(trained_run, trained_run.parent, force=True), "contains the input"),
        (lambda: convert(exported, exported, force=True), "is the input"),
        (lambda: convert(exported, exported.parent, force=True), "contains the input"),
        (lambda: convert(exported, tmp_path / "c", eval_data=tmp_path / "c" / "val.txt"), "contains the input"),
    ]
    for call, words in cases:
        with pytest.raises(OpenLLMError, match=words):
            call()
    assert snapshot(trained_run) == run_files and snapshot(exported) == export_files
    assert not (trained_run / "hf").exists() and not (exported / "run").exists() and not (tmp_path / "c").exists()


def test_force_replaces_an_earlier_export_or_conversion_and_nothing_else(trained_run, tmp_path):
    hf, conv = tmp_path / "hf", tmp_path / "conv"
    export_checkpoint(trained_run, hf)
    with pytest.raises(OpenLLMError, match="already holds the output of an earlier openllm export.*--force"):
        export_checkpoint(trained_run, hf)
    before = (hf / "model.safetensors").stat().st_ino
    r = cli("export", "--checkpoint", str(trained_run), "--output-dir", str(hf), "--force")
    assert r.returncode == 0, r.stderr
    assert (hf / "model.safetensors").stat().st_ino != before and not list(tmp_path.glob(".hf.*"))
    convert(hf, conv)
    convert(hf, conv, force=True, training_steps=9)  # an earlier conversion is replaced
    assert ck.verify_checkpoint(conv / "best_model.pt").ok and ck.load_checkpoint(conv / "best_model.pt")["step"] == 9
    # anything the command does not write is named and kept, with or without --force
    (hf / "notes.txt").write_text("mine")
    (conv / "data").mkdir()
    for call, words in (
        (lambda: export_checkpoint(trained_run, hf, force=True), "files openllm export does not write (notes.txt)"),
        (lambda: convert(hf, conv, force=True), "files openllm convert does not write (data/)"),
    ):
        with pytest.raises(OpenLLMError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()
    assert (hf / "notes.txt").read_text() == "mine" and (conv / "data").is_dir()


# ------------------------------------------------------------------ every command knows every format we write


def test_verify_checks_an_export_directory_instead_of_looking_for_checkpoints(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    from openllm.interop.inspect import verify_path

    r = cli("verify", str(exported))
    assert r.returncode == 0 and r.stdout.startswith(f"ok   {exported}"), r.stdout + r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "tokenizer.json").unlink()
    state = load_file(broken / "model.safetensors")
    state["transformer.h.1.mlp.c_proj.weight"] = state["transformer.h.1.mlp.c_proj.weight"][:-1]
    save_file(state, broken / "model.safetensors")
    (broken / "generation_config.json").write_text("{not json")
    [v] = verify_path(broken)
    assert not v.ok and v.kind == "hf", v.problems
    assert v.problems[0] == "lacks tokenizer.json" and "transformer.h.1.mlp.c_proj.weight" in v.problems[1]
    assert "generation_config.json" in v.problems[-1] and "not valid JSON" in v.problems[-1]
