"""Scores of ``mcat translate`` outputs per direction: ``mcat evaluate``.

Per direction (``src_tgt``; ASR outputs per source language):
- spBLEU: sacrebleu BLEU over SentencePiece pieces of the FLORES-200 model given as ``--spm`` (what
  sacrebleu's ``tokenize="flores200"`` does, without its download);
- chrF++: sacrebleu chrF with word order 2;
- COMET: unbabel-comet from a local checkpoint (wmt22-comet-da), src = reference transcript, mt =
  hypothesis, ref = reference translation, as the release scores it; x100 like its published CSV;
- WER / CER (jiwer) of the transcripts: ASR hypotheses, and the transcript half of SRT outputs;
- off-target rate: the percentage of outputs (translations; ASR transcripts) in another language
  than the one asked for, by lingua (``mcat_ds.eval.checks.output_languages``, the file's languages
  as candidates), of those it can judge: lingua knows the language, the text is long enough, the
  call is clear. Many-to-many models fail this way (English or the source language out); BLEU and
  COMET show it only as a low score.

Writes into the output directory:
- ``directions.csv``: ``iso3,n,spbleu,chrf,comet,wer,cer,off_target,language_checked`` (empty where
  not computed; ``language_checked``: how many outputs the off-target rate is over);
- ``sentences.jsonl``: sentence-level scores (COMET, chrF++), so that a later run reuses COMET
  scores of unchanged hypotheses by the same COMET model and can add a metric without recomputing
  the others;
- ``summary.md``: the paper's summaries (Table VI: X->eng, eng->X, X->Y averages; Table VIII: each
  language as source and as target) and, with ``--compare``, ours beside the published scores;
- ``heatmap.png``: the source x target matrix of COMET (or spBLEU, or chrF++), Figure 5 style;
- ``compare.csv`` with ``--compare``: per direction, ours, published and the difference;
- ``release_table.csv``: the published CSV's own layout (``idx,iso3,spbleu,comet``);
- ``srt_split.json``: the SRT split rule used and how many outputs the two rules split differently.

Each file is replaced in one step (written beside it, then renamed), so a killed run leaves the
previous results or the new ones, never a cut table.

SRT outputs are re-split from the raw ``output``: by default with ``first`` (the first piece after the
first tag run, robust to decoding loops); against published scores with ``release`` (the release's
scorer takes the text after the last ``|>``), so that a malformed output is scored as it was there.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mcat_ds.eval.checks import output_languages
from mcat_ds.files import write_atomically
from mcat_ds.languages import LANGUAGES
from mcat_ds.optional import MissingDependency, require
from mcat_ds.prompts import SRTSplitRule, split_srt

DIRECTION_COLUMNS = ("iso3", "n", "spbleu", "chrf", "comet", "wer", "cer", "off_target", "language_checked")
LANGUAGE_ORDER = {language.code: position for position, language in enumerate(LANGUAGES)}


class EvaluationError(ValueError):
    pass


@dataclass
class Hypothesis:
    id: str
    src: str
    tgt: str | None
    hyp: str
    ref: str | None
    src_ref: str | None
    hyp_transcript: str | None
    output: str | None = None
    """The raw model output (SRT: transcript, tags and translation), re-split by the chosen rule."""

    @property
    def direction(self) -> str:
        return self.src if self.tgt is None else f"{self.src}_{self.tgt}"

    def cache_key(self) -> str:
        text = "\x1f".join(str(part) for part in (self.id, self.hyp, self.ref, self.src_ref))
        return hashlib.sha1(text.encode("utf-8")).hexdigest()


_OPTIONAL_TEXT_FIELDS = ("tgt", "hyp", "ref", "src_ref", "hyp_transcript", "output")


def read_hypotheses(path: str | Path) -> list[Hypothesis]:
    """The JSONL of ``mcat translate``; a damaged line names its file and line number."""
    path = Path(path)
    hypotheses = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record["src"], str):
                    raise TypeError("src: expected text")
                wrong = [name for name in _OPTIONAL_TEXT_FIELDS if not isinstance(record.get(name), (str, type(None)))]
                if wrong:
                    raise TypeError(f"{', '.join(wrong)}: expected text or null")
                hypotheses.append(Hypothesis(
                    id=str(record["id"]), src=record["src"], tgt=record.get("tgt"), hyp=record["hyp"] or "",
                    ref=record.get("ref"), src_ref=record.get("src_ref"), hyp_transcript=record.get("hyp_transcript"),
                    output=record.get("output") if "hyp_transcript" in record else None,
                ))
            # ValueError covers bad UTF-8 and bad JSON (both subclass it)
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise EvaluationError(f"{path}:{number}: not a translate output line ({error!r})") from None
    if not hypotheses:
        raise EvaluationError(f"{path} holds no hypotheses")
    return hypotheses


# ---------------------------------------------------------------- metrics


class SpBLEU:
    """sacrebleu BLEU over SentencePiece pieces, as ``tokenize="flores200"`` computes it."""

    def __init__(self, model_file: str | Path):
        import sentencepiece

        if not Path(model_file).is_file():
            raise EvaluationError(f"--spm {model_file}: no such SentencePiece model file")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def pieces(self, text: str) -> str:
        return " ".join(self.processor.encode(text, out_type=str))

    def corpus(self, hyps: Sequence[str], refs: Sequence[str]) -> float:
        import sacrebleu

        return sacrebleu.corpus_bleu([self.pieces(h) for h in hyps], [[self.pieces(r) for r in refs]],
                                     tokenize="none").score


def chrf_plus_plus(hyps: Sequence[str], refs: Sequence[str]) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2).corpus_score(list(hyps), [list(refs)]).score


def sentence_chrf(hyp: str, ref: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF(word_order=2).sentence_score(hyp, [ref]).score


def error_rates(hyps: Sequence[str], refs: Sequence[str]) -> tuple[float, float]:
    """(WER, CER) in percent over the corpus (jiwer)."""
    jiwer = require("jiwer")
    pairs = [(h, r) for h, r in zip(hyps, refs) if r and r.strip()]
    if not pairs:
        return math.nan, math.nan
    hyp_list, ref_list = [h for h, _ in pairs], [r for _, r in pairs]
    return 100 * jiwer.wer(ref_list, hyp_list), 100 * jiwer.cer(ref_list, hyp_list)


def _comet_checkpoint_file(model_path: str | Path) -> Path:
    path = Path(model_path)
    if path.is_dir():
        path = path / "checkpoints" / "model.ckpt"
    if not path.is_file():
        raise EvaluationError(f"--comet-model {model_path}: expected a COMET folder with checkpoints/model.ckpt")
    return path


def comet_model_fingerprint(model_path: str | Path) -> str:
    """Which COMET model scored, so that cached sentence scores are reused only for the same model:
    the resolved path, size and modification time (ns) of ``model.ckpt`` and of the
    ``hparams.yaml`` COMET reads two folders above it.

    File metadata rather than content: hashing a 2 GB checkpoint would cost more than scoring a
    small test set. Another model, the same model copied elsewhere, or a checkpoint rewritten in
    place all get a new fingerprint (a copy is scored again: the safe side). Paths are resolved
    after hparams.yaml is found, since in a Hugging Face cache the files are links into blobs/."""
    checkpoint = _comet_checkpoint_file(model_path)
    parts = []
    for file in (checkpoint, checkpoint.parent.parent / "hparams.yaml"):
        if file.is_file():
            stat = file.stat()
            parts += [str(file.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def comet_scores(model_path: str | Path, triples: list[tuple[str, str, str]], batch_size: int = 64) -> list[float]:
    """Segment scores (0-1) of (src, mt, ref) triples with a local COMET checkpoint."""
    load_from_checkpoint = require("comet").load_from_checkpoint
    import torch

    model = load_from_checkpoint(str(_comet_checkpoint_file(model_path)), local_files_only=True)
    samples = [{"src": s, "mt": m, "ref": r} for s, m, r in triples]
    output = model.predict(samples, batch_size=batch_size, gpus=1 if torch.cuda.is_available() else 0,
                           progress_bar=False)
    return [float(score) for score in output.scores]


# ---------------------------------------------------------------- the run


@dataclass
class DirectionScores:
    iso3: str
    n: int
    spbleu: float | None = None
    chrf: float | None = None
    comet: float | None = None
    wer: float | None = None
    cer: float | None = None
    off_target: float | None = None
    """Percent of the outputs judged (``language_checked``) that are in another language."""
    language_checked: int = 0
    extra: dict = field(default_factory=dict)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _is_cached_score(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _load_sentence_cache(path: Path) -> dict[str, dict]:
    """The sentence scores of an earlier run. Only a cache: a damaged line (cut by a killed run,
    bytes flipped, not UTF-8) is skipped with a warning, and its scores are computed again."""
    if not path.is_file():
        return {}
    cache, damaged = {}, []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                    and isinstance(record.get("comet_model"), (str, type(None)))
                    and _is_cached_score(record.get("comet")) and _is_cached_score(record.get("chrf"))):
                raise ValueError("not a sentence record")
        except ValueError:  # bad UTF-8 and bad JSON included
            damaged.append(number)
            continue
        cache[record["key"]] = record
    if damaged:
        shown = ", ".join(str(number) for number in damaged[:10]) + (", ..." if len(damaged) > 10 else "")
        warnings.warn(f"{path}: skipped {len(damaged)} damaged line(s) (line {shown}); "
                      "their scores are computed again", stacklevel=2)
    return cache


@dataclass(frozen=True)
class SplitComparison:
    """How the two SRT split rules differ on one output file."""

    rule: str
    """The rule the scores use."""
    srt_outputs: int
    translations_differ: int
    """Outputs whose translation (what spBLEU and COMET score) differs between the rules."""
    transcripts_differ: int
    examples: tuple[str, ...] = ()


def apply_srt_split(hypotheses: list[Hypothesis], rule: SRTSplitRule) -> SplitComparison:
    """Re-split every SRT hypothesis' raw output by ``rule`` (in place) and count where the ``first``
    and ``release`` rules disagree."""
    srt = [h for h in hypotheses if h.output is not None and h.tgt is not None]
    translations = transcripts = 0
    examples = []
    for h in srt:
        ours, theirs = split_srt(h.output, h.src, h.tgt, "first"), split_srt(h.output, h.src, h.tgt, "release")
        translations += ours.translation != theirs.translation
        transcripts += ours.transcript != theirs.transcript
        if ours.translation != theirs.translation and len(examples) < 5:
            examples.append(h.id)
        chosen = theirs if rule == "release" else ours
        h.hyp, h.hyp_transcript = chosen.translation, chosen.transcript
    return SplitComparison(rule, len(srt), translations, transcripts, tuple(examples))


def evaluate(hyps_path: str | Path, out_dir: str | Path, comet_model: str | None = None, spm: str | None = None,
             compare: str | None = None, comet_batch: int = 64, srt_split: SRTSplitRule | None = None
             ) -> list[DirectionScores]:
    """Score ``hyps_path`` into ``out_dir``. SRT outputs are split by ``srt_split``: ``first`` (ours) by
    default, ``release`` (the release scorer's rule) when comparing against published scores."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hypotheses = read_hypotheses(hyps_path)
    split = apply_srt_split(hypotheses, srt_split or ("release" if compare else "first"))
    spbleu = SpBLEU(spm) if spm else None
    sentences_path = out / "sentences.jsonl"
    # with a model, only its own scores are reused; without one, a later run (adding spBLEU, say)
    # keeps the scores of the model that gave them
    comet_fingerprint = comet_model_fingerprint(comet_model) if comet_model else None
    cache = _load_sentence_cache(sentences_path)
    sentences = {}
    for h in hypotheses:
        record = {"key": h.cache_key(), "id": h.id, "direction": h.direction}
        cached = cache.get(h.cache_key(), {})
        if cached.get("comet") is not None and comet_fingerprint in (None, cached.get("comet_model")):
            record.update(comet=cached["comet"], comet_model=cached.get("comet_model"))
        sentences[h.cache_key()] = record

    translated = [h for h in hypotheses if h.tgt is not None and h.ref is not None]
    if comet_model and translated:
        missing = [h for h in translated if "comet" not in sentences[h.cache_key()]]
        if missing:
            scores = comet_scores(comet_model, [(h.src_ref or "", h.hyp, h.ref) for h in missing], comet_batch)
            for h, score in zip(missing, scores):
                sentences[h.cache_key()].update(comet=score, comet_model=comet_fingerprint)
    for h in translated:
        sentences[h.cache_key()]["chrf"] = sentence_chrf(h.hyp, h.ref)

    by_direction: dict[str, list[Hypothesis]] = defaultdict(list)
    for h in hypotheses:
        by_direction[h.direction].append(h)
    languages = sorted({code for h in hypotheses for code in (h.src, h.tgt) if code})
    try:
        verdicts = dict(zip((id(h) for h in hypotheses), output_languages(
            [h.hyp for h in hypotheses], [h.tgt or h.src for h in hypotheses], languages)))
    except MissingDependency as missing:  # the other scores do not need it
        warnings.warn(f"no off-target rates: {missing}", stacklevel=2)
        verdicts = {id(h): "unchecked" for h in hypotheses}
    results = []
    for direction, group in sorted(by_direction.items(), key=lambda item: _direction_sort_key(item[0])):
        scores = DirectionScores(direction, len(group))
        with_ref = [h for h in group if h.tgt is not None and h.ref is not None]
        if with_ref:
            hyps, refs = [h.hyp for h in with_ref], [h.ref for h in with_ref]
            scores.chrf = chrf_plus_plus(hyps, refs)
            if spbleu:
                scores.spbleu = spbleu.corpus(hyps, refs)
            comet = [sentences[h.cache_key()].get("comet") for h in with_ref]
            if all(c is not None for c in comet):
                scores.comet = 100 * sum(comet) / len(comet)
        transcripts = [(h.hyp if h.tgt is None else h.hyp_transcript, h.src_ref) for h in group]
        transcripts = [(t, r) for t, r in transcripts if t is not None and r]
        if transcripts:
            scores.wer, scores.cer = error_rates([t for t, _ in transcripts], [r for _, r in transcripts])
        judged = [verdicts[id(h)] for h in group if verdicts[id(h)] != "unchecked"]
        scores.language_checked = len(judged)
        if judged:
            scores.off_target = 100 * judged.count("off_target") / len(judged)
        results.append(scores)

    write_atomically(sentences_path, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                                             for record in sentences.values()))
    write_directions_csv(out / "directions.csv", results)
    write_release_table(out / "release_table.csv", results)
    write_atomically(out / "srt_split.json", json.dumps(dataclasses.asdict(split), indent=1) + "\n")
    published = read_published(compare) if compare else None
    if published is not None:
        write_comparison(out / "compare.csv", results, published)
    write_atomically(out / "summary.md", summary_markdown(results, published, split))
    metric = next((m for m in ("comet", "spbleu", "chrf") if any(getattr(r, m) is not None for r in results)), None)
    if metric:
        draw_heatmap(results, metric, out / "heatmap.png")
    return results


def _direction_sort_key(direction: str):
    return tuple(LANGUAGE_ORDER.get(code, len(LANGUAGE_ORDER)) for code in direction.split("_"))


def _format(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def write_directions_csv(path: Path, results: list[DirectionScores]) -> None:
    rows = [DIRECTION_COLUMNS]
    rows += [[r.iso3, r.n, _format(r.spbleu), _format(r.chrf), _format(r.comet), _format(r.wer), _format(r.cer),
              _format(r.off_target), r.language_checked] for r in results]
    write_atomically(path, _csv_text(rows))


def write_release_table(path: Path, results: list[DirectionScores]) -> None:
    """The published CSV's layout (``idx,iso3,spbleu,comet``, directions in alphabetical order, two
    decimals), so ours and the release's tables line up row for row."""
    pairs = sorted((r for r in results if "_" in r.iso3), key=lambda r: r.iso3)
    rows = [("idx", "iso3", "spbleu", "comet")]
    rows += [[idx, r.iso3, _format(r.spbleu), _format(r.comet)] for idx, r in enumerate(pairs, start=1)]
    write_atomically(path, _csv_text(rows))


def read_published(path: str | Path) -> dict[str, dict[str, float]]:
    """A per-direction CSV with an ``iso3`` column (``src_tgt``) and any of spbleu/chrf/comet."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise EvaluationError(f"{path}: not UTF-8 text ({error})") from None
    table = {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "iso3" not in reader.fieldnames:
        raise EvaluationError(f"{path}: needs an iso3 column (src_tgt), found {reader.fieldnames}")
    for number, row in enumerate(reader, start=2):
        values = {}
        for metric in ("spbleu", "chrf", "comet"):
            if row.get(metric):
                try:
                    values[metric] = float(row[metric])
                except ValueError:
                    raise EvaluationError(f"{path}:{number}: {metric} {row[metric]!r} is not a number") from None
        table[row["iso3"]] = values
    return table


def write_comparison(path: Path, results: list[DirectionScores], published: dict[str, dict[str, float]]) -> None:
    rows = [["iso3", "n"] + [f"{kind}_{m}" for m in ("spbleu", "comet") for kind in ("ours", "published", "diff")]]
    for r in results:
        if r.iso3 not in published:
            continue
        row = [r.iso3, r.n]
        for metric in ("spbleu", "comet"):
            ours, theirs = getattr(r, metric), published[r.iso3].get(metric)
            diff = None if ours is None or theirs is None else ours - theirs
            row += [_format(ours), _format(theirs), _format(diff)]
        rows.append(row)
    write_atomically(path, _csv_text(rows))


def _group_averages(results: list[DirectionScores], metrics: Sequence[str]) -> dict[str, dict[str, float | None]]:
    groups = {"X->eng": [], "eng->X": [], "X->Y (no eng)": [], "all directions": []}
    for r in results:
        if "_" not in r.iso3:
            continue
        src, tgt = r.iso3.split("_")
        groups["all directions"].append(r)
        groups["X->eng" if tgt == "eng" else "eng->X" if src == "eng" else "X->Y (no eng)"].append(r)
    return {name: {"directions": len(group), **{m: _mean(getattr(r, m) for r in group) for m in metrics}}
            for name, group in groups.items()}


def summary_markdown(results: list[DirectionScores], published: dict[str, dict[str, float]] | None = None,
                     split: SplitComparison | None = None) -> str:
    metrics = [m for m in ("spbleu", "chrf", "comet") if any(getattr(r, m) is not None for r in results)]
    lines = ["# Evaluation summary", ""]
    if split is not None and split.srt_outputs:
        lines += [f"SRT outputs split by the `{split.rule}` rule. The two rules (`first`: the first piece after the "
                  "first tag run; `release`: the text after the last `|>`, as the release's scorer) give a different "
                  f"translation for {split.translations_differ} of {split.srt_outputs} outputs and a different "
                  f"transcript for {split.transcripts_differ}.", ""]
    pairs = [r for r in results if "_" in r.iso3]
    if pairs and metrics:
        languages = sorted({code for r in pairs for code in r.iso3.split("_")}, key=lambda c: LANGUAGE_ORDER.get(c, 999))
        lines += [f"{len(pairs)} directions over {len(languages)} languages.", "",
                  "## Averages by direction group (paper Table VI)", "",
                  "| group | directions | " + " | ".join(metrics) + " |", "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"]
        for name, values in _group_averages(results, metrics).items():
            if values["directions"]:
                lines.append(f"| {name} | {values['directions']} | " + " | ".join(_format(values[m]) for m in metrics) + " |")
        lines += ["", "## Per language, as source and as target (paper Table VIII)", "",
                  "| language | " + " | ".join(f"{m} as source" for m in metrics) + " | "
                  + " | ".join(f"{m} as target" for m in metrics) + " |",
                  "| --- | " + " | ".join("---:" for _ in range(2 * len(metrics))) + " |"]
        for code in languages:
            outgoing = [r for r in pairs if r.iso3.split("_")[0] == code]
            incoming = [r for r in pairs if r.iso3.split("_")[1] == code]
            lines.append(f"| {code} | " + " | ".join(_format(_mean(getattr(r, m) for r in outgoing)) for m in metrics)
                         + " | " + " | ".join(_format(_mean(getattr(r, m) for r in incoming)) for m in metrics) + " |")
    asr = [r for r in results if r.wer is not None and not math.isnan(r.wer)]
    if asr:
        lines += ["", "## Transcripts", "", "| direction | n | WER | CER |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r.iso3} | {r.n} | {_format(r.wer)} | {_format(r.cer)} |" for r in asr]
    lines += _output_language_lines(results)
    if published is not None:
        matched = [r for r in pairs if r.iso3 in published]
        lines += ["", "## Against the published scores", "",
                  f"{len(matched)} of our {len(pairs)} directions are in the published table "
                  f"({len(published)} directions); per direction in compare.csv.", "",
                  "| metric | directions | ours | published | difference |", "| --- | ---: | ---: | ---: | ---: |"]
        for metric in ("spbleu", "comet"):
            both = [(getattr(r, metric), published[r.iso3][metric]) for r in matched
                    if getattr(r, metric) is not None and metric in published[r.iso3]]
            if both:
                ours, theirs = _mean(a for a, _ in both), _mean(b for _, b in both)
                lines.append(f"| {metric} | {len(both)} | {_format(ours)} | {_format(theirs)} | {_format(ours - theirs)} |")
    return "\n".join(lines) + "\n"


OFF_TARGET_SHOWN = 20
"""summary.md lists this many directions with the most off-target outputs (all are in directions.csv)."""


def _output_language_lines(results: list[DirectionScores]) -> list[str]:
    checked = sum(r.language_checked for r in results)
    if not checked:
        return ["", "## Output language", "", "No output could be judged (languages lingua does not know, or "
                "outputs too short)."]
    wrong = sum(round(r.off_target * r.language_checked / 100) for r in results if r.off_target is not None)
    total = sum(r.n for r in results)
    lines = ["", "## Output language", "",
             f"{wrong} of {checked} outputs judged are in another language than the one asked for "
             f"({_format(100 * wrong / checked)}%); {total - checked} of {total} outputs were not judged (a language "
             "lingua does not know, a text under 8 letters, or too close a call)."]
    worst = sorted((r for r in results if r.off_target), key=lambda r: (-r.off_target, _direction_sort_key(r.iso3)))
    if worst:
        lines += ["", "| direction | off-target % | judged |", "| --- | ---: | ---: |"]
        lines += [f"| {r.iso3} | {_format(r.off_target)} | {r.language_checked} |" for r in worst[:OFF_TARGET_SHOWN]]
        if len(worst) > OFF_TARGET_SHOWN:
            lines.append(f"\n{len(worst) - OFF_TARGET_SHOWN} more directions have off-target outputs: see directions.csv.")
    return lines


def draw_heatmap(results: list[DirectionScores], metric: str, path: Path) -> None:
    """Source x target matrix (Figure 5 style); values written in the cells up to 20 languages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = {tuple(r.iso3.split("_")): getattr(r, metric) for r in results if "_" in r.iso3}
    if not pairs:
        return
    languages = sorted({code for pair in pairs for code in pair}, key=lambda c: LANGUAGE_ORDER.get(c, 999))
    index = {code: i for i, code in enumerate(languages)}
    matrix = np.full((len(languages), len(languages)), np.nan)
    for (src, tgt), value in pairs.items():
        if value is not None:
            matrix[index[src], index[tgt]] = value
    size = max(5.0, 0.2 * len(languages) + 2)
    figure, axis = plt.subplots(figsize=(size + 1.2, size))
    image = axis.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="equal")
    font = 8 if len(languages) <= 20 else 5
    axis.set_xticks(range(len(languages)), languages, rotation=90, fontsize=font)
    axis.set_yticks(range(len(languages)), languages, fontsize=font)
    axis.set_xlabel("target language")
    axis.set_ylabel("source language")
    axis.set_title(f"{metric} per direction ({len(pairs)} directions)")
    if len(languages) <= 20:
        for (src, tgt), value in pairs.items():
            if value is not None:
                axis.text(index[tgt], index[src], f"{value:.1f}", ha="center", va="center", fontsize=6, color="white")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label=metric)
    figure.tight_layout()
    image_bytes = io.BytesIO()
    figure.savefig(image_bytes, format="png", dpi=150)
    plt.close(figure)
    write_atomically(path, image_bytes.getvalue())


def run_evaluate_command(hyps: str | Path, out: str | Path, *, comet_model: str | None = None, spm: str | None = None,
                         compare: str | None = None, comet_batch: int = 64,
                         srt_split: SRTSplitRule | None = None) -> int:
    """``mcat evaluate``: score, then say what was computed and where it went. Returns the exit code."""
    results = evaluate(hyps, out, comet_model=comet_model, spm=spm, compare=compare, comet_batch=comet_batch,
                       srt_split=srt_split)
    split = json.loads((Path(out) / "srt_split.json").read_text(encoding="utf-8"))
    if split["srt_outputs"]:
        print(f"mcat evaluate: SRT outputs split by the {split['rule']} rule; the first and release rules give "
              f"different translations for {split['translations_differ']} of {split['srt_outputs']}")
    computed = [m for m in ("spbleu", "chrf", "comet", "wer") if any(getattr(r, m) is not None for r in results)]
    print(f"mcat evaluate: {len(results)} directions ({', '.join(computed)}) -> {out}/directions.csv, summary.md"
          + (", heatmap.png" if any(m != "wer" for m in computed) else ""))
    if not spm:
        print("mcat evaluate: no --spm given, so no spBLEU (pass the FLORES-200 SentencePiece model file)")
    return 0
