"""Dataset mixtures: `openllm train --data A --data B --data-weights 0.7,0.3`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openllm.core.errors import OpenLLMError
from openllm.data.mixture import BLOCK, DatasetMixture, MixtureSampler, block_counts, normalised_weights
from openllm.training.config import TrainConfig
from openllm.training.loop import train
from tests.conftest import built_once, cli, load, quiet, shared_file, small_args, small_config


def test_each_sample_has_one_place_and_the_shares_are_the_weights():
    streams = [np.arange(5000, dtype=np.uint16), np.arange(3000, dtype=np.uint16) + 10000]
    sampler = MixtureSampler(streams, [0.7, 0.3], seq_len=8, seed=3)
    n = 3 * BLOCK
    places = [sampler.locate(k) for k in range(n)]
    by_dataset = [[j for d, j in places if d == i] for i in range(2)]
    assert [len(s) for s in by_dataset] == [2100, 900] == sampler.samples_by_dataset(n)  # exact at whole blocks
    assert all(s == list(range(len(s))) for s in by_dataset)  # each dataset's samples in order: none skipped or twice
    assert sampler.samples_by_dataset(1234) == [sum(d == i for d, _ in places[:1234]) for i in range(2)]
    # the order depends on the seed and k only: another sampler, asked in another order, agrees
    again = MixtureSampler(streams, [0.7, 0.3], seq_len=8, seed=3)
    assert [again.locate(k) for k in reversed(range(n))] == places[::-1]
    assert (
        MixtureSampler(streams, [0.7, 0.3], seq_len=8, seed=4).locate(0) != places[0]
        or [MixtureSampler(streams, [0.7, 0.3], seq_len=8, seed=4).locate(k) for k in range(20)] != places[:20]
    )
    # a window is the one its dataset's own sampler gives for that dataset's sample number
    x = sampler.windows(5, 4)
    for row, (d, j) in zip(x, places[5:9], strict=True):
        assert row.tolist() == sampler.samplers[d].windows(j, 1)[0].tolist()
        assert (row >= 10000).all() == (d == 1)


def test_weights_are_normalised_and_checked():
    assert normalised_weights([7, 3], 2) == [0.7, 0.3] and normalised_weights(None, 4) == [0.25] * 4
    assert block_counts([0.5, 0.25, 0.25]) == [500, 250, 250] and sum(block_counts([1 / 3] * 3)) == BLOCK
    assert block_counts([0.9999, 0.0001]) == [999, 1]  # a tiny weight still supplies a sample a block
    with pytest.raises(OpenLLMError, match="gives 3 weight"):
        normalised_weights([1, 2, 3], 2)
    with pytest.raises(OpenLLMError, match="positive numbers"):
        normalised_weights([1, 0], 2)
    with pytest.raises(OpenLLMError, match="two or more --data"):
        TrainConfig(data=["a"], data_weights=[1.0]).resolved()
    with pytest.raises(OpenLLMError, match="each dataset's own split"):
        TrainConfig(data=["a", "b"], validation_data="v.txt").resolved()
    assert TrainConfig(data="one").resolved().data == ["one"]  # one path (the API, YAML, older checkpoints)


@pytest.fixture(scope="module")
def two_datasets(small_dataset, tmp_path_factory):
    """The small Shakespeare dataset and SQuAD passages encoded with its tokenizer."""
    from openllm.data.dataset import load_dataset
    from openllm.data.prepare import prepare_dataset

    def prepare(directory):
        text = shared_file("squad_passages.txt").read_text(encoding="utf-8")[:120_000]
        (directory / "squad.txt").write_text(text, encoding="utf-8")
        prepare_dataset([directory / "squad.txt"], directory / "squad", tokenizer=small_dataset.path)

    return small_dataset, load_dataset(built_once(tmp_path_factory, "mixture-squad", prepare) / "squad")


def test_a_mixture_resumes_exactly_validates_each_dataset_and_records_what_each_supplied(two_datasets, tmp_path):
    a, b = two_datasets
    mix = {"data": [str(a.path), str(b.path)], "data_weights": [0.7, 0.3], "max_steps": 10, "eval_every": 5}
    mix |= {"save_every": 5, "lr_decay_steps": 10}  # (the schedule of a 10-step run for the 5-step part too)
    r = cli(*small_args(a, tmp_path / "straight", "--data", str(b.path), "--data-weights", "0.7,0.3",
                        "--max-steps", "10", "--eval-every", "5", "--save-every", "5", "--lr-decay-steps", "10"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "training on a mixture of 2 datasets: small 0.7, squad 0.3" in r.stdout
    train(small_config(a, tmp_path / "resumed", **{**mix, "max_steps": 5}), log=quiet)
    train(small_config(a, tmp_path / "resumed", **mix, resume="auto"), log=quiet)
    straight, resumed = load(tmp_path / "straight" / "final_model.pt"), load(tmp_path / "resumed" / "final_model.pt")
    assert all(np.array_equal(straight["model_state_dict"][k], v) for k, v in resumed["model_state_dict"].items())
    assert straight["validation_log"] == resumed["validation_log"]
    last = straight["validation_log"][-1]
    by = last["validation_loss_by_dataset"]
    assert set(by) == {"small", "squad"} and last["validation_loss"] == pytest.approx(
        0.7 * by["small"] + 0.3 * by["squad"]
    )
    mixture = straight["data_mixture"]
    assert [(d["name"], d["weight"], d["fingerprint"]) for d in mixture["datasets"]] == [
        ("small", 0.7, a.fingerprint),
        ("squad", 0.3, b.fingerprint),
    ]
    seen = mixture["tokens_seen"]
    assert sum(seen.values()) == straight["resume_state"]["samples_seen"] * 32 and seen["small"] > seen["squad"] > 0
    assert seen == resumed["data_mixture"]["tokens_seen"]
    report = (tmp_path / "straight" / "README.md").read_text()
    assert "a mixture of 2 datasets" in report and f"squad 0.3, {seen['squad']:,}" in report
    assert "squad: final validation loss" in report
    tcfg = json.loads((tmp_path / "straight" / "training_config.json").read_text())
    assert tcfg["dataset_dirs"] == [str(a.path.resolve()), str(b.path.resolve())]
    # another mixture is other data for a resume: refused unless the user says so
    with pytest.raises(OpenLLMError, match="data"):
        train(small_config(a, tmp_path / "resumed", **{**mix, "data_weights": [0.5, 0.5], "max_steps": 12},
                           resume="auto"), log=quiet)  # fmt: skip


def test_a_mixture_needs_one_tokenizer(two_datasets, small_corpus, tmp_path):
    from openllm.data.dataset import load_dataset
    from openllm.data.prepare import prepare_dataset

    other = prepare_dataset([small_corpus], tmp_path / "other", vocab_size=380)
    with pytest.raises(OpenLLMError, match="must share one tokenizer"):
        DatasetMixture.of([two_datasets[0], load_dataset(other.path)], None)


def test_repeated_list_options_add_up_everywhere_and_a_typed_list_replaces_the_files(tmp_path):
    """The shared option mechanism: `--input a --input b` is both files for every command, not the last one."""
    from openllm.cli import _with_options_file, build_parser

    parser = build_parser("prepare")
    args = parser.parse_args(["prepare", "--input", "a", "--input", "b", "c", "--output-dir", "o"])
    assert args.inputs == ["a", "b", "c"]
    options = tmp_path / "o.yaml"
    options.write_text("input: [x.txt, y.txt]\noutput_dir: o\n")
    argv = _with_options_file(parser, ["prepare", "--config", str(options), "--input", "z.txt"])
    assert parser.parse_args(argv).inputs == ["z.txt"]  # the command line's list wins, whole
    assert parser.parse_args(_with_options_file(parser, ["prepare", "--config", str(options)])).inputs == [
        "x.txt",
        "y.txt",
    ]
    finetune = build_parser("finetune")
    assert finetune.parse_args(["finetune", "--model", "m", "--data", "a", "--data", "b"]).chat_data == ["a", "b"]
    assert TrainConfig(data=["a", "b"], data_weights="0.7,0.3").resolved().data_weights == [0.7, 0.3]
    with pytest.raises(OpenLLMError, match="gives 1 weight"):
        TrainConfig(data=["a", "b"], data_weights=[0.7]).resolved()
