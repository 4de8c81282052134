import json

import pytest
from transformers.models.whisper.tokenization_whisper import LANGUAGES as WHISPER_LANGUAGES

from conftest import ANCHORS
from mcat_ds.languages import (
    BY_CODE,
    L2,
    L28,
    L44,
    L70,
    LANGUAGES,
    UnknownLanguageError,
    get_language,
    resolve_language_set,
)

ISSUE_CODES = """afr amh ara asm azj bel ben bos bul cat ces cmn cym dan deu ell eng est fas fin fra glg guj heb hin
hrv hun hye ind isl ita jav jpn kan kat kaz khm kir kor lao lav lit mal mkd msa mya nld nob npi pan pol por ron rus
slk slv spa srp swe swh tam tel tgl tha tur ukr urd uzb vie yue""".split()


def test_table_holds_the_70_languages_once_each():
    assert [language.code for language in LANGUAGES] == ISSUE_CODES
    assert len({language.fleurs for language in LANGUAGES}) == 70
    assert all(language.name and language.family and language.script for language in LANGUAGES)


def test_whisper_codes_are_whisper_languages():
    for language in LANGUAGES:
        if language.whisper is None:
            assert language.code == "kir"  # Whisper has no Kyrgyz token
        else:
            assert language.whisper in WHISPER_LANGUAGES, language


def test_examples_from_the_issue():
    assert get_language("eng").fleurs == "en_us"
    assert get_language("cmn").fleurs == "cmn_hans_cn"
    assert get_language("cmn").whisper == "zh"
    assert get_language("deu").tag == "<|deu|>"


@pytest.mark.skipif(not (ANCHORS / "m2m-70").is_dir(), reason=f"release anchors not found at {ANCHORS}")
def test_fleurs_locales_match_the_release_manifest():
    seen = {}
    with open(ANCHORS / "m2m-70" / "srt_demo_70.jsonl", encoding="utf-8") as manifest:
        for line in manifest:
            record = json.loads(line)
            src = record["source"].split("_")[1]
            seen[src] = record["audio"].split("/")[1]
    assert seen == {language.code: language.fleurs for language in LANGUAGES}


def test_curriculum_sets_are_nested_and_sized():
    assert L2 == ("eng", "cmn")
    assert len(L28) == 28 and len(L44) == 44 and len(L70) == 70
    assert set(L2) < set(L28) < set(L44) < set(L70)
    assert set(L28) == set("ara ben ces cmn deu eng fas fra heb hin ind ita jpn khm kor lao msa mya nld pol por "
                           "rus spa tgl tha tur urd vie".split())


def test_l44_adds_the_16_largest_fleurs_train_sets():
    added = [code for code in L44 if code not in L28]
    rest = sorted((BY_CODE[c] for c in L70 if c not in L28), key=lambda lang: -lang.fleurs_train_utterances)
    assert added == [language.code for language in rest[:16]]
    smallest_added = min(BY_CODE[c].fleurs_train_utterances for c in added)
    assert all(BY_CODE[c].fleurs_train_utterances <= smallest_added for c in L70 if c not in L44)


def test_unknown_code_names_near_matches():
    with pytest.raises(UnknownLanguageError, match=r"'engl'.*eng \(English\)"):
        get_language("engl")
    with pytest.raises(UnknownLanguageError, match=r"'zh'.*cmn"):
        get_language("zh")  # a Whisper code points to the tag code
    with pytest.raises(UnknownLanguageError, match=r"'zho'.*: cmn"):
        get_language("zho")  # so does the macrolanguage code
    with pytest.raises(UnknownLanguageError, match="German"):
        get_language("german")


def test_sets_from_names_lists_and_files(tmp_path):
    assert resolve_language_set("L28") == L28
    assert resolve_language_set("eng, deu") == ("eng", "deu")
    path = tmp_path / "mine.txt"
    path.write_text("# my set\neng deu\nfra, spa  # romance\n")
    assert resolve_language_set(f"@{path}") == ("eng", "deu", "fra", "spa")
    path.write_text("eng\ndeu xyz\n")
    with pytest.raises(UnknownLanguageError, match=r"mine.txt:2: .*'xyz'"):
        resolve_language_set(f"@{path}")
    with pytest.raises(ValueError, match="more than once"):
        resolve_language_set("eng,eng")
    with pytest.raises(UnknownLanguageError, match="named sets are L2, L28, L44, L70"):
        resolve_language_set("L45")
