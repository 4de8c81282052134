"""The built-in demo corpus: 40 everyday sentences in 9 languages and 6 scripts, spoken by espeak-ng.

The audio is synthesized at first use into a FLEURS-style folder (so the demo goes through the
same reader as FLEURS), then prepared into shards. The ``train`` split is spoken by each language's
default voice; the ``dev`` split speaks the first sentences again with another voice, a held-out
speaker for validation.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mcat_ds.data.prepare import INDEX_FILE, prepare_shards
from mcat_ds.data.sources import read_fleurs
from mcat_ds.languages import get_language

VOICES = {
    "eng": "en-us", "cmn": "cmn-latn-pinyin", "deu": "de", "fra": "fr-fr", "spa": "es",
    "rus": "ru", "ara": "ar", "hin": "hi", "jpn": "ja",
}
"""espeak-ng voice per language. Japanese sentences are written in kana: espeak-ng reads kanji as
'Chinese letter'."""
DEV_VOICE_VARIANT = "+f3"
DEV_SENTENCES = 10
MAX_SECONDS = 5.0
"""The tiny encoder's window; every demo utterance is shorter (espeak-ng speaks them in < 2.6 s)."""


@dataclass(frozen=True)
class DemoSentence:
    id: str
    texts: dict[str, str]


def demo_sentences() -> list[DemoSentence]:
    table = resources.files("mcat_ds.data").joinpath("demo_sentences.tsv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(table.splitlines(), delimiter="\t"))
    return [DemoSentence(row.pop("id"), row) for row in rows]


def demo_texts() -> list[str]:
    """Every sentence of the corpus in every language: what tiny tokenizers are trained on."""
    return [text for sentence in demo_sentences() for text in sentence.texts.values()]


def espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError(
            "espeak-ng is not installed; the demo corpus is synthesized with it "
            "(Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return binary


def speak(jobs: Iterable[tuple[str, str, Path]], threads: int = 4) -> None:
    """espeak-ng says each (voice, text) into its wav file (22.05 kHz), ``threads`` at a time."""
    binary = espeak_binary()

    def run(job: tuple[str, str, Path]) -> None:
        voice, text, path = job
        # arguments go to espeak-ng as a list: no shell
        subprocess.run([binary, "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, jobs))


def write_demo_fleurs(root: Path, threads: int = 4) -> Path:
    """Write ``root/<locale>/{train,dev}.tsv`` and the wav files they name."""
    sentences = demo_sentences()
    splits = {"train": (sentences, ""), "dev": (sentences[:DEV_SENTENCES], DEV_VOICE_VARIANT)}
    jobs = []
    for code, voice in VOICES.items():
        locale = get_language(code).fleurs
        for split, (chosen, variant) in splits.items():
            audio_dir = root / locale / "audio" / split
            audio_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            for sentence in chosen:
                file_name = f"{sentence.id}_{split}.wav"
                text = sentence.texts[code]
                jobs.append((voice + variant, text, audio_dir / file_name))
                # FLEURS columns: id, file, raw and normalized transcription, characters, samples, gender
                rows.append([sentence.id, file_name, text, text.lower(), "|".join(text.lower().replace(" ", "|")),
                             "0", "MALE" if not variant else "FEMALE"])
            with open(root / locale / f"{split}.tsv", "w", encoding="utf-8", newline="") as handle:
                csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\").writerows(rows)
    speak(jobs, threads)
    return root


def build_demo_data(out: str | Path, workers: int | None = None) -> Path:
    """Synthesize and shard the demo corpus into ``out`` (reused when already there).

    Returns the directory holding ``train/`` and ``dev/`` shard sets.
    """
    out = Path(out)
    shards = out / "shards"
    if all((shards / split / INDEX_FILE).is_file() for split in ("train", "dev")):
        return shards
    for partial in (out / "fleurs", shards):  # an interrupted build: start over
        if partial.exists():
            shutil.rmtree(partial)
    fleurs = write_demo_fleurs(out / "fleurs")
    for split in ("train", "dev"):
        report = prepare_shards(read_fleurs(fleurs, split), shards / split, max_seconds=MAX_SECONDS, workers=workers)
        if report["skipped"]:
            raise RuntimeError(f"demo corpus: {len(report['skipped'])} utterances were skipped: {report['skipped'][:3]}")
    return shards
