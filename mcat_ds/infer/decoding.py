"""The fast greedy decoder: a loop over the LLM's KV cache that computes the LM head for the last
position only and drops finished rows from the batch and the cache. It returns the tokens HF
``generate`` returns (greedy, the same no-repeat n-gram rule)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from mcat_ds.model.attention import use_decoding_attention


def _ban_repeated_ngrams(logits, generated, rows, step: int, size: int):
    """-inf for each live row's tokens that would repeat one of its n-grams (HF's no_repeat_ngram_size)."""
    if step + 1 < size:
        return logits
    logits = logits.clone()
    history = generated[rows, :step].tolist()
    for live, tokens in enumerate(history):
        banned = banned_ngram_tokens(tokens, size)
        if banned:
            logits[live, banned] = float("-inf")
    return logits


def banned_ngram_tokens(tokens: list[int], size: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``tokens`` (HF's no_repeat_ngram_size rule)."""
    if size <= 0 or len(tokens) + 1 < size:
        return []
    prefix = tuple(tokens[len(tokens) - size + 1:])
    return [tokens[i + size - 1] for i in range(len(tokens) - size + 1) if tuple(tokens[i:i + size - 1]) == prefix]


@dataclass
class DecodeCounters:
    decode_steps: int = 0
    """LLM forward calls after the prompt (one per generated position of the batch)."""
    token_rows: int = 0
    """Sequence rows the LLM computed over all decode steps (finished rows dropped cost none)."""
    output_tokens: int = 0


def _cache_argument(llm) -> str:
    """transformers 5.x names the KV cache argument ``cache`` (``past_key_values`` is deprecated
    there); 4.x ``past_key_values``. Asked of the model under a peft wrapper, whose forward takes
    ``**kwargs``."""
    model = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output.cache if "cache" in output.keys() else output.past_key_values


@torch.no_grad()
def greedy_decode(llm, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                  no_repeat_ngram_size: int = 0, counters: DecodeCounters | None = None) -> list[list[int]]:
    """Greedy decoding over the KV cache from left-padded prompt embeddings; new ids per row, up to
    (not including) end-of-sequence. Positions follow HF ``generate`` (cumulative mask, pads at 1)."""
    counters = counters or DecodeCounters()
    use_decoding_attention(llm)
    batch = embeds.shape[0]
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    out = llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
              use_cache=True, logits_to_keep=1)
    cache, logits = _returned_cache(out), out.logits[:, -1]
    device = embeds.device
    rows = torch.arange(batch, device=device)  # which original row each live row is
    generated = torch.full((batch, max_new_tokens), eos_token_id, dtype=torch.long, device=device)
    positions = position_ids[:, -1:]
    mask_column = attention_mask.new_ones(batch, 1)
    cache_argument = _cache_argument(llm)
    for step in range(max_new_tokens):
        if no_repeat_ngram_size:
            logits = _ban_repeated_ngrams(logits, generated, rows, step, no_repeat_ngram_size)
        tokens = logits.argmax(-1)
        generated[rows, step] = tokens
        finished = tokens == eos_token_id
        # one host sync per step: how many rows finished (HF generate syncs as often)
        done = int(finished.sum())
        if step == max_new_tokens - 1 or done == tokens.shape[0]:
            break
        if done:  # finished rows leave the batch and the cache: they stop costing compute
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tokens, attention_mask, positions = rows[keep], tokens[keep], attention_mask[keep], positions[keep]
        attention_mask = torch.cat([attention_mask, mask_column[: attention_mask.shape[0]]], dim=1)
        positions = positions + 1
        out = llm(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                  use_cache=True, **{cache_argument: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        counters.decode_steps += 1
        counters.token_rows += tokens.shape[0]
    results = []
    for row in generated.tolist():
        results.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    counters.output_tokens += sum(len(row) for row in results)
    return results
