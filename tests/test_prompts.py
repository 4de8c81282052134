import pytest
import transformers

from conftest import SENTENCES
from mcat_ds.build import add_language_tags
from mcat_ds.languages import LANGUAGES
from mcat_ds.prompts import build_prompt, build_target, split_srt, split_srt_output, split_srt_output_release
from mcat_ds.tiny import train_tokenizer


def test_table_iii_instructions_and_predictions():
    en, de = "Will it rain tomorrow?", "Regnet es morgen?"
    assert build_prompt("asr", "eng") == "<|eng|>"
    assert build_target("asr", "eng", transcript=en) == en
    assert build_prompt("smt", "eng", "deu", transcript=en) == "Will it rain tomorrow?<|eng|><|deu|>"
    assert build_target("smt", "eng", "deu", transcript=en, translation=de) == de
    assert build_prompt("srt", "eng", "deu") == "<|eng|><|deu|>"
    assert build_target("srt", "eng", "deu", transcript=en, translation=de) == (
        "Will it rain tomorrow?<|eng|><|deu|>Regnet es morgen?"
    )


def test_missing_parts_are_errors():
    with pytest.raises(ValueError, match="smt needs the transcript"):
        build_prompt("smt", "eng", "deu")
    with pytest.raises(ValueError, match="needs a target language"):
        build_prompt("srt", "eng")
    with pytest.raises(ValueError, match="srt needs a translation"):
        build_target("srt", "eng", "deu", transcript="x")
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        build_prompt("asr", "xx")


@pytest.mark.parametrize(
    "text, transcript, translation, well_formed",
    [
        ("Hello.<|eng|><|deu|>Hallo.", "Hello.", "Hallo.", True),
        (" Hello. <|eng|><|deu|> Hallo. ", "Hello.", "Hallo.", True),
        ("Hallo.", "Hallo.", "Hallo.", False),  # no tags: both parts are the text
        ("Hello.<|eng|><|deu|>Hallo.<|eng|><|deu|>Hallo.", "Hello.", "Hallo.", False),  # loop
        ("Hello.<|eng|><|deu|><|eng|><|deu|>Hallo.", "Hello.", "Hallo.", False),  # repeated tags
        ("Hello.<|eng|><|fra|>Bonjour.", "Hello.", "Bonjour.", False),  # wrong target tag
        ("Hello.<|eng|>Hallo.", "Hello.", "Hallo.", False),  # one tag only
        ("<|eng|><|deu|>Hallo.", "", "Hallo.", False),  # no transcript
        ("Hello.<|eng|><|deu|>", "Hello.", "", False),  # no translation
        ("Hello.<|eng|><|de", "Hello.", "", False),  # cut off inside the tag pair
        ("Hello.<|eng|><|deu|>Hallo.<|en", "Hello.", "Hallo.", False),
        ("", "", "", False),
    ],
)
def test_split_srt_output(text, transcript, translation, well_formed):
    out = split_srt_output(text, "eng", "deu")
    assert (out.transcript, out.translation, out.well_formed) == (transcript, translation, well_formed)


@pytest.mark.parametrize(
    "text, release, first",
    [
        ("A<|eng|><|deu|>B<|eng|><|deu|>C", ("A<|eng|><|deu|>B<|eng|><|deu|>C", "C"), ("A", "B")),  # the case
        ("Hello.<|eng|><|deu|>Hallo.", ("Hello.", "Hallo."), ("Hello.", "Hallo.")),
        ("Hallo.", ("Hallo.", "Hallo."), ("Hallo.", "Hallo.")),  # no tags: both rules take the text
        ("Hello.<|eng|><|fra|>Bonjour.", ("Hello.<|eng|><|fra|>Bonjour.", "Bonjour."), ("Hello.", "Bonjour.")),
        ("Hello.<|eng|><|deu|>Hallo.<|de", ("Hello.", "Hallo.<|de"), ("Hello.", "Hallo.")),  # cut-off tag
        ("Hello.<|eng|><|deu|><|eng|><|deu|>Hallo.", ("Hello.<|eng|><|deu|><|eng|><|deu|>Hallo.", "Hallo."),
         ("Hello.", "Hallo.")),
    ],
)
def test_release_split_rule_takes_the_text_after_the_last_tag(text, release, first):
    """The release's scorer (evaluation/test_metric_n.py): split on the prompt's pair, else after the last |>."""
    out = split_srt_output_release(text, "eng", "deu")
    assert (out.transcript, out.translation) == release
    assert (split_srt(text, "eng", "deu", "release").translation, split_srt(text, "eng", "deu").translation) == (release[1], first[1])
    assert split_srt(text, "eng", "deu", "first").transcript == first[0]
    with pytest.raises(ValueError, match="rules are first, release"):
        split_srt(text, "eng", "deu", "last")


def test_split_without_known_languages_accepts_any_pair():
    assert split_srt_output("a<|jpn|><|kor|>b").well_formed


@pytest.fixture(scope="module")
def tokenizer_with_tags(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(SENTENCES * 3, 600).save_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)  # the user path
    tag_ids = add_language_tags(tokenizer)
    return tokenizer, tag_ids


def test_every_tag_is_one_token_and_round_trips(tokenizer_with_tags):
    tokenizer, tag_ids = tokenizer_with_tags
    assert len(set(tag_ids.values())) == 70
    base = len(tokenizer) - 70
    assert sorted(tag_ids.values()) == list(range(base, base + 70))
    for language in LANGUAGES:
        src, tgt = language.code, ("eng" if language.code != "eng" else "cmn")
        text = build_target("srt", src, tgt, transcript="明天 rain?", translation="Regnet es?")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tag_ids[src] in ids and tag_ids[tgt] in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        parts = split_srt_output(tokenizer.decode(ids, skip_special_tokens=True), src, tgt)
        assert parts.well_formed and parts.translation == "Regnet es?"


def test_tags_are_not_special_so_decoding_keeps_them(tokenizer_with_tags):
    tokenizer, tag_ids = tokenizer_with_tags
    ids = [tokenizer.bos_token_id, tag_ids["deu"], tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<|deu|>"
