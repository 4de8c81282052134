import json

import pytest

from conftest import ANCHORS
from mcat_ds.data.sources import Skipped, Utterance, read_fleurs, read_manifest

RELEASE_MANIFEST = ANCHORS / "m2m-70" / "srt_demo_70.jsonl"


@pytest.mark.skipif(not RELEASE_MANIFEST.is_file(), reason=f"release anchors not found at {ANCHORS}")
def test_every_line_of_the_release_manifest_parses(tmp_path):
    records = list(read_manifest(RELEASE_MANIFEST, tmp_path))
    skipped = [r for r in records if isinstance(r, Skipped)]
    utterances = [r for r in records if isinstance(r, Utterance)]
    assert skipped == []
    lines = [json.loads(line) for line in RELEASE_MANIFEST.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4830
    assert sum(len(u.translations) for u in utterances) == 4830  # one direction per line
    assert len(utterances) == len({line["audio"] for line in lines})
    first = lines[0]
    src, tgt = first["source"].split("_")[1:]
    match = next(u for u in utterances if u.audio == (tmp_path / first["audio"]).resolve())
    transcript, translation = first["gt"].split(first["prompt"])
    assert (match.language, match.transcript, match.translations[tgt]) == (src, transcript, translation)
    assert len({u.language for u in utterances}) == 70


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                              for line in lines) + "\n", encoding="utf-8")
    return path


def test_manifest_problems_name_the_line(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [
        {"prompt": "<|eng|><|deu|>", "gt": "Hello.<|eng|><|deu|>Hallo.", "source": "x", "audio": "a.wav"},
        "{not json",
        {"prompt": "<|eng|><|deu|>", "gt": "no tags here", "source": "x", "audio": "b.wav"},
        {"prompt": "<|eng|><|xxx|>", "gt": "a<|eng|><|xxx|>b", "source": "x", "audio": "c.wav"},
        {"prompt": "<|eng|><|fra|>", "gt": "Hello.<|eng|><|fra|>Bonjour.", "source": "x", "audio": "a.wav"},
        {"prompt": "<|eng|><|fra|>", "gt": "<|eng|><|fra|>Bonjour.", "source": "x", "audio": "d.wav"},
        {"prompt": "<|eng|><|deu|>", "gt": "Hi<|eng|><|deu|>Hallo", "source": "x", "audio": "../../etc/passwd"},
        {"audio": "e.wav", "language": "deu", "transcript": "Guten Tag.", "translations": {"eng": "Good day."}},
        {"audio": "f.wav", "language": "deu", "transcipt": "typo"},
        {"audio": "g.wav", "language": "klingon", "transcript": "nuqneH"},
        {"prompt": "<|eng|><|deu|>", "gt": "Other text.<|eng|><|deu|>Anders.", "source": "x", "audio": "a.wav"},
        [1, 2],
    ])
    records = list(read_manifest(manifest, tmp_path))
    skipped = {r.line: r.reason for r in records if isinstance(r, Skipped)}
    assert skipped[2].startswith("malformed manifest line: not JSON")
    assert "exactly once" in skipped[3]
    assert skipped[4] == "unknown language: 'xxx' in prompt '<|eng|><|xxx|>'"
    assert skipped[6] == "empty transcript"
    assert skipped[7].startswith("audio path outside the audio root")
    assert "unknown field(s) transcipt" in skipped[9]
    assert skipped[10] == "unknown language: 'klingon'"
    assert skipped[11].startswith("conflicting manifest line") and "line 1" in skipped[11]
    assert skipped[12] == "malformed manifest line: not a JSON object"
    files = {r.line: (r.file, r.origin) for r in records if isinstance(r, Skipped)}
    assert files[6] == (str((tmp_path / "d.wav").resolve()), str(manifest))  # the empty transcript's audio
    assert files[10] == (str((tmp_path / "g.wav").resolve()), str(manifest))
    assert files[9] == (str(manifest), None)  # a malformed line is about the manifest
    assert files[7] == (str(manifest), None)  # a path outside the root is never resolved
    utterances = {u.audio.name: u for u in records if isinstance(u, Utterance)}
    assert set(utterances) == {"a.wav", "e.wav"}
    assert utterances["a.wav"].translations == {"deu": "Hallo.", "fra": "Bonjour."}  # lines 1 and 5 merged
    assert utterances["e.wav"].translations == {"eng": "Good day."} and utterances["e.wav"].line == 8


def write_fleurs_table(root, locale, split, rows):
    folder = root / locale
    (folder / "audio" / split).mkdir(parents=True, exist_ok=True)
    lines = ["\t".join([sid, name, text, text.lower(), "x", "16000", "MALE"]) for sid, name, text in rows]
    (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_fleurs_translations_join_transcripts_by_sentence_id(tmp_path):
    write_fleurs_table(tmp_path, "en_us", "train", [("7", "1.wav", "Hello."), ("7", "2.wav", "Hello."), ("8", "3.wav", "Bye.")])
    write_fleurs_table(tmp_path, "de_de", "train", [("7", "4.wav", "Hallo."), ("9", "5.wav", "Nur hier.")])
    write_fleurs_table(tmp_path, "de_de", "test", [("8", "6.wav", "Tschüss.")])  # another split: not a translation
    write_fleurs_table(tmp_path, "xx_yy", "train", [("7", "7.wav", "???")])
    write_fleurs_table(tmp_path, "fr_fr", "train", [("7", "8.wav", "  ")])
    (tmp_path / "en_us" / "train.tsv").write_text(
        (tmp_path / "en_us" / "train.tsv").read_text() + "broken\trow\n", encoding="utf-8")
    records = list(read_fleurs(tmp_path, "train"))
    utterances = {u.key: u for u in records if isinstance(u, Utterance)}
    assert utterances["eng_1"].translations == {"deu": "Hallo."}
    assert utterances["eng_2"].translations == {"deu": "Hallo."}  # two speakers of one sentence
    assert utterances["eng_3"].translations == {}
    assert utterances["deu_4"].translations == {"eng": "Hello."}
    assert utterances["eng_1"].audio == (tmp_path / "en_us" / "audio" / "train" / "1.wav").resolve()
    reasons = sorted(r.reason for r in records if isinstance(r, Skipped))
    assert reasons == ["empty transcript", "malformed tsv row: 2 columns, expected 7",
                       "unsupported FLEURS locale: 'xx_yy' is not one of the 70 languages"]
    empty = next(r for r in records if isinstance(r, Skipped) and r.reason == "empty transcript")
    assert (empty.file, empty.line, empty.origin) == (
        str((tmp_path / "fr_fr" / "audio" / "train" / "8.wav").resolve()), 1, str(tmp_path / "fr_fr" / "train.tsv"))
    assert [r.reason for r in read_fleurs(tmp_path / "nothing", "train")][0].startswith("not a FLEURS-style folder")


def test_a_line_that_is_not_utf8_is_skipped_and_named_and_the_rest_read(tmp_path):
    good = {"audio": "a.wav", "language": "eng", "transcript": "Hello.", "translations": {"fra": "Bonjour."}}
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(json.dumps(good).encode() + b"\n"
                         + b'{"audio": "b.wav", "language": "eng", "transcript": "caf\xe9"}\n'
                         + json.dumps({**good, "audio": "c.wav"}, ensure_ascii=False).encode() + b"\n")
    records = list(read_manifest(manifest, tmp_path))
    assert [r.audio.name for r in records if isinstance(r, Utterance)] == ["a.wav", "c.wav"]
    assert [r for r in records if isinstance(r, Skipped)] == [
        Skipped(file=str(manifest), line=2, reason="malformed manifest line: not UTF-8 (byte 0xe9 at column 57)")]


def test_a_tsv_row_that_is_not_utf8_is_skipped_and_named(tmp_path):
    write_fleurs_table(tmp_path, "de_de", "train", [("7", "1.wav", "Grüße."), ("8", "2.wav", "Tschüss.")])
    table = tmp_path / "de_de" / "train.tsv"
    table.write_bytes(table.read_bytes().replace("Tschüss".encode(), b"Tsch\xfcss", 1))
    records = list(read_fleurs(tmp_path, "train"))
    assert [r.key for r in records if isinstance(r, Utterance)] == ["deu_1"]
    assert [r for r in records if isinstance(r, Skipped)] == [
        Skipped(file=str(table), line=2, language="deu", reason="malformed tsv row: not UTF-8 (byte 0xfc at column 13)")]


def test_a_nul_in_a_path_or_a_list_for_a_language_is_a_skipped_line_not_a_crash(tmp_path):
    write_fleurs_table(tmp_path, "de_de", "train", [("7", "1\x00.wav", "Hallo.")])
    manifest = write_lines(tmp_path / "m.jsonl", [{"audio": "a\x00.wav", "language": "eng", "transcript": "Hi."},
                                                  {"audio": "b\x00.wav", "language": "xxx", "transcript": "Hi."},
                                                  {"audio": "c.wav", "language": ["eng"], "transcript": "Hi."}])
    for records in (list(read_fleurs(tmp_path, "train")), list(read_manifest(manifest, tmp_path))):
        assert records and all(isinstance(r, Skipped) for r in records)
