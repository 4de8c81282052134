"""Padding-free packed batches and the label-position loss give what the padded, full-logits model gives."""

import pytest
import torch

from mcat_ds.batching import IGNORE_INDEX, collate_examples, tokenize_example
from mcat_ds.build import build_model
from mcat_ds.model.mcat import chunked_cross_entropy
from conftest import random_features

EXAMPLES = [("<|eng|><|deu|>", "Regnet es morgen?"), ("<|cmn|>", "明天会下雨吗"), ("<|fra|><|eng|>", "Will it rain?"),
            ("Il pleut<|fra|><|deu|>", "Es regnet heute nicht, sagt man")]


def batches(model, tokenizer):
    tokenized = [tokenize_example(tokenizer.hf, prompt, target) for prompt, target in EXAMPLES]
    pad = tokenizer.hf.pad_token_id
    return (collate_examples(tokenized, model.num_speech_tokens, pad, "right"),
            collate_examples(tokenized, model.num_speech_tokens, pad, "packed"))


def trainable_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def loss_and_gradients(model, batch):
    """(loss, label tokens, trainable gradients) of one step on ``batch`` with the EXAMPLES' audio."""
    features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
    model.zero_grad()
    out = model(features, lengths, batch)
    out.loss.backward()
    return out.loss.detach(), out.num_label_tokens, trainable_grads(model)


@pytest.mark.parametrize("llm, attention", [("gemma2", "eager"), ("gemma3", "eager"), ("gemma3", "sdpa")])
def test_packed_batch_gives_the_padded_loss_and_gradients(tiny_config, llm, attention):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config(llm, f"model.llm.attn_implementation={attention}"))
    model.train()
    padded, packed = batches(model, tokenizer)
    assert packed.input_ids.shape[0] == 1 and packed.attention_mask is None
    assert packed.num_tokens == padded.num_tokens < padded.input_ids.numel()  # no padding left
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = (loss_and_gradients(model, batch) for batch in (padded, packed))
    assert n_a == n_b
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_attention_never_crosses_packed_sequences(tiny_config):
    """Changing every token of the other sequences leaves one sequence's logits unchanged."""
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config("gemma3", "model.llm.attn_implementation=sdpa"))
    model.eval()
    _, packed = batches(model, tokenizer)
    features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
    first = int((packed.position_ids[0] == 0).nonzero()[1])  # where the second sequence starts
    base = model(features, lengths, packed, full_logits=True).logits[0, :first]
    changed = packed.input_ids.clone()
    changed[0, first:] = torch.where(packed.speech_mask[0, first:], changed[0, first:], 5)
    other_features = features.clone()
    other_features[1:] = torch.randn_like(features[1:])
    altered = type(packed)(changed, None, packed.position_ids, packed.speech_mask, packed.labels)
    torch.testing.assert_close(model(other_features, lengths, altered, full_logits=True).logits[0, :first], base)


@pytest.mark.parametrize("llm, embeddings", [("gemma2", "tags"), ("gemma2", "all"), ("gemma3", "tags")])
def test_fused_label_loss_gives_the_full_logits_loss_and_gradients(tiny_config, llm, embeddings):
    """The fused LM head + loss over label tokens (no logits made) against HF's head over every
    position: same loss, same gradients, trained tag rows of the tied head included."""
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config(llm, f"model.llm.train_embeddings={embeddings}"))
    model.eval()
    padded, _ = batches(model, tokenizer)
    features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
    results = []
    for full_logits in (False, True):
        model.zero_grad()
        out = model(features, lengths, padded, full_logits=full_logits)
        out.loss.backward()
        results.append((out, trainable_grads(model)))
    (fused, fused_grads), (full, full_grads) = results
    assert fused.logits is None and fused.num_label_tokens == full.num_label_tokens > 0
    expected = torch.nn.functional.cross_entropy(
        full.logits[:, :-1].float().reshape(-1, full.logits.shape[-1]), padded.labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(fused.loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full.loss, expected, atol=1e-6, rtol=1e-6)
    assert any("trainable_tokens_delta" in name for name in fused_grads)
    assert fused_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fused_grads[name], full_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    if llm == "gemma2":  # the soft-capped logits are what the loss sees
        assert model.llm.config.final_logit_softcapping and full.logits.abs().max() <= model.llm.config.final_logit_softcapping


def test_chunked_cross_entropy_equals_one_pass():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7), generator=generator)
    targets[0, :3] = IGNORE_INDEX
    chunked = chunked_cross_entropy(logits, targets, chunk_rows=4)
    whole = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                              reduction="sum")
    torch.testing.assert_close(chunked, whole)
    (grad_chunked,) = torch.autograd.grad(chunked, logits)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    torch.testing.assert_close(grad_chunked, grad_whole)


@pytest.mark.parametrize("full_logits", [False, True])
def test_tag_loss_weight_counts_each_tag_label_as_that_many_tokens_in_training(tiny_config, full_logits):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config("gemma2", "optim.tag_loss_weight=5"))
    srt = [tokenize_example(tokenizer.hf, "<|eng|><|deu|>", "Will it rain?<|eng|><|deu|>Regnet es morgen?")] * 2
    batch = collate_examples(srt, model.num_speech_tokens, tokenizer.hf.pad_token_id, "right")
    features, lengths = random_features(2, [500, 120])
    model.eval()
    plain = model(features, lengths, batch, full_logits=True)
    model.train()
    weighted = model(features, lengths, batch, full_logits=full_logits)
    targets = batch.labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    token_losses = torch.nn.functional.cross_entropy(plain.logits[:, :-1][labelled].float(), targets[labelled],
                                                     reduction="none")
    is_tag = torch.isin(targets[labelled], torch.tensor(sorted(tokenizer.tag_ids.values())))
    assert int(is_tag.sum()) == 4  # <|eng|><|deu|> in each of the two targets
    weights = 1 + 4 * is_tag.float()
    torch.testing.assert_close(weighted.loss, (weights * token_losses).sum() / weights.sum(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain.loss, token_losses.mean(), atol=1e-6, rtol=1e-6)  # evaluation: unweighted
    assert not torch.allclose(weighted.loss, plain.loss)


def test_a_packed_row_padded_to_flex_attentions_block_keeps_the_loss_and_gradients(tiny_config):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config("gemma3", "model.llm.attn_implementation=eager"))
    model.train()
    tokenized = [tokenize_example(tokenizer.hf, prompt, target) for prompt, target in EXAMPLES]
    pad = tokenizer.hf.pad_token_id
    packed = collate_examples(tokenized, model.num_speech_tokens, pad, "packed")
    padded = collate_examples(tokenized, model.num_speech_tokens, pad, "packed", pack_to_multiple=128)
    assert padded.input_ids.shape[1] % 128 == 0 and padded.input_ids.shape[1] - packed.input_ids.shape[1] < 128
    assert padded.num_tokens == packed.num_tokens and padded.pack_padding > 0
    assert padded.position_ids[0, packed.input_ids.shape[1]] == 0  # the padding is a sequence of its own
    assert padded.cu_seq_lens.tolist() == packed.cu_seq_lens.tolist() + [padded.input_ids.shape[1]]
    (loss, labels, grads), (padded_loss, padded_labels, padded_grads) = (
        loss_and_gradients(model, batch) for batch in (packed, padded))
    assert padded_labels == labels
    torch.testing.assert_close(padded_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_flash_attention_gets_the_sequence_offsets_once_from_the_batch(tiny_config, monkeypatch):
    """With flash-attn, every layer would derive cu_seq_lens and the longest sequence from the position
    ids (a device sync each); the packed batch carries them, counted on the host, into every layer."""
    import transformers

    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config("gemma3", "model.llm.attn_implementation=sdpa"))
    sdpa = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []

    def recording_flash(module, query, key, value, attention_mask, **kwargs):  # stands in for flash-attn
        seen.append({name: kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                          "max_length_k")})
        return sdpa(module, query, key, value, None, **kwargs)  # the numbers do not matter here

    monkeypatch.setitem(transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2",
                        recording_flash)
    model.llm.config._attn_implementation = "flash_attention_2"
    padded, packed = batches(model, tokenizer)
    features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
    with torch.no_grad():
        model(features, lengths, packed)
    layers = model.llm.get_base_model().config.num_hidden_layers
    assert len(seen) == layers
    sequence_lengths = [model.num_speech_tokens + len(tokenize_example(tokenizer.hf, p, t).prompt_ids)
                        + len(tokenize_example(tokenizer.hf, p, t).target_ids) for p, t in EXAMPLES]
    expected = torch.tensor([0, *torch.tensor(sequence_lengths).cumsum(0).tolist()], dtype=torch.int32)
    for kwargs in seen:
        assert kwargs["cu_seq_lens_q"] is packed.cu_seq_lens and kwargs["cu_seq_lens_k"] is packed.cu_seq_lens
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == max(sequence_lengths)
    torch.testing.assert_close(packed.cu_seq_lens, expected)
    seen.clear()
    with torch.no_grad():
        model(features, lengths, padded)  # a padded batch: nothing to pass
    assert seen and all(value is None for kwargs in seen for value in kwargs.values())
