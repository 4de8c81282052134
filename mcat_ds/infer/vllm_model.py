"""MCAT as a native vLLM model: an ``mcat export`` folder served with audio in, text out.

``vllm.LLM(model=EXPORT)`` / ``vllm serve EXPORT`` build :class:`MCATForConditionalGeneration`
(registered by ``mcat_ds.infer.vllm_plugin``) from the export's root ``config.json``: the LLM's config
plus the speech side's facts (``mcat_ds.infer.export.NativeSpeechConfig``). Inside:

- the frozen Whisper encoder (transformers' module, as in training) and our speech adapter, as plain
  torch modules running ``mcat_ds.model.mcat.encode_speech``; the rows they give are scaled as the
  first decoder layer must see them (vLLM multiplies token embeddings by Gemma's normaliser but merges
  speech rows as given);
- vLLM's own Gemma2 / Gemma3 text model for the LLM (paged KV cache, its kernels).

Requests carry audio (16 kHz mono; vLLM resamples an ``(array, rate)`` pair) and a prompt: MCAT's
instruction (``mcat_ds.prompts.build_prompt``) tokenized with BOS, as ``tokenize_example`` does. The
processor computes the log-mel features with our own code (no HF processor) and inserts the
``num_speech_tokens`` speech positions at the very start of the prompt, so the sequence is training's
[speech rows ; BOS ; tags ...]. Audio longer than the encoder's window is refused with a message
(:class:`AudioTooLongError`): the model would hear its first window only, and a long recording
wants ``mcat translate-audio`` (segmentation at pauses, subtitles); ``mcat translate`` cuts
utterances to the window before they get here. vLLM caches an audio's encoder output by the
audio's content hash: one audio sent with several targets is encoded once while its requests are in
flight together.

``SupportsTranscription`` serves the audio endpoints with ISO 639-1 codes; ``language`` is required
(MCAT needs the source tag):

- ``/v1/audio/transcriptions``: ASR, the transcript;
- ``/v1/audio/translations`` with ``to_language`` (required: MCAT translates into any of its
  languages, not into English alone): SRT, and the endpoint answers the translation, the text after
  the tag pair, as ``mcat translate`` scores it (``split_srt_output``). Chat with an audio part
  answers the whole output.

This module imports vLLM at load: vLLM imports it when it builds the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import re
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.models.whisper.tokenization_whisper import LANGUAGES as WHISPER_LANGUAGES
from vllm.config import ModelConfig, SpeechToTextConfig, VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.config.speech_to_text import SpeechToTextParams
from vllm.inputs import MultiModalDataDict, PromptType, TokensPrompt
from vllm.model_executor.model_loader import DefaultModelLoader
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    StreamingTranscriptionPostProcessor,
    SupportsMultiModal,
    SupportsTranscription,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptIndexTargets,
    PromptInsertion,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors
from vllm.tokenizers import cached_tokenizer_from_config

from mcat_ds.config import AdapterConfig, from_dict
from mcat_ds.data.audio import SAMPLE_RATE, FeatureWindow, LogMelSpectrogram, feature_frames, pad_waveforms
from mcat_ds.infer.export import NativeSpeechConfig
from mcat_ds.languages import LANGUAGES, UnknownLanguageError
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.model.encoder import SpeechEncoder
from mcat_ds.model.mcat import encode_speech
from mcat_ds.prompts import build_prompt, split_srt_output

MCAT_BY_WHISPER_CODE: dict[str, str] = {
    language.whisper: language.code for language in LANGUAGES if language.whisper in WHISPER_LANGUAGES
}
"""ISO 639-1 (Whisper's codes, what the OpenAI audio API takes) -> our ISO 639-3 tag code. Kyrgyz
has no Whisper code and cannot be asked for by code."""


def encoder_window(speech: NativeSpeechConfig) -> FeatureWindow:
    """The encoder's fixed input window (mel frames = 2 x max_source_positions)."""
    return FeatureWindow(speech.encoder["num_mel_bins"], 2 * speech.encoder["max_source_positions"])


@lru_cache(maxsize=4)
def log_mel_for(window: FeatureWindow) -> LogMelSpectrogram:
    """One feature extractor per window: its mel filter bank is built once, not per request."""
    return LogMelSpectrogram(window)


def mcat_code(whisper_code: str, speech: NativeSpeechConfig, field: str) -> str:
    """A request's ISO 639-1 code -> the tag code of a language this model was trained on."""
    code = MCAT_BY_WHISPER_CODE.get(whisper_code)
    if code is None:
        raise UnknownLanguageError(f"{field} {whisper_code!r}: MCAT has no language with that code")
    if code not in speech.languages:
        raise UnknownLanguageError(f"{field} {whisper_code!r} ({code}): not one of this model's languages")
    return code


class AudioTooLongError(ValueError):
    """Audio longer than the encoder's window: a 400 from the server, with what to do instead."""


def check_audio_length(samples: int, window: FeatureWindow) -> None:
    if samples > window.samples:
        raise AudioTooLongError(
            f"the audio is {samples / SAMPLE_RATE:.1f} s long; this model hears at most {window.seconds:g} s at once. "
            f"Send clips of at most {window.seconds:g} s, or translate the recording with `mcat translate-audio`, "
            "which cuts it at pauses and writes subtitles")


def translation_part(text: str) -> str:
    """What the audio endpoints answer: from an SRT output the translation after the tag pair, as
    ``mcat translate`` scores it; the whole text when nothing follows a tag run (a transcript, or
    output that is tags alone). The text alone must do: vLLM does not say which endpoint asked."""
    return split_srt_output(text).translation or text.strip()


class TranslationStream(StreamingTranscriptionPostProcessor):
    """Streamed ``/v1/audio/translations``: the transcript part is held back, the translation after
    the tag pair is sent as it grows, and nothing after a second tag run (a decoding loop). Output
    with no tag at all (a transcript) is sent whole when it ends: the text alone cannot say which
    endpoint asked for it."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = ""

    def process_delta(self, text_delta: str, finished: bool) -> str:
        self.text += text_delta
        current = translation_part(self.text) if finished else self._translation_so_far()
        if not current.startswith(self.sent):
            return ""  # only the final strip can disagree with what went out: whitespace
        delta, self.sent = current[len(self.sent):], current
        return delta

    def _translation_so_far(self) -> str:
        pieces = re.split(r"((?:<\|[a-z]{3}\|>)+)", re.sub(r"<(?:\|[a-z]{0,3}\|?)?$", "", self.text))
        # pieces: transcript, tag run, translation, [tag run, ...]; the last piece may still grow
        if len(pieces) < 3 or (len(pieces) == 3 and not pieces[2].strip()):
            return ""
        return pieces[2].lstrip()


class EncoderCounts:
    """A vLLM worker extension (``LLM(worker_extension_cls=ENCODER_COUNTS)``): the model's encoder
    counters, asked for by name (``llm.collective_rpc("mcat_encoder_counts")``), so that no function
    has to be pickled into the worker (vLLM refuses that unless insecure serialization is on)."""

    def mcat_encoder_counts(self) -> tuple[int, int]:
        """(batched encoder runs, audio items encoded) in this worker."""
        model = self.get_model()
        return model.encoder_calls, model.encoded_audio_items


ENCODER_COUNTS = f"{__name__}.{EncoderCounts.__name__}"


# ---------------------------------------------------------------- processing (API-server side)


class MCATProcessingInfo(BaseProcessingInfo):
    """One audio per prompt, 16 kHz mono, a fixed number of speech positions per audio."""

    @property
    def speech(self) -> NativeSpeechConfig:
        return NativeSpeechConfig.from_hf_config(self.ctx.model_config.hf_config)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": 1}  # MCAT's prompt has one speech span, at its start

    def get_data_parser(self) -> MultiModalDataParser:
        # target_sr: vLLM resamples (audio, rate) pairs to it; without it it refuses them
        return MultiModalDataParser(target_sr=SAMPLE_RATE, target_channels=1,
                                    expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        # known without running the dummy processor at start (it would, in three processes)
        return {"audio": self.speech.num_speech_tokens}


class MCATDummyInputsBuilder(BaseDummyInputsBuilder[MCATProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # the speech positions are inserted at the start, whatever the text

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions) -> MultiModalDataDict:
        return {"audio": self._get_dummy_audios(length=encoder_window(self.info.speech).samples,
                                                num_audios=mm_counts.get("audio", 0),
                                                overrides=mm_options.get("audio"))}


class MCATMultiModalProcessor(BaseMultiModalProcessor[MCATProcessingInfo]):
    """Log-mel features by our own code (what training and ``mcat translate`` compute), no HF processor."""

    requires_tokenizer: ClassVar[bool] = False
    """Prompts of ids need none: the speech positions go at the start by id, and the features come from
    the audio alone (an export without a tokenizer, such as a benchmark's random model, serves too)."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        window = encoder_window(self.info.speech)
        audios = hf_data.get("audios", hf_data.get("audio"))
        waves = [np.asarray(audio, dtype=np.float32) for audio in audios]
        for wave in waves:
            check_audio_length(wave.size, window)
        waveforms, num_samples = pad_waveforms(waves, window)
        features = log_mel_for(window)(waveforms, num_samples)
        return BatchFeature({"input_features": features, "feature_lengths": feature_frames(num_samples)})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {"input_features": MultiModalFieldConfig.batched("audio"),
                "feature_lengths": MultiModalFieldConfig.batched("audio", keep_on_cpu=True)}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        speech = self.info.speech
        # training's layout: the speech rows lead, before BOS; their ids are the pad id (collate_examples)
        return [PromptInsertion(modality="audio", target=PromptIndexTargets.start(),
                                insertion=[speech.placeholder_token_id] * speech.num_speech_tokens)]


# ---------------------------------------------------------------- the model (worker side)


@MULTIMODAL_REGISTRY.register_processor(MCATMultiModalProcessor, info=MCATProcessingInfo,
                                        dummy_inputs=MCATDummyInputsBuilder)
class MCATForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsTranscription):
    """Whisper encoder -> speech adapter -> vLLM's Gemma, loaded from an ``mcat export`` folder."""

    supported_languages: ClassVar[Mapping[str, str]] = {
        whisper: WHISPER_LANGUAGES[whisper].title() for whisper in MCAT_BY_WHISPER_CODE
    }
    """Every MCAT language with an ISO 639-1 code; a model trained on fewer refuses the others by name."""
    supports_transcription_only: ClassVar[bool] = False  # chat and completions with audio work too

    # the LLM's saved names -> vLLM's LLM inside this wrapper; the speech sources get their own prefixes
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model.",
                                                          "lm_head.": "language_model.lm_head."})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        # the speech positions go at the start of the prompt by themselves; chat text needs no marker
        if modality.startswith("audio"):
            return None
        raise ValueError("MCAT takes audio only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.speech = NativeSpeechConfig.from_hf_config(config)
        export = vllm_config.model_config.model
        # the export keeps the weights in llm/ and speech/ (no copy at the root): point the loader there
        self.allow_patterns_overrides = [self.speech.llm_weights]
        encoder_folder, adapter_file = self.speech.encoder_weights, self.speech.adapter_weights
        self.secondary_weights = [
            DefaultModelLoader.Source(export, None, subfolder=encoder_folder, prefix="speech_encoder.whisper.",
                                      allow_patterns_overrides=["*.safetensors"]),
            DefaultModelLoader.Source(export, None, prefix="speech_adapter.", allow_patterns_overrides=[adapter_file]),
        ]
        self.encoded_audio_items = 0
        """Audio items this model's encoder has run on (the encoder cache's effect is observable)."""
        self.encoder_calls = 0
        """Batched encoder runs (vLLM's encoder scheduler groups items)."""
        with self._mark_tower_model(vllm_config, "audio"):
            whisper_config = WhisperConfig(**self.speech.encoder)
            whisper_config._attn_implementation = "sdpa"
            self.speech_encoder = SpeechEncoder(WhisperEncoder(whisper_config))
            adapter_config = from_dict(AdapterConfig, self.speech.adapter, where="config.json: mcat_speech: adapter: ")
            self.speech_adapter = SpeechAdapter(adapter_config, self.speech.encoder_width, self.speech.llm_width).eval()
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=[self.speech.llm_architecture])
        self.configure_mm_token_handling(config.vocab_size, [self.speech.placeholder_token_id])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    @torch.no_grad()
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """(items, num_speech_tokens, llm_width) speech rows, at the first decoder layer's scale."""
        features = kwargs.get("input_features")
        lengths = kwargs.get("feature_lengths")
        if features is None:
            return []
        if isinstance(features, (list, tuple)):
            features, lengths = torch.stack(list(features)), torch.stack(list(lengths))
        self.encoded_audio_items += features.shape[0]
        self.encoder_calls += 1
        rows = encode_speech(self.speech_encoder, self.speech_adapter, features, lengths.to(features.device),
                             self.speech.mask_padding_frames)
        return rows * self.speech.speech_first_layer_scale

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)

    # ------------------------------------------------------------ speech to text

    @classmethod
    def get_speech_to_text_config(cls, model_config: ModelConfig,
                                  task_type: Literal["transcribe", "translate"]) -> SpeechToTextConfig:
        window = encoder_window(NativeSpeechConfig.from_hf_config(model_config.hf_config))
        # no chunking: vLLM would join chunks' texts with spaces, which breaks SRT outputs apart, and
        # cuts blind of pauses; longer audio is refused (get_generation_prompt)
        return SpeechToTextConfig(sample_rate=SAMPLE_RATE, max_audio_clip_s=int(window.seconds),
                                  min_energy_split_window_size=None)

    @classmethod
    def get_num_audio_tokens(cls, audio_duration_s: float, stt_config: SpeechToTextConfig,
                             model_config: ModelConfig) -> int | None:
        return NativeSpeechConfig.from_hf_config(model_config.hf_config).num_speech_tokens

    @classmethod
    def get_generation_prompt(cls, stt_params: SpeechToTextParams) -> PromptType:
        """MCAT's instruction, tokenized with BOS: ASR ``<|src|>`` for a transcription, SRT
        ``<|src|><|tgt|>`` for a translation (module docstring)."""
        speech = NativeSpeechConfig.from_hf_config(stt_params.model_config.hf_config)
        check_audio_length(len(stt_params.audio), encoder_window(speech))
        if stt_params.language is None:
            raise ValueError("MCAT needs the spoken language: send language (an ISO 639-1 code)")
        source = mcat_code(stt_params.language, speech, "language")
        if stt_params.task_type == "translate":
            if stt_params.to_language is None:
                raise ValueError("send to_language (an ISO 639-1 code): MCAT translates into any of its "
                                 "languages, and does not assume English")
            prompt = build_prompt("srt", source, mcat_code(stt_params.to_language, speech, "to_language"))
        elif stt_params.to_language is not None:
            raise ValueError("a transcription is in the spoken language: ask /v1/audio/translations for "
                             "to_language (or chat, for the transcript and translation together)")
        else:
            prompt = build_prompt("asr", source)
        tokenizer = cached_tokenizer_from_config(stt_params.model_config)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # as batching.tokenize_example
        return TokensPrompt(prompt_token_ids=list(ids), multi_modal_data={"audio": stt_params.audio})

    @classmethod
    def post_process_output(cls, text: str) -> str:
        return translation_part(text)

    @classmethod
    def get_streaming_post_processor_cls(cls) -> type[StreamingTranscriptionPostProcessor]:
        return TranslationStream
