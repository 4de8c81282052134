"""mcat evaluate: metrics equal sacrebleu / jiwer / COMET called directly; tables, heat map, comparison."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jiwer
import pytest
import sacrebleu

from mcat_ds.cli import main
from mcat_ds.data.demo import demo_sentences
from mcat_ds.eval import evaluate
from mcat_ds.eval.evaluate import EvaluationError, comet_model_fingerprint, read_hypotheses, read_published

LANGUAGES = ("eng", "deu", "fra", "cmn", "jpn")


def perturb(text: str, seed: int) -> str:
    """A hypothesis that is close to the reference but not equal (a dropped word or character)."""
    words = text.split()
    if len(words) > 2:
        del words[seed % len(words)]
        return " ".join(words)
    return text[: max(1, len(text) - 1 - seed % 3)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SRT hypotheses for every direction among 5 languages, and a SentencePiece model of the text."""
    import sentencepiece

    root = tmp_path_factory.mktemp("evaluate")
    sentences = [s for s in demo_sentences() if all(code in s.texts for code in LANGUAGES)][:6]
    records = []
    for number, sentence in enumerate(sentences):
        for src in LANGUAGES:
            for tgt in LANGUAGES:
                if src != tgt:
                    ref = sentence.texts[tgt]
                    records.append({"id": f"{number}:{src}-{tgt}", "src": src, "tgt": tgt,
                                    "hyp": perturb(ref, number + len(src + tgt)), "ref": ref,
                                    "hyp_transcript": perturb(sentence.texts[src], number),
                                    "src_ref": sentence.texts[src]})
    hyps = root / "hyps.jsonl"
    hyps.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    texts = [t for s in demo_sentences() for t in s.texts.values()]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(root / "flores"),
                                             vocab_size=1000, hard_vocab_limit=False, character_coverage=1.0)
    return {"root": root, "hyps": hyps, "records": records, "spm": root / "flores.model", "texts": texts}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_off_target_rate_counts_outputs_in_another_language(corpus, tmp_path):
    """The reference of another target as the hypothesis: an output in the wrong language."""
    records = [dict(r) for r in corpus["records"]]
    wrong = {"deu_fra": "eng", "eng_cmn": "deu"}  # direction -> the language its outputs come out in
    for record in records:
        direction = f"{record['src']}_{record['tgt']}"
        if direction in wrong:
            sentence = next(s for s in demo_sentences() if s.texts[record["tgt"]] == record["ref"])
            record["hyp"] = sentence.texts[wrong[direction]]
    hyps = tmp_path / "hyps.jsonl"
    hyps.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "eval"
    assert main(["evaluate", "--hyps", str(hyps), "--out", str(out)]) == 0
    rows = {row["iso3"]: row for row in read_csv(out / "directions.csv")}
    for direction, row in rows.items():
        judged = int(row["language_checked"])
        # the hypotheses are near-copies of the reference: judged unless too short (MIN_LETTERS)
        assert 0 < judged <= int(row["n"]), row
        assert float(row["off_target"]) == (100.0 if direction in wrong else 0.0), row
    summary = (out / "summary.md").read_text(encoding="utf-8").split("## Output language")[1]
    judged = sum(int(row["language_checked"]) for row in rows.values())
    wrong_outputs = sum(int(rows[d]["language_checked"]) for d in wrong)
    assert f"{wrong_outputs} of {judged} outputs judged are in another language" in summary
    assert "| deu_fra | 100.00 |" in summary and "| eng_cmn | 100.00 |" in summary and "| eng_deu |" not in summary


def sacrebleu_flores200(spm_model, hyps, refs, tmp_path) -> float:
    """sacrebleu's own tokenize='flores200' with the test's model in its cache folder."""
    (tmp_path / "sacrebleu" / "models").mkdir(parents=True, exist_ok=True)
    target = tmp_path / "sacrebleu" / "models" / "flores200sacrebleuspm"
    target.write_bytes(spm_model.read_bytes())
    code = ("import json, sys, sacrebleu; h, r = json.load(sys.stdin); "
            "print(sacrebleu.corpus_bleu(h, [r], tokenize='flores200').score)")
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps([hyps, refs]), capture_output=True,
                            text=True, env={**os.environ, "SACREBLEU": str(tmp_path / "sacrebleu")}, check=True)
    return float(result.stdout)


def test_metrics_equal_sacrebleu_and_jiwer(corpus, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out), "--spm", str(corpus["spm"])]) == 0
    rows = {row["iso3"]: row for row in read_csv(out / "directions.csv")}
    assert list(read_csv(out / "directions.csv")[0]) == ["iso3", "n", "spbleu", "chrf", "comet", "wer", "cer",
                                                         "off_target", "language_checked"]
    assert len(rows) == 20 and all(row["comet"] == "" for row in rows.values())
    for direction in ("eng_deu", "cmn_jpn", "fra_eng"):
        group = [r for r in corpus["records"] if f"{r['src']}_{r['tgt']}" == direction]
        hyps, refs = [r["hyp"] for r in group], [r["ref"] for r in group]
        row = rows[direction]
        assert int(row["n"]) == len(group)
        assert float(row["spbleu"]) == pytest.approx(sacrebleu_flores200(corpus["spm"], hyps, refs, tmp_path), abs=0.006)
        assert float(row["chrf"]) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score, abs=0.006)
        transcripts, sources = [r["hyp_transcript"] for r in group], [r["src_ref"] for r in group]
        assert float(row["wer"]) == pytest.approx(100 * jiwer.wer(sources, transcripts), abs=0.006)
        assert float(row["cer"]) == pytest.approx(100 * jiwer.cer(sources, transcripts), abs=0.006)
    assert 0 < float(rows["eng_deu"]["spbleu"]) < 100


def test_summary_heatmap_and_comparison_with_published_scores(corpus, tmp_path):
    published = tmp_path / "published.csv"
    published.write_text("idx,iso3,spbleu,comet\n1,eng_deu,10.0,80.0\n2,deu_eng,20.5,81.0\n3,afr_amh,1.0,70.0\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out), "--spm", str(corpus["spm"]),
                 "--compare", str(published)]) == 0
    assert (out / "heatmap.png").stat().st_size > 20_000
    summary = (out / "summary.md").read_text()
    for heading in ("X->eng", "eng->X", "X->Y (no eng)", "as source", "Against the published scores"):
        assert heading in summary
    ours = {row["iso3"]: float(row["spbleu"]) for row in read_csv(out / "directions.csv")}
    compared = {row["iso3"]: row for row in read_csv(out / "compare.csv")}
    assert set(compared) == {"eng_deu", "deu_eng"}
    assert float(compared["eng_deu"]["diff_spbleu"]) == pytest.approx(ours["eng_deu"] - 10.0, abs=0.011)
    x_eng = [v for k, v in ours.items() if k.endswith("_eng")]
    assert f"| X->eng | 4 | {sum(x_eng) / 4:.2f} |" in summary


def test_heatmap_of_the_70_language_matrix_is_readable(tmp_path):
    from mcat_ds.eval.evaluate import DirectionScores, draw_heatmap
    from mcat_ds.languages import L70

    results = [DirectionScores(f"{s}_{t}", 1, comet=float(i % 90)) for i, (s, t) in
               enumerate((s, t) for s in L70 for t in L70 if s != t)]
    draw_heatmap(results, "comet", tmp_path / "heatmap.png")
    from matplotlib.image import imread

    height, width = imread(tmp_path / "heatmap.png").shape[:2]
    assert min(height, width) >= 70 * 20  # at least 20 pixels per language row and column


def test_bad_hypothesis_lines_name_file_and_line(tmp_path):
    path = tmp_path / "hyps.jsonl"
    good = b'{"id": "a", "src": "eng", "tgt": "deu", "hyp": "x", "ref": "y"}\n'
    for bad in (b'{"id": "b"}\n', b'{"id": "b", "src": "eng", "hyp": "Gr\xfc\xdfe"}\n', b'{"id": "b", "src": ["eng"], "hyp": ""}\n'):
        path.write_bytes(good + bad)
        with pytest.raises(EvaluationError, match=r"hyps.jsonl:2: not a translate output line"):
            read_hypotheses(path)


def test_a_published_table_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "published.csv"
    path.write_bytes(b"idx,iso3,spbleu,comet\n1,eng_deu,10.0,8\xff0.0\n")
    with pytest.raises(EvaluationError, match=r"published.csv: not UTF-8"):
        read_published(path)


def test_damaged_sentence_cache_lines_are_skipped_with_a_warning_and_scored_again(corpus, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "sentences.jsonl").read_text(encoding="utf-8").splitlines()]
    lines = [json.dumps({**r, "comet": 0.5, "comet_model": "an earlier model"}).encode() for r in records]
    lines[2] = lines[2][:25]  # cut by a killed run
    lines[4] = lines[4].replace(b'"comet"', b'"com\xe9t"')  # a byte that is not UTF-8
    (out / "sentences.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning, match=r"sentences.jsonl: skipped 2 damaged line\(s\) \(line 3, 5\)"):
        assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out)]) == 0
    comet = {row["iso3"]: row["comet"] for row in read_csv(out / "directions.csv")}
    lost = {records[i]["direction"] for i in (2, 4)}
    assert {direction for direction, score in comet.items() if score != "50.00"} == lost
    assert all(comet[direction] == "" for direction in lost)  # a direction's COMET needs every sentence's


def test_a_failed_run_leaves_the_previous_tables_whole(corpus, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out)]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    calls = []
    format_value = evaluate._format

    def format_then_fail(value, digits=2):  # the disk fills while a table is written
        calls.append(value)
        if len(calls) > 30:
            raise OSError("no space left on device")
        return format_value(value, digits)

    monkeypatch.setattr(evaluate, "_format", format_then_fail)
    with pytest.raises(OSError, match="no space left"):
        evaluate.evaluate(corpus["hyps"], out)
    assert (out / "directions.csv").read_bytes() == before["directions.csv"]
    assert sorted(path.name for path in out.iterdir()) == sorted(before)  # no temporary files left


def test_comet_model_fingerprint_changes_with_the_model_not_with_time(tmp_path):
    model = tmp_path / "comet"
    (model / "checkpoints").mkdir(parents=True)
    (model / "checkpoints" / "model.ckpt").write_bytes(b"weights")
    (model / "hparams.yaml").write_text("class_identifier: regression_metric\n")
    fingerprint = comet_model_fingerprint(model)
    assert comet_model_fingerprint(model / "checkpoints" / "model.ckpt") == fingerprint
    assert comet_model_fingerprint(shutil.copytree(model, tmp_path / "copy")) != fingerprint
    for name in ("checkpoints/model.ckpt", "hparams.yaml"):  # rewritten in place
        stat = (model / name).stat()
        os.utime(model / name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        assert comet_model_fingerprint(model) != fingerprint, name
        fingerprint = comet_model_fingerprint(model)
    assert comet_model_fingerprint(model) == fingerprint


def test_comet_through_unbabel_comet_and_sentence_scores_reused(corpus, tmp_path):
    pytest.importorskip("comet", reason="unbabel-comet is the [comet] extra")
    import torch
    from comet import load_from_checkpoint
    from tiny_comet import write_tiny_comet

    folder = write_tiny_comet(tmp_path / "models", corpus["texts"])
    saved = torch.load(folder / "checkpoints" / "model.ckpt", weights_only=True)["state_dict"]
    model = load_from_checkpoint(str(folder / "checkpoints" / "model.ckpt"), local_files_only=True)
    for name, tensor in model.state_dict().items():  # COMET loads with strict=False: the weights must really arrive
        torch.testing.assert_close(tensor, saved[name])
    out = tmp_path / "eval"
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out), "--comet-model", str(folder)]) == 0
    rows = {row["iso3"]: row for row in read_csv(out / "directions.csv")}
    group = [r for r in corpus["records"] if r["src"] == "deu" and r["tgt"] == "cmn"]
    direct = model.predict([{"src": r["src_ref"], "mt": r["hyp"], "ref": r["ref"]} for r in group],
                           batch_size=8, gpus=0, progress_bar=False)
    assert float(rows["deu_cmn"]["comet"]) == pytest.approx(100 * sum(direct.scores) / len(group), abs=0.006)
    assert len({row["comet"] for row in rows.values()}) > 1

    # a later run adds spBLEU without the COMET model: the sentence-level COMET scores are reused
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out), "--spm", str(corpus["spm"])]) == 0
    again = {row["iso3"]: row for row in read_csv(out / "directions.csv")}
    assert again["deu_cmn"]["comet"] == rows["deu_cmn"]["comet"] and again["deu_cmn"]["spbleu"]

    # another COMET model into the same folder scores again, as it would into a new one
    other = shutil.copytree(folder, tmp_path / "models" / "other-comet")
    checkpoint = torch.load(other / "checkpoints" / "model.ckpt", weights_only=True)
    generator = torch.Generator().manual_seed(2)
    for tensor in checkpoint["state_dict"].values():
        if tensor.is_floating_point():
            tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    torch.save(checkpoint, other / "checkpoints" / "model.ckpt")
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(out), "--comet-model", str(other)]) == 0
    assert main(["evaluate", "--hyps", str(corpus["hyps"]), "--out", str(tmp_path / "fresh"),
                 "--comet-model", str(other)]) == 0
    comet = [{row["iso3"]: row["comet"] for row in read_csv(directory / "directions.csv")}
             for directory in (out, tmp_path / "fresh")]
    assert comet[0] == comet[1] and comet[0]["deu_cmn"] != rows["deu_cmn"]["comet"]
    sentences = [json.loads(line) for line in (out / "sentences.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {s.get("comet_model") for s in sentences if "comet" in s} == {comet_model_fingerprint(other)}


def test_compare_scores_srt_outputs_by_the_release_rule_and_counts_where_the_rules_differ(corpus, tmp_path):
    records = [dict(r) for r in corpus["records"]]
    looped = [r for r in records if r["src"] == "eng" and r["tgt"] == "deu"]
    for record in records:
        pair = f"<|{record['src']}|><|{record['tgt']}|>"
        record["output"] = record["hyp_transcript"] + pair + record["hyp"]
    for record in looped:  # a decoding loop: the rules take different pieces
        record["output"] = record["hyp_transcript"] + "<|eng|><|deu|>" + record["hyp"] + "<|eng|><|deu|>" + "nein nein"
    hyps = tmp_path / "hyps.jsonl"
    hyps.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    published = tmp_path / "published.csv"
    published.write_text("idx,iso3,spbleu,comet\n1,eng_deu,10.0,80.0\n")

    def chrf(out):
        return {row["iso3"]: float(row["chrf"]) for row in read_csv(out / "directions.csv")}

    assert main(["evaluate", "--hyps", str(hyps), "--out", str(tmp_path / "ours")]) == 0
    assert main(["evaluate", "--hyps", str(hyps), "--out", str(tmp_path / "release"), "--compare", str(published)]) == 0
    ours, release = chrf(tmp_path / "ours"), chrf(tmp_path / "release")
    hyp_refs = [(r["hyp"], r["ref"]) for r in looped]
    assert ours["eng_deu"] == pytest.approx(sacrebleu.corpus_chrf([h for h, _ in hyp_refs], [[r for _, r in hyp_refs]],
                                                                  word_order=2).score, abs=0.01)
    assert release["eng_deu"] == pytest.approx(sacrebleu.corpus_chrf(["nein nein"] * len(looped), [[r for _, r in hyp_refs]],
                                                                     word_order=2).score, abs=0.01)
    assert {k: v for k, v in ours.items() if k != "eng_deu"} == {k: v for k, v in release.items() if k != "eng_deu"}
    split = json.loads((tmp_path / "release" / "srt_split.json").read_text())
    assert (split["rule"], split["srt_outputs"], split["translations_differ"]) == ("release", len(records), len(looped))
    assert f"different translation for {len(looped)} of {len(records)} outputs" in (tmp_path / "release" / "summary.md").read_text()
    assert main(["evaluate", "--hyps", str(hyps), "--out", str(tmp_path / "forced"), "--compare", str(published),
                 "--srt-split", "first"]) == 0
    assert chrf(tmp_path / "forced") == ours
    table = read_csv(tmp_path / "release" / "release_table.csv")
    assert list(table[0]) == ["idx", "iso3", "spbleu", "comet"]
    from conftest import ANCHORS

    published_table = ANCHORS / "m2m-70" / "srt_large_27b_fleurs_s2tt_70_69.csv"
    if published_table.is_file():  # the release's own file has exactly this layout and order
        rows = read_csv(published_table)
        assert list(rows[0]) == list(table[0]) and [r["iso3"] for r in rows] == sorted(r["iso3"] for r in rows)
    assert [row["iso3"] for row in table] == sorted(row["iso3"] for row in table)
    assert [row["idx"] for row in table] == [str(i) for i in range(1, len(table) + 1)]
