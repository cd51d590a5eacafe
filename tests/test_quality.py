"""`openllm prepare`'s quality filters: each drops the documents it names and no other, is counted in meta.json,
is part of the dataset's identity, and refuses a bad threshold in one line."""

from __future__ import annotations

import json
import random

import pytest

from openllm.core.errors import OpenLLMError
from openllm.data.prepare import prepare_dataset
from tests.conftest import cli
from tests.test_prepare import decoded_documents

FILTERS = {"min_chars": 40, "max_chars": 3000, "min_alpha_fraction": 0.6, "max_repeated_lines": 0.3,
           "max_repeated_ngrams": 0.2}  # fmt: skip


def planted(small_corpus) -> tuple[list[str], dict[str, list[str]]]:
    """Good documents (Shakespeare paragraphs that clearly pass) and, for each filter, documents only it drops."""
    good = []
    for p in small_corpus.read_text().split("\n\n"):
        lines = [x.strip() for x in p.splitlines() if x.strip()]
        if 60 <= len(p.strip()) <= 2000 and len(set(lines)) == len(lines) and len(good) < 120:
            good.append(p.strip())
    words = sorted({w for p in good for w in p.split() if w.isalpha()})
    r = random.Random(0)
    bad = {
        "min_chars": [f"Page {i} of 9." for i in range(5)],
        "max_chars": [" ".join(r.choice(words) for _ in range(900)) for _ in range(3)],
        "min_alpha_fraction": [" ".join(f"{r.randint(0, 99999):05d}" for _ in range(30)) + " total" for _ in range(4)],
        "max_repeated_lines": [f"Home\nAbout us\nHome\nAbout us\nHome\nAbout us\nContact page {w}" for w in words[:4]],
        "max_repeated_ngrams": [f"{w} " + "buy one get one free today only " * 8 for w in words[4:8]],
    }
    return good, bad


def test_each_filter_drops_its_documents_and_no_others(small_corpus, tmp_path):
    good, bad = planted(small_corpus)
    docs = good + [d for kind in bad.values() for d in kind]
    random.Random(1).shuffle(docs)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "out", vocab_size=400, **FILTERS)
    assert ds.meta["quality_filters"] == FILTERS
    assert ds.meta["filtered_documents"] == {k: len(v) for k, v in bad.items()}
    kept = decoded_documents(ds, "train") + decoded_documents(ds, "val")
    assert sorted(kept) == sorted(good)
    # the filters are part of the dataset's identity: other thresholds in the same directory are another dataset
    with pytest.raises(OpenLLMError, match="already holds a different dataset"):
        prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "out", vocab_size=400, **{**FILTERS, "min_chars": 50})
    # off by default: every document is kept and nothing is counted
    plain = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "plain", vocab_size=400)
    assert plain.meta["quality_filters"] == {} == plain.meta["filtered_documents"]
    assert plain.meta["train_documents"] + plain.meta["val_documents"] == len(docs)


def test_filters_on_the_command_line_are_reported_and_bad_thresholds_refused(small_corpus, tmp_path):
    good, bad = planted(small_corpus)
    (tmp_path / "c.txt").write_text("\n\n".join(good + bad["min_chars"]))
    out = tmp_path / "out"
    r = cli("prepare", "--input", str(tmp_path / "c.txt"), "--output-dir", str(out), "--vocab-size", "400",
            "--min-chars", "40")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "5 dropped by --min-chars" in r.stdout, r.stdout
    for args, message in [
        (["--min-alpha-fraction", "1.5"], "--min-alpha-fraction: expected a number between 0 and 1"),
        (["--min-chars", "0"], "--min-chars: expected a positive integer"),
        (["--min-chars", "100", "--max-chars", "50"], "--min-chars 100 is above --max-chars 50"),
        (["--min-chars", "100000"], "the quality filters left 0 of"),
    ]:
        r = cli("prepare", "--input", str(tmp_path / "c.txt"), "--output-dir", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert not (tmp_path / "x").exists()


def near_copies(small_corpus) -> tuple[list[str], list[str]]:
    """Long distinct paragraphs, and near-copies of some: words edited, lines reflowed, boilerplate added."""
    originals = [p.strip() for p in small_corpus.read_text().split("\n\n") if len(p.strip()) >= 500][:60]
    r = random.Random(2)
    copies = []
    for i, doc in enumerate(originals[:30]):
        words = doc.split()
        if i % 3 == 0:  # a few words edited
            for j in r.sample(range(len(words)), max(1, len(words) // 100)):
                words[j] = words[j].upper() + "s"
            copies.append(" ".join(words))
        elif i % 3 == 1:  # the same words, lines wrapped elsewhere
            copies.append("\n".join(" ".join(words[k : k + 7]) for k in range(0, len(words), 7)))
        else:  # boilerplate around it
            copies.append(f"Posted by admin on page {i}.\n{doc}\nShare this page.")
    return originals, copies


def test_near_dedup_drops_the_planted_near_copies_and_keeps_every_distinct_document(small_corpus, tmp_path):
    originals, copies = near_copies(small_corpus)
    docs = originals + copies
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "out", vocab_size=400, near_dedup=True)
    assert ds.meta["near_duplicates_dropped"] == len(copies)
    assert ds.meta["near_dedup"] == {"threshold": 0.8, "permutations": 112, "shingle": 5, "seed": 1337,
                                     "bands": ds.meta["near_dedup"]["bands"], "rows": ds.meta["near_dedup"]["rows"]}  # fmt: skip
    bands, rows = ds.meta["near_dedup"]["bands"], ds.meta["near_dedup"]["rows"]
    assert bands * rows <= 112 and 0.5 < (1 / bands) ** (1 / rows) < 0.95  # the S-curve's middle near 0.8
    kept = sorted(decoded_documents(ds, "train") + decoded_documents(ds, "val"))
    assert kept == sorted(originals)
    again = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "again", vocab_size=400, near_dedup=True)
    assert again.meta["fingerprint"] == ds.meta["fingerprint"]  # deterministic
    # without it nothing is dropped but exact copies, and the options are refused without --near-dedup
    with pytest.raises(OpenLLMError, match="--near-dedup-threshold must be between 0 and 1, got 0.0"):
        prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "x", near_dedup=True, near_dedup_threshold=0.0)
    with pytest.raises(OpenLLMError, match="--max-repeated-lines must be a number between 0 and 1, got 1"):
        prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "x", max_repeated_lines=1)
    plain = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "plain", vocab_size=400)
    assert plain.meta["near_duplicates_dropped"] == 0 and plain.meta["near_dedup"] is None
    assert plain.meta["train_documents"] + plain.meta["val_documents"] == len(docs)
    for args, message in [
        (["--near-dedup-threshold", "0.7"], "--near-dedup-threshold needs --near-dedup"),
        (["--near-dedup", "--near-dedup-threshold", "1.5"], "--near-dedup-threshold: expected a number between"),
        (["--near-dedup", "--near-dedup-permutations", "1"], "--near-dedup-permutations must be from 2 to 1024, got 1"),
    ]:
        r = cli("prepare", "--input", str(tmp_path / "c.jsonl"), "--output-dir", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
        assert not (tmp_path / "x").exists()


OTHER_LANGUAGES = [
    "Le conseil municipal a voté hier soir le nouveau budget de la ville, qui prévoit la rénovation des écoles "
    "et la construction d'une bibliothèque près de la gare.",
    "Die Forscher der Universität haben gezeigt, dass sich die Temperatur des Sees in den letzten dreißig Jahren "
    "deutlich erhöht hat, vor allem im Sommer.",
    "El equipo ganó el partido en el último minuto y los aficionados celebraron la victoria en las calles del "
    "centro de la ciudad hasta la madrugada.",
    "Il museo ha riaperto le sue sale dopo due anni di lavori e presenta una nuova collezione di dipinti del "
    "Rinascimento donati da una famiglia fiorentina.",
]


def test_the_language_filter_keeps_only_the_languages_asked_for(squad_path, tmp_path):
    english = [p.strip() for p in squad_path.read_text().split("\n\n") if len(p.strip()) > 200][:40]
    docs = english + OTHER_LANGUAGES
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "en", vocab_size=400, languages="en")
    assert ds.meta["filtered_documents"] == {"languages": 4} and ds.meta["quality_filters"] == {"languages": "en"}
    assert sorted(decoded_documents(ds, "train") + decoded_documents(ds, "val")) == sorted(english)
    both = prepare_dataset([tmp_path / "c.jsonl"], tmp_path / "enfr", vocab_size=400, languages="en, FR")
    assert both.meta["filtered_documents"] == {"languages": 3}  # the French one is kept
    r = cli(
        "prepare", "--input", str(tmp_path / "c.jsonl"), "--output-dir", str(tmp_path / "x"), "--languages", "en,xx"
    )
    assert r.returncode == 2 and "--languages: xx is not a language code py3langid knows" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "x").exists()
