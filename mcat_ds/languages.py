"""The 70 languages of MCAT and the ordered language sets of the curriculum.

Codes are ISO 639-3 as the instruction tags use them (``<|eng|>``); that spelling is the key
everywhere in the project. One table holds every fact about a language; nothing else in the
code base spells a FLEURS locale or a Whisper code.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Language:
    code: str
    """ISO 639-3 code as used in the tags, e.g. ``eng``, ``cmn``, ``azj``."""
    name: str
    family: str
    script: str
    whisper: str | None
    """Whisper's language code, or None where Whisper has no token for the language (Kyrgyz)."""
    fleurs: str
    """FLEURS locale folder, e.g. ``en_us``, ``cmn_hans_cn``."""
    fleurs_train_utterances: int
    """Size of the FLEURS train split (TFDS ``xtreme_s/fleurs.<locale>`` 2.0.0 catalog); orders L44."""

    @property
    def tag(self) -> str:
        return f"<|{self.code}|>"


def _table(rows: str) -> tuple[Language, ...]:
    languages = []
    for row in rows.strip().splitlines():
        code, name, family, script, whisper, fleurs, train = (cell.strip() for cell in row.split("|"))
        languages.append(Language(code, name, family, script, None if whisper == "-" else whisper, fleurs, int(train)))
    return tuple(languages)


# code | name | family | script | whisper | FLEURS locale | FLEURS train utterances
LANGUAGES: tuple[Language, ...] = _table("""
afr | Afrikaans          | Indo-European  | Latin      | af  | af_za       | 1032
amh | Amharic            | Afro-Asiatic   | Ethiopic   | am  | am_et       | 3163
ara | Arabic             | Afro-Asiatic   | Arabic     | ar  | ar_eg       | 2104
asm | Assamese           | Indo-European  | Bengali    | as  | as_in       | 2812
azj | Azerbaijani        | Turkic         | Latin      | az  | az_az       | 2665
bel | Belarusian         | Indo-European  | Cyrillic   | be  | be_by       | 2433
ben | Bengali            | Indo-European  | Bengali    | bn  | bn_in       | 3006
bos | Bosnian            | Indo-European  | Latin      | bs  | bs_ba       | 3091
bul | Bulgarian          | Indo-European  | Cyrillic   | bg  | bg_bg       | 2973
cat | Catalan            | Indo-European  | Latin      | ca  | ca_es       | 2300
ces | Czech              | Indo-European  | Latin      | cs  | cs_cz       | 2811
cmn | Mandarin Chinese   | Sino-Tibetan   | Han (Simplified)  | zh  | cmn_hans_cn | 3246
cym | Welsh              | Indo-European  | Latin      | cy  | cy_gb       | 3427
dan | Danish             | Indo-European  | Latin      | da  | da_dk       | 2465
deu | German             | Indo-European  | Latin      | de  | de_de       | 2987
ell | Greek              | Indo-European  | Greek      | el  | el_gr       | 3215
eng | English            | Indo-European  | Latin      | en  | en_us       | 2602
est | Estonian           | Uralic         | Latin      | et  | et_ee       | 2501
fas | Persian            | Indo-European  | Arabic     | fa  | fa_ir       | 3101
fin | Finnish            | Uralic         | Latin      | fi  | fi_fi       | 2704
fra | French             | Indo-European  | Latin      | fr  | fr_fr       | 3193
glg | Galician           | Indo-European  | Latin      | gl  | gl_es       | 2175
guj | Gujarati           | Indo-European  | Gujarati   | gu  | gu_in       | 3145
heb | Hebrew             | Afro-Asiatic   | Hebrew     | he  | he_il       | 3242
hin | Hindi              | Indo-European  | Devanagari | hi  | hi_in       | 2120
hrv | Croatian           | Indo-European  | Latin      | hr  | hr_hr       | 3461
hun | Hungarian          | Uralic         | Latin      | hu  | hu_hu       | 3095
hye | Armenian           | Indo-European  | Armenian   | hy  | hy_am       | 3053
ind | Indonesian         | Austronesian   | Latin      | id  | id_id       | 2579
isl | Icelandic          | Indo-European  | Latin      | is  | is_is       | 926
ita | Italian            | Indo-European  | Latin      | it  | it_it       | 3030
jav | Javanese           | Austronesian   | Latin      | jw  | jv_id       | 3051
jpn | Japanese           | Japonic        | Kanji and Kana    | ja  | ja_jp       | 2292
kan | Kannada            | Dravidian      | Kannada    | kn  | kn_in       | 2283
kat | Georgian           | Kartvelian     | Georgian   | ka  | ka_ge       | 1491
kaz | Kazakh             | Turkic         | Cyrillic   | kk  | kk_kz       | 3200
khm | Khmer              | Austroasiatic  | Khmer      | km  | km_kh       | 1675
kir | Kyrgyz             | Turkic         | Cyrillic   | -   | ky_kg       | 2818
kor | Korean             | Koreanic       | Hangul     | ko  | ko_kr       | 2307
lao | Lao                | Kra-Dai        | Lao        | lo  | lo_la       | 1809
lav | Latvian            | Indo-European  | Latin      | lv  | lv_lv       | 2110
lit | Lithuanian         | Indo-European  | Latin      | lt  | lt_lt       | 2937
mal | Malayalam          | Dravidian      | Malayalam  | ml  | ml_in       | 3043
mkd | Macedonian         | Indo-European  | Cyrillic   | mk  | mk_mk       | 2337
msa | Malay              | Austronesian   | Latin      | ms  | ms_my       | 2667
mya | Burmese            | Sino-Tibetan   | Myanmar    | my  | my_mm       | 3058
nld | Dutch              | Indo-European  | Latin      | nl  | nl_nl       | 2918
nob | Norwegian Bokmål   | Indo-European  | Latin      | no  | nb_no       | 3167
npi | Nepali             | Indo-European  | Devanagari | ne  | ne_np       | 3332
pan | Punjabi            | Indo-European  | Gurmukhi   | pa  | pa_in       | 1923
pol | Polish             | Indo-European  | Latin      | pl  | pl_pl       | 2841
por | Portuguese         | Indo-European  | Latin      | pt  | pt_br       | 2793
ron | Romanian           | Indo-European  | Latin      | ro  | ro_ro       | 2891
rus | Russian            | Indo-European  | Cyrillic   | ru  | ru_ru       | 2562
slk | Slovak             | Indo-European  | Latin      | sk  | sk_sk       | 1957
slv | Slovenian          | Indo-European  | Latin      | sl  | sl_si       | 2512
spa | Spanish            | Indo-European  | Latin      | es  | es_419      | 2796
srp | Serbian            | Indo-European  | Cyrillic   | sr  | sr_rs       | 2944
swe | Swedish            | Indo-European  | Latin      | sv  | sv_se       | 2385
swh | Swahili            | Niger-Congo    | Latin      | sw  | sw_ke       | 3070
tam | Tamil              | Dravidian      | Tamil      | ta  | ta_in       | 2367
tel | Telugu             | Dravidian      | Telugu     | te  | te_in       | 2302
tgl | Tagalog (Filipino) | Austronesian   | Latin      | tl  | fil_ph      | 1884
tha | Thai               | Kra-Dai        | Thai       | th  | th_th       | 2602
tur | Turkish            | Turkic         | Latin      | tr  | tr_tr       | 2526
ukr | Ukrainian          | Indo-European  | Cyrillic   | uk  | uk_ua       | 2810
urd | Urdu               | Indo-European  | Arabic     | ur  | ur_pk       | 2109
uzb | Uzbek              | Turkic         | Latin      | uz  | uz_uz       | 2943
vie | Vietnamese         | Austroasiatic  | Latin      | vi  | vi_vn       | 2994
yue | Cantonese          | Sino-Tibetan   | Han (Traditional) | yue | yue_hant_hk | 1939
""")

BY_CODE: dict[str, Language] = {language.code: language for language in LANGUAGES}
BY_FLEURS_LOCALE: dict[str, Language] = {language.fleurs: language for language in LANGUAGES}


class UnknownLanguageError(ValueError):
    pass


def get_language(code: str) -> Language:
    """The language for a tag code; an unknown code names the closest known ones."""
    try:
        return BY_CODE[code]
    except KeyError:
        raise UnknownLanguageError(_unknown_message(code)) from None


# Other ISO 639 spellings users reach for (macrolanguage, bibliographic or FLORES-200 codes); they
# are suggested, never silently accepted, so that one language has one key.
_OTHER_SPELLINGS = {
    "zho": "cmn", "chi": "cmn", "pes": "fas", "per": "fas", "arb": "ara", "zsm": "msa", "may": "msa",
    "swa": "swh", "nep": "npi", "aze": "azj", "uzn": "uzb", "fil": "tgl", "nor": "nob", "ger": "deu",
    "fre": "fra", "dut": "nld", "gre": "ell", "cze": "ces", "slo": "slk", "rum": "ron", "arm": "hye",
    "geo": "kat", "wel": "cym", "ice": "isl", "mac": "mkd", "bur": "mya", "pnb": "pan",
}


def _unknown_message(code: str) -> str:
    lowered = code.lower()
    by_code = difflib.get_close_matches(lowered, BY_CODE, n=3, cutoff=0.5)
    by_name = [language.code for language in LANGUAGES if len(lowered) > 2 and lowered in language.name.lower()]
    by_other = [language.code for language in LANGUAGES if lowered in (language.whisper, language.fleurs)]
    spelled = [_OTHER_SPELLINGS[lowered]] if lowered in _OTHER_SPELLINGS else []
    near = list(dict.fromkeys(spelled + by_other + by_code + by_name))
    hint = ", ".join(f"{c} ({BY_CODE[c].name})" for c in near) if near else "none"
    return f"unknown language code {code!r}: codes are ISO 639-3 as in the tags (e.g. eng, cmn); near matches: {hint}"


L2 = ("eng", "cmn")
"""Phase 1 starts with English and Mandarin (paper III-C3)."""

L28 = (
    "ara", "ben", "ces", "cmn", "deu", "eng", "fas", "fra", "heb", "hin", "ind", "ita", "jpn", "khm",
    "kor", "lao", "msa", "mya", "nld", "pol", "por", "rus", "spa", "tgl", "tha", "tur", "urd", "vie",
)
"""The 28 languages GemmaX2-28 was trained for (the MCAT-Small language set)."""

L70 = tuple(language.code for language in LANGUAGES)


def _largest_fleurs_beyond(base: tuple[str, ...], count: int) -> tuple[str, ...]:
    rest = [language for language in LANGUAGES if language.code not in base]
    rest.sort(key=lambda language: (-language.fleurs_train_utterances, language.code))
    return base + tuple(language.code for language in rest[:count])


L44 = _largest_fleurs_beyond(L28, 16)
"""The paper does not list L44. Ours: L28 plus the 16 other languages with the largest FLEURS train
split. FLEURS publishes utterance counts, not hours, per language; with ~10 h per language and
similar utterance lengths the counts order languages the way hours would."""

LANGUAGE_SETS: dict[str, tuple[str, ...]] = {"L2": L2, "L28": L28, "L44": L44, "L70": L70}


def resolve_language_set(spec: str) -> tuple[str, ...]:
    """A named set (``L2``, ``L28``, ``L44``, ``L70``), a comma-separated list of codes, or
    ``@path`` to a file of codes (whitespace or comma separated, ``#`` comments)."""
    if spec in LANGUAGE_SETS:
        return LANGUAGE_SETS[spec]
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise FileNotFoundError(f"language set file {path} does not exist")
        words = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for word in line.split("#", 1)[0].replace(",", " ").split():
                try:
                    get_language(word)
                except UnknownLanguageError as error:
                    raise UnknownLanguageError(f"{path}:{line_number}: {error}") from None
                words.append(word)
        codes = words
    else:
        codes = [word.strip() for word in spec.split(",") if word.strip()]
        if len(codes) == 1 and codes[0].upper().startswith("L") and codes[0][1:].isdigit():
            raise UnknownLanguageError(f"unknown language set {spec!r}: named sets are {', '.join(LANGUAGE_SETS)}")
        for code in codes:
            get_language(code)
    if not codes:
        raise ValueError(f"language set {spec!r} is empty")
    duplicates = sorted({code for code in codes if codes.count(code) > 1})
    if duplicates:
        raise ValueError(f"language set {spec!r} lists {', '.join(duplicates)} more than once")
    return tuple(codes)
