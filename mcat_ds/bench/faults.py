"""Kill campaigns: every command of the pipeline is SIGKILLed at seeded random moments and run again
until it completes; what it leaves must equal what an uninterrupted run leaves.

A kill takes the command's whole process group (DeepSpeed's launcher and ranks, prepare's workers),
as a node failure or the OOM killer would, with no chance to save or clean up. A kill "lands" only if
the command was still running; one drawn later than the command took is counted as attempted, not
landed. When a run completes before all the kills have landed, the campaign compares it and starts
over in a new folder (a new "round"), so that the planned number always lands.

Equal means: training, the same losses (``==``) for each step exactly once and the same final
weights; translate, the same output file byte for byte; prepare, the same index, check and report,
and shards with the same members holding the same bytes (tar headers carry the time they were
written); evaluate, the same directions.csv and summary.md byte for byte.

Rows in benchmarks/faults.csv: device, date, commit, command, seed, kills attempted and landed,
restarts, runs recovered, whether every recovered run was identical, seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CSV_COLUMNS = ("device", "date", "commit", "command", "seed", "kills_attempted", "kills_landed", "restarts",
               "runs_recovered", "identical", "seconds")
COMMANDS = ("training", "translate", "prepare", "evaluate")
FLEURS_LANGUAGES = ("eng", "deu", "fra", "cmn")
"""Four languages of the demo sentences: the stage asr-l2 trains on two of them, and German, French
and Chinese references are not ASCII (translate's part files hold multi-byte characters)."""


class CampaignError(RuntimeError):
    """A command failed in a way no kill explains: it exited non-zero on its own."""


@dataclass(frozen=True)
class Target:
    """A command under test: how it runs into a folder, when a run has finished, and how what it left
    in one folder compares with another's."""

    name: str
    command: Callable[[Path], list[str]]
    """The argv writing into the given folder (called for every start: a launcher needs a free port)."""
    compare: Callable[[Path, Path], list[str]]
    """(got, reference) -> the differences, in words; none when equal."""
    finished: Callable[[int, str], bool] = lambda code, log: code == 0
    """(exit status, the run's output) -> whether the run completed."""
    volatile: tuple[str, ...] = ()
    """Names of files that differ between runs by design (timings, event files named by time and pid)."""


@dataclass
class CampaignResult:
    command: str
    seed: int
    kills_attempted: int = 0
    kills_landed: int = 0
    restarts: int = 0
    runs_recovered: int = 0
    """Runs killed at least once and then completed (each one compared)."""
    reference_seconds: float = 0.0
    seconds: float = 0.0
    kill_moments: list[float] = field(default_factory=list)
    """Seconds after its start at which each landed kill hit its run."""
    differences: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    """Files a recovered run holds and an uninterrupted one does not: litter, not loss."""

    @property
    def identical(self) -> bool:
        return self.runs_recovered > 0 and not self.differences

    def describe(self) -> str:
        return (f"{self.command}: {self.kills_landed} of {self.kills_attempted} kills landed, {self.restarts} restarts, "
                f"{self.runs_recovered} runs recovered, {'identical' if self.identical else 'DIFFERENT'} "
                f"({self.seconds:.0f} s; uninterrupted {self.reference_seconds:.1f} s); killed at "
                f"{', '.join(f'{moment:g}' for moment in self.kill_moments)} s after a start"
                + "".join(f"\n    differs: {d}" for d in self.differences)
                + "".join(f"\n    left over: {name}" for name in self.leftovers))


def subprocess_environment(device: str = "cpu") -> dict[str, str]:
    """The environment of every command: one thread per process (on a shared CPU, PyTorch's spinning
    thread pools made a tiny model's decoding 15 times slower, which moves every kill moment), and
    for ``cpu`` DeepSpeed's CPU accelerator with no GPU visible."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if device == "cpu":
        environment.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return environment


def _group_alive(group: int) -> bool:
    """Whether any process of ``group`` still runs (zombies awaiting a parent do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 30
    while _group_alive(process.pid) and time.monotonic() < deadline:  # ranks and workers die a moment later
        time.sleep(0.05)


def _tail(path: Path, characters: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-characters:]


class _Starts:
    """Starts of a target's command, each with its own log file."""

    def __init__(self, target: Target, logs: Path, environment: Mapping[str, str]):
        self.target, self.logs, self.environment, self.count = target, logs, environment, 0
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, folder: Path) -> tuple[subprocess.Popen, Path, float]:
        self.count += 1
        log = self.logs / f"start-{self.count:04d}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(self.target.command(folder), stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True, env=dict(self.environment))
        return process, log, time.monotonic()


def run_uninterrupted(target: Target, folder: Path, environment: Mapping[str, str], timeout: float = 900) -> float:
    """Run ``target`` into ``folder`` once, untouched; its seconds. CampaignError if it does not finish."""
    process, log, started = _Starts(target, folder.parent / f"{folder.name}.logs", environment).start(folder)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise CampaignError(f"{target.name}: still running after {timeout:.0f} s; see {log}") from None
    seconds = time.monotonic() - started
    if not target.finished(code, _tail(log)):
        raise CampaignError(f"{target.name}: exit status {code} on an uninterrupted run:\n{_tail(log)}")
    return seconds


def kill_window(reference_seconds: float) -> tuple[float, float]:
    """Kill moments are drawn from here: from just after the start (imports, the launcher) to four
    fifths of an uninterrupted run. A resumed run has less left to do than a fresh one: a later
    moment would mostly find it finished, and each such miss costs a whole new run."""
    return 0.05 * reference_seconds, 0.8 * reference_seconds


def kill_campaign(target: Target, work: Path, reference: Path, reference_seconds: float, kills: int, seed: int,
                  environment: Mapping[str, str], timeout: float = 900, max_rounds: int = 20) -> CampaignResult:
    """SIGKILL ``target``'s runs (in ``work``/round-N) at moments drawn from ``kill_window`` until
    ``kills`` kills have landed, restarting after each, and compare every completed run with
    ``reference`` (an uninterrupted run that took ``reference_seconds``).

    A run of a new round that completes before its kill took less than the reference run (on a
    shared machine the reference may have run under more load): the window shrinks to it, so that
    the kills that follow land rather than start round after round.

    A run that fails on its own raises CampaignError with its log: that is a bug, not a lost race."""
    rng = random.Random(f"{seed}-{target.name}")
    full_run = reference_seconds
    result = CampaignResult(target.name, seed, reference_seconds=reference_seconds)
    starts = _Starts(target, work / "logs", environment)
    began = time.monotonic()
    for number in range(max_rounds):
        folder = work / f"round-{number}"
        killed = 0
        while True:
            process, log, started = starts.start(folder)
            waited = 0.0
            if result.kills_landed < kills:
                waited = rng.uniform(*kill_window(full_run))
                result.kills_attempted += 1
                try:
                    process.wait(timeout=waited)
                except subprocess.TimeoutExpired:
                    _kill_group(process)
                    # else it exited on its own just as the kill came: it was not running any more
                    if process.returncode == -signal.SIGKILL:
                        result.kills_landed += 1
                        result.kill_moments.append(round(waited, 2))
                        result.restarts += 1
                        killed += 1
                        continue
            try:
                code = process.wait(timeout=max(1.0, timeout - waited))
            except subprocess.TimeoutExpired:
                _kill_group(process)
                raise CampaignError(f"{target.name}: still running after {timeout:.0f} s; see {log}") from None
            if not target.finished(code, _tail(log)):
                raise CampaignError(f"{target.name}: exit status {code} after {killed} kills in {folder}, "
                                    f"with none pending (log {log}):\n{_tail(log)}")
            if not killed:
                full_run = min(full_run, time.monotonic() - started)
            break
        result.runs_recovered += killed > 0
        result.differences += [f"{folder.name}: {difference}" for difference in target.compare(folder, reference)]
        result.leftovers += [f"{folder.name}/{name}" for name in extra_files(folder, reference, target.volatile)]
        if result.kills_landed >= kills:
            break
    result.seconds = time.monotonic() - began
    return result


def extra_files(got: Path, reference: Path, volatile: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of files under ``got`` that ``reference`` lacks (volatile names aside)."""

    def names(root: Path) -> set[str]:
        return {str(path.relative_to(root)) for path in root.rglob("*")
                if path.is_file() and not any(part in volatile for part in path.relative_to(root).parts)}

    return sorted(names(got) - names(reference))


def _same_bytes(got: Path, reference: Path, names: tuple[str, ...]) -> list[str]:
    differences = []
    for name in names:
        if not (got / name).is_file():
            differences.append(f"{name} is missing")
        elif (got / name).read_bytes() != (reference / name).read_bytes():
            differences.append(f"{name} differs from the uninterrupted run's")
    return differences


# ------------------------------------------------------------------------------------------------ targets


def training_target(data: Path, stage: str = "asr-l2", steps: int = 12, save_every: int = 1, ranks: int = 2,
                    overrides: tuple[str, ...] = ()) -> Target:
    """A tiny-preset DeepSpeed stage on ``ranks`` processes that saves every ``save_every`` steps."""
    from mcat_ds.rendezvous import free_port

    def command(folder: Path) -> list[str]:
        settings = [item for override in ("stage.eval_every=0", *overrides) for item in ("--set", override)]
        return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks),
                "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
                "--stage", stage, "--preset", "tiny", "--run-dir", str(folder), "--data", str(data),
                "--max-steps", str(steps), "--save-every", str(save_every), *settings]

    def compare(got: Path, reference: Path) -> list[str]:
        return compare_training(got / stage, reference / stage)

    return Target("training", command, compare, volatile=("tensorboard",))


def compare_training(got: Path, reference: Path) -> list[str]:
    """A stage folder against an uninterrupted one's: each step once, the same losses, the same weights."""
    from safetensors.torch import load_file

    if not (got / "final").is_dir():
        return ["no final checkpoint"]
    expected, metrics = (read_jsonl(folder / "metrics.jsonl") for folder in (reference, got))
    differences = []
    steps = [record["step"] for record in metrics]
    if steps != [record["step"] for record in expected]:
        differences.append(f"metrics.jsonl steps {steps}")
    for record, wanted in zip(metrics, expected):
        if record["loss"] != wanted["loss"]:
            differences.append(f"step {record['step']}: loss {record['loss']!r}, uninterrupted {wanted['loss']!r}")
    for name in ("adapter.safetensors", "lora/adapter_model.safetensors"):
        weights, wanted = (load_file(str(folder / "final" / name)) for folder in (got, reference))
        if weights.keys() != wanted.keys() or any(not weights[key].equal(wanted[key]) for key in wanted):
            differences.append(f"final/{name} holds other weights")
    return differences


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


TRANSLATE_OUT = "hyps.jsonl"


def translate_target(checkpoint: Path, data: Path, task: str = "srt", batch: int = 2, max_new_tokens: int = 12) -> Target:
    """``mcat translate`` with the fast engine in small batches (many small writes to its part file)."""

    def command(folder: Path) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "mcat_ds.cli", "translate", "--checkpoint", str(checkpoint), "--data", str(data),
                "--out", str(folder / TRANSLATE_OUT), "--task", task, "--batch", str(batch),
                "--max-new-tokens", str(max_new_tokens), "--engine", "fast"]

    def compare(got: Path, reference: Path) -> list[str]:
        parts = sorted(path.name for path in got.glob(f"{TRANSLATE_OUT}.part*"))
        return _same_bytes(got, reference, (TRANSLATE_OUT,)) + [f"{name} was not merged" for name in parts]

    return Target("translate", command, compare, volatile=(f"{TRANSLATE_OUT}.summary.json",))


PREPARED = "shards"


def prepare_target(fleurs: Path, workers: int = 2, shard_samples: int = 10) -> Target:
    """``mcat prepare`` of a FLEURS-style folder with worker processes, into several shards."""

    def command(folder: Path) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "mcat_ds.cli", "prepare", "--fleurs", str(fleurs), "--out", str(folder / PREPARED),
                "--workers", str(workers), "--shard-samples", str(shard_samples)]

    def finished(code: int, log: str) -> bool:
        # a kill after the rename into place: the rerun finds the folder complete and refuses to mix
        return code == 0 or (code == 2 and "already holds prepared shards" in log)

    def compare(got: Path, reference: Path) -> list[str]:
        return compare_prepared(got / PREPARED, reference / PREPARED)

    return Target("prepare", command, compare, finished)


def compare_prepared(got: Path, reference: Path) -> list[str]:
    """Index, its check and the report byte for byte; every shard's members (name, bytes) in order."""
    if not got.is_dir():
        return [f"{got.name} is missing"]
    differences = _same_bytes(got, reference, ("index.jsonl", "index.check.json", "report.json"))
    shards = sorted(path.name for path in reference.glob("*.tar"))
    if sorted(path.name for path in got.glob("*.tar")) != shards:
        differences.append(f"shards {sorted(path.name for path in got.glob('*.tar'))}, uninterrupted {shards}")
    for name in shards:
        if (got / name).is_file() and tar_members(got / name) != tar_members(reference / name):
            differences.append(f"{name} holds other members")
    partials = sorted(path.name for path in got.parent.glob(f"{got.name}.partial-*"))
    return differences + [f"{name} was left beside it" for name in partials]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive.getmembers() if member.isfile()]


EVALUATION = "eval"


def evaluate_target(hyps: Path, comet_model: Path | None = None) -> Target:
    """``mcat evaluate`` of a translate JSONL (chrF++, WER, and COMET when a model is given)."""

    def command(folder: Path) -> list[str]:
        comet = ["--comet-model", str(comet_model)] if comet_model else []
        return [sys.executable, "-m", "mcat_ds.cli", "evaluate", "--hyps", str(hyps), "--out", str(folder / EVALUATION),
                *comet]

    def compare(got: Path, reference: Path) -> list[str]:
        return _same_bytes(got / EVALUATION, reference / EVALUATION, ("directions.csv", "summary.md"))

    return Target("evaluate", command, compare)


# ------------------------------------------------------------------------------------------------ inputs


def write_parallel_fleurs(root: Path, sentences: int, split: str = "train", seed: int = 0) -> Path:
    """A FLEURS-style folder in which every language speaks the same demo sentences (noise audio of
    0.5-2 s at 16 kHz): the references of German, French and Chinese targets are not ASCII."""
    import numpy as np

    from mcat_ds.data.demo import demo_sentences
    from mcat_ds.languages import get_language
    from mcat_ds.optional import require

    soundfile = require("soundfile")
    texts = demo_sentences()
    rng = np.random.default_rng(seed)
    for code in FLEURS_LANGUAGES:
        folder = root / get_language(code).fleurs
        (folder / "audio" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for number in range(sentences):
            name = f"{number}.wav"
            samples = 0.1 * rng.standard_normal(int((0.5 + 1.5 * rng.random()) * 16000))
            soundfile.write(folder / "audio" / split / name, samples.astype("float32"), 16000)
            text = texts[number % len(texts)].texts[code] + (f" ({number})" if number >= len(texts) else "")
            rows.append("\t".join([str(number), name, text, text, "x", "0", "MALE"]))
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_shards(fleurs: Path, out: Path) -> Path:
    """``fleurs`` prepared (in this process) into shards of six utterances."""
    from mcat_ds.data.prepare import ShardLimits, prepare_shards
    from mcat_ds.data.sources import read_fleurs

    prepare_shards(read_fleurs(fleurs, "train"), out, max_seconds=5.0, limits=ShardLimits(max_samples=6), workers=1)
    return out


def write_evaluation_hyps(path: Path, languages: tuple[str, ...] = FLEURS_LANGUAGES, sentences: int = 6) -> Path:
    """A translate JSONL of every direction among ``languages``: each hypothesis its reference less a
    word, so that the scores vary."""
    from mcat_ds.data.demo import demo_sentences

    records = []
    for number, sentence in enumerate(demo_sentences()[:sentences]):
        for src in languages:
            for tgt in languages:
                if src != tgt:
                    ref, transcript = sentence.texts[tgt], sentence.texts[src]
                    records.append({"id": f"{number}:{src}-{tgt}", "src": src, "tgt": tgt,
                                    "hyp": " ".join(ref.split()[:-1]) or ref[:-1], "ref": ref,
                                    "hyp_transcript": transcript[:-1], "src_ref": transcript})
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ benchmark


def append_rows(path: str | Path, results: list[CampaignResult]) -> None:
    from mcat_ds.bench.harness import append_stamped_rows

    append_stamped_rows(path, CSV_COLUMNS, [
        {"command": result.command, "seed": result.seed, "kills_attempted": result.kills_attempted,
         "kills_landed": result.kills_landed, "restarts": result.restarts, "runs_recovered": result.runs_recovered,
         "identical": "yes" if result.identical else "no", "seconds": f"{result.seconds:.1f}"}
        for result in results])


def _targets(commands: list[str], inputs: Path, sentences: int, comet_model: Path | None) -> dict[str, Target]:
    """The targets asked for, their inputs written under ``inputs`` as needed."""
    fleurs = write_parallel_fleurs(inputs / "fleurs", sentences)
    shards = write_shards(fleurs, inputs / "shards") if {"training", "translate"} & set(commands) else None
    from mcat_ds.tiny import write_random_checkpoint

    targets = {}
    for name in commands:
        if name == "training":
            targets[name] = training_target(shards)
        elif name == "translate":
            targets[name] = translate_target(write_random_checkpoint(inputs / "models"), shards)
        elif name == "prepare":
            targets[name] = prepare_target(fleurs)
        else:
            targets[name] = evaluate_target(write_evaluation_hyps(inputs / "hyps.jsonl"), comet_model)
    return targets


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    from mcat_ds.bench.harness import benchmark_parser, csv_target

    parser = benchmark_parser(description, "faults.csv")
    parser.add_argument("--kills", type=int, default=60, help="kills to land, split evenly over the commands")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments (default: %(default)s)")
    parser.add_argument("--commands", help="comma-separated, of: " + ", ".join(COMMANDS) + " (default: all; "
                                           "--smoke: all but training)")
    parser.add_argument("--sentences", type=int, default=6, help="sentences per language of the FLEURS-style input")
    parser.add_argument("--comet-model", type=Path, help="evaluate with this COMET model too (a tiny one will do)")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    if args.commands:
        commands = [name for name in args.commands.split(",") if name]
    else:  # training's runs take the longest: a smoke run leaves them to the test suite
        commands = [name for name in COMMANDS if not (args.smoke and name == "training")]
    unknown = sorted(set(commands) - set(COMMANDS))
    if unknown:
        parser.error(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    if args.smoke:  # about a minute: one kill per command, three sentences
        args.kills, args.sentences = len(commands), 3
    environment = subprocess_environment(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="mcat-faults-"))
    results = []
    try:
        targets = _targets(commands, work / "inputs", args.sentences, args.comet_model)
        for number, (name, target) in enumerate(targets.items()):
            kills = args.kills // len(targets) + (number < args.kills % len(targets))
            reference = work / name / "reference"
            seconds = run_uninterrupted(target, reference, environment)
            result = kill_campaign(target, work / name, reference, seconds, kills, args.seed, environment)
            print(result.describe(), flush=True)
            results.append(result)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    landed, attempted = sum(r.kills_landed for r in results), sum(r.kills_attempted for r in results)
    print(f"{landed} of {attempted} kills landed; {sum(r.runs_recovered for r in results)} runs recovered; "
          f"{'nothing lost' if all(r.identical for r in results) else 'SOMETHING DIFFERED'}")
    target_csv = csv_target(args, "faults.csv")
    if target_csv:
        append_rows(target_csv, results)
        print(f"appended {len(results)} rows to {target_csv}")
    return 0 if all(result.identical for result in results) else 1
