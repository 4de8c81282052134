"""The MCAT model: frozen Whisper encoder -> speech adapter -> LLM with LoRA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcat_ds.batching import IGNORE_INDEX, LLMBatch
from mcat_ds.model.adapter import SpeechAdapter
from mcat_ds.model.attention import compiled_attention_context, packed_attention_arguments, use_decoding_attention
from mcat_ds.model.encoder import SpeechEncoder
from mcat_ds.model.loss import LossImplementation, chunked_head_cross_entropy, linear_cross_entropy


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 2048,
                          class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed fp32 cross-entropy of (..., V) logits against targets (IGNORE_INDEX skipped), upcasting
    ``chunk_rows`` rows at a time rather than the whole (tokens x vocabulary) matrix at once."""
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk_rows):
        total = total + F.cross_entropy(logits[start:start + chunk_rows].float(), targets[start:start + chunk_rows],
                                        weight=class_weights, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def _head_weight(head: nn.Module) -> torch.Tensor:
    """The LM head's effective (V, H) weight: with trainable tag rows, peft wraps the (tied) head and
    overlays the trained rows on the frozen ones in its forward; the fused loss needs that weight."""
    adapter = getattr(head, "token_adapter", None)  # peft's TrainableTokensWrapper
    if adapter is None:
        if not isinstance(head, nn.Linear):
            raise TypeError(f"the fused loss needs a linear LM head, not {type(head).__name__}")
        return head.weight
    if adapter.merged or adapter.disable_adapters or not adapter.active_adapters:
        return adapter.base_layer.weight
    return adapter.get_merged_weights(adapter.active_adapters)


@dataclass
class MCATOutput:
    loss: torch.Tensor | None
    """Mean cross-entropy over the label tokens of the batch (fp32)."""
    logits: torch.Tensor | None
    """Logits of every position with ``full_logits`` or without labels; None otherwise (the loss
    never materialises them)."""
    num_label_tokens: int
    predictions: torch.Tensor | None = None
    """With ``predict_at``: the argmax token id at each selected position, in row-major order."""


@dataclass(frozen=True)
class GenerationOptions:
    num_beams: int = 1
    max_new_tokens: int = 256
    no_repeat_ngram_size: int = 0
    """The release decodes with 5; 0 is plain greedy/beam search."""
    length_penalty: float = 1.0


def encode_speech(encoder: SpeechEncoder, adapter: SpeechAdapter, features: torch.Tensor,
                  feature_lengths: torch.Tensor, mask_padding_frames: bool) -> torch.Tensor:
    """Encoder then adapter, unscaled: (B, num_mel_bins, window) -> (B, num_speech_tokens, llm_width).
    Without ``mask_padding_frames`` the adapter attends to every frame, padding included (the release)."""
    states, state_lengths = encoder(features, feature_lengths)
    if not mask_padding_frames:
        state_lengths = torch.full_like(state_lengths, states.shape[1])
    return adapter(states.to(adapter.queries.dtype), state_lengths)


class MCATModel(nn.Module):
    """Plain module: no files, no ranks. Build it with ``mcat_ds.build``.

    ``speech_input_scale`` multiplies the adapter output before it joins the token embeddings as
    ``inputs_embeds``; the builder sets it so that the speech reaches the first decoder layer with the
    configured scale whatever the LLM does to ``inputs_embeds`` internally (Gemma2 under
    transformers 4.x multiplies them by sqrt(hidden); 5.x and Gemma3 scale in the embedding module).
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        adapter: SpeechAdapter,
        llm: nn.Module,
        *,
        speech_input_scale: float,
        mask_padding_frames: bool,
        pad_token_id: int,
        loss_implementation: LossImplementation = "auto",
        eos_token_id: int,
        tag_token_ids: tuple[int, ...] = (),
        tag_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.speech_input_scale = speech_input_scale
        self.mask_padding_frames = mask_padding_frames
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.loss_implementation = loss_implementation
        self.tag_token_ids = tuple(tag_token_ids)
        self.tag_loss_weight = tag_loss_weight

    def _class_weights(self, device: torch.device) -> torch.Tensor | None:
        """In training, language-tag labels count ``tag_loss_weight`` times (evaluation stays plain)."""
        if not self.training or self.tag_loss_weight == 1.0 or not self.tag_token_ids:
            return None
        embedding = self.llm.get_input_embeddings().weight
        vocabulary = getattr(embedding, "ds_shape", embedding.shape)[0]  # ZeRO-3 partitions the rows
        weights = torch.ones(vocabulary, dtype=torch.float32, device=device)
        weights[list(self.tag_token_ids)] = self.tag_loss_weight
        return weights

    @property
    def num_speech_tokens(self) -> int:
        return self.adapter.num_speech_tokens

    def speech_embeddings(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> torch.Tensor:
        """(B, num_mel_bins, window) log-mel features -> (B, num_speech_tokens, llm_width)."""
        return encode_speech(self.encoder, self.adapter, features, feature_lengths,
                             self.mask_padding_frames) * self.speech_input_scale

    def input_embeddings(self, batch: LLMBatch, speech: torch.Tensor) -> torch.Tensor:
        tokens = self.llm.get_input_embeddings()(batch.input_ids)
        expected = speech.shape[0] * speech.shape[1]
        if int(batch.speech_mask.sum()) != expected:
            raise ValueError(
                f"the batch marks {int(batch.speech_mask.sum())} speech positions but the adapter produced "
                f"{speech.shape[0]} x {speech.shape[1]} speech embeddings"
            )
        return tokens.masked_scatter(batch.speech_mask[..., None], speech.to(tokens.dtype))

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor, batch: LLMBatch,
                full_logits: bool = False, predict_at: torch.Tensor | None = None) -> MCATOutput:
        """Mean cross-entropy over the label tokens. The LM head and the loss run fused over the
        label tokens only (``mcat_ds.model.loss``; Gemma's vocabulary is 256k: full logits would
        dwarf the rest of the step's memory). ``full_logits`` (or no labels) runs the HF head over
        every position and returns its logits, the loss then computed from them.

        ``predict_at``: a (B, T - 1) bool mask over the positions that predict ``labels[:, 1:]``;
        the greedy prediction there (over the whole vocabulary) comes back as ``predictions``, the
        head computed for those positions only (validation's tag-decision accuracy)."""
        embeds = self.input_embeddings(batch, self.speech_embeddings(features, feature_lengths))
        class_weights = None if batch.labels is None else self._class_weights(embeds.device)
        inputs = dict(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                      use_cache=False, **packed_attention_arguments(self.llm, batch))
        with compiled_attention_context(self.llm, embeds.device):
            return self._forward_from_embeddings(inputs, batch, class_weights, full_logits, predict_at)

    def _forward_from_embeddings(self, inputs: dict, batch: LLMBatch, class_weights: torch.Tensor | None,
                                 full_logits: bool, predict_at: torch.Tensor | None) -> MCATOutput:
        if batch.labels is None or full_logits:
            logits = self.llm(**inputs).logits
            if batch.labels is None:
                return MCATOutput(None, logits, 0)
            targets = batch.labels[:, 1:]
            labelled = targets != IGNORE_INDEX
            num_label_tokens = int(labelled.sum())
            total_weight = num_label_tokens if class_weights is None else class_weights[targets[labelled]].sum()
            loss = chunked_cross_entropy(logits[:, :-1], targets, class_weights=class_weights) / max(total_weight, 1)
            predictions = None if predict_at is None else logits[:, :-1][predict_at].argmax(-1)
            return MCATOutput(loss, logits, num_label_tokens, predictions)
        causal_lm = self.llm.get_base_model()
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
        # position p predicts token p + 1
        predicting = batch.labels[:, 1:] != IGNORE_INDEX
        targets = batch.labels[:, 1:][predicting]
        head = causal_lm.get_output_embeddings()
        softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
        if any(hasattr(p, "ds_id") for p in head.parameters()):
            # ZeRO-3 partitions the weight; only the head module's own forward gathers it
            loss = chunked_head_cross_entropy(hidden[:, :-1][predicting], head, targets, softcap,
                                              class_weights=class_weights)
        else:
            loss = linear_cross_entropy(hidden[:, :-1][predicting], _head_weight(head), targets, softcap=softcap,
                                        implementation=self.loss_implementation, class_weights=class_weights)
        # a weighted mean: with tag_loss_weight w, a tag label counts as w tokens
        total_weight = targets.numel() if class_weights is None else class_weights[targets].sum()
        predictions = None
        if predict_at is not None:
            # a soft-cap is monotonic: the argmax of the raw head is the prediction
            predictions = head(hidden[:, :-1][predict_at]).argmax(-1)
        return MCATOutput(loss / max(total_weight, 1), None, targets.numel(), predictions)

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        feature_lengths: torch.Tensor,
        prompts: LLMBatch,
        options: GenerationOptions = GenerationOptions(),
    ) -> list[list[int]]:
        """Batched greedy or beam search from left-padded prompts; the new token ids per sample, up to
        (not including) the end-of-sequence token."""
        return self.generate_from_speech(self.speech_embeddings(features, feature_lengths), prompts, options)

    @torch.no_grad()
    def generate_from_speech(self, speech: torch.Tensor, prompts: LLMBatch,
                             options: GenerationOptions = GenerationOptions()) -> list[list[int]]:
        """``generate`` from speech embeddings already computed (one utterance can serve many prompts)."""
        if bool(prompts.attention_mask[:, -1].eq(0).any()):
            raise ValueError("generation needs left-padded prompts (collate_examples(..., padding_side='left'))")
        embeds = self.input_embeddings(prompts, speech)
        use_decoding_attention(self.llm)
        output = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=prompts.attention_mask,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            do_sample=False,
            no_repeat_ngram_size=options.no_repeat_ngram_size,
            length_penalty=options.length_penalty,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        results = []
        for row in output.tolist():
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            results.append(row)
        return results
