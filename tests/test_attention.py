"""The LLM's attention on packed rows: FlexAttention (what ``auto`` runs on a GPU without flash-attn)
against HF eager attention on each sequence alone, for what Gemma needs (soft-capping, sliding-window
and global layers, head dims 128 and 256); which implementation ``auto`` picks; decoding's switch.

FlexAttention has no backward on CPU, so the CPU tests compare forward outputs; the gradient test
needs CUDA."""

import pytest
import torch
import transformers

from mcat_ds.architectures import llm_config
from mcat_ds.build import build_model
from mcat_ds.infer.decoding import greedy_decode
from mcat_ds.model import attention
from mcat_ds.model.attention import resolve_attn_implementation
from test_packing import EXAMPLES, batches
from conftest import random_features

LENGTHS = [20, 13, 30, 5]  # longer than the window, so the sliding-window layers see their limit
WINDOW = 8


def tiny_llm(architecture: str, head_dim: int, implementation: str, **overrides):
    values = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=WINDOW, num_hidden_layers=2,
                  layer_types=["sliding_attention", "full_attention"])
    config = llm_config(architecture, **{**values, **overrides})
    torch.manual_seed(0)  # same weights for every implementation
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def packed_inputs(device="cpu"):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 2000, (1, sum(LENGTHS)), generator=generator)
    positions = torch.cat([torch.arange(length) for length in LENGTHS])[None]
    return ids.to(device), positions.to(device)


def each_sequence_alone(model, ids):
    logits, start = [], 0
    for length in LENGTHS:
        piece = ids[:, start:start + length]
        logits.append(model(input_ids=piece, position_ids=torch.arange(length, device=ids.device)[None],
                            use_cache=False).logits)
        start += length
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("architecture", ["tiny-gemma2", "tiny-gemma3"])
def test_flex_attention_on_a_packed_row_equals_eager_on_each_sequence(architecture, head_dim):
    ids, positions = packed_inputs()
    eager, flex = tiny_llm(architecture, head_dim, "eager"), tiny_llm(architecture, head_dim, "flex_attention")
    if architecture == "tiny-gemma2":
        assert flex.config.attn_logit_softcapping == 50.0  # the soft-cap is part of what is compared
    with torch.no_grad():
        expected = each_sequence_alone(eager, ids)
        packed = flex(input_ids=ids, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(packed, expected, atol=2e-5, rtol=1e-4)
        # The comparison can fail: without the window, or attending across sequences, logits change.
        wide = tiny_llm(architecture, head_dim, "eager", sliding_window=64)
        assert (each_sequence_alone(wide, ids) - expected).abs().max() > 1e-3
        crossing = eager(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
        assert (crossing - expected).abs().max() > 1e-3


def test_flex_attention_packed_model_loss_equals_padded_eager_loss(tiny_config):
    """Through the whole MCAT model: the packed FlexAttention loss is the padded eager loss."""
    losses = []
    for implementation, padding in (("eager", 0), ("flex_attention", 1)):
        torch.manual_seed(0)
        model, tokenizer = build_model(tiny_config("gemma2", f"model.llm.attn_implementation={implementation}"))
        model.eval()
        batch = batches(model, tokenizer)[padding]
        features, lengths = random_features(len(EXAMPLES), [500, 120, 300, 60])
        with torch.no_grad():
            losses.append(model(features, lengths, batch).loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
@pytest.mark.parametrize("architecture", ["tiny-gemma2", "tiny-gemma3"])
def test_flex_attention_gradients_equal_eager_per_sequence_on_cuda(architecture):
    ids, positions = packed_inputs("cuda")
    grads = []
    for implementation in ("eager", "flex_attention"):
        model = tiny_llm(architecture, 128, implementation).cuda().train()
        if implementation == "eager":
            loss = each_sequence_alone(model, ids).float().pow(2).mean()
        else:
            loss = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float().pow(2).mean()
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
def test_one_flex_compile_serves_every_packed_length_on_cuda(tiny_config):
    """Training steps on packed rows of three lengths (multiples of 128): FlexAttention is compiled at
    the first (per mask kind, forward and backward) and never again."""
    from torch._dynamo.utils import counters

    from mcat_ds.batching import collate_examples, tokenize_example
    from mcat_ds.model.attention import packed_length_multiple

    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config("gemma2", "model.llm.attn_implementation=flex_attention"))
    model.cuda().train()
    tokenized = [tokenize_example(tokenizer.hf, prompt, target) for prompt, target in EXAMPLES]
    graphs = []
    for copies in (1, 3, 6):  # 4, 12 and 24 sequences: packed rows of different lengths
        examples = tokenized * copies
        batch = collate_examples(examples, model.num_speech_tokens, tokenizer.hf.pad_token_id, "packed",
                                 packed_length_multiple(model.llm)).to("cuda")
        assert batch.input_ids.shape[1] % 128 == 0
        features, lengths = random_features(len(examples), [500, 120, 300, 60] * copies)
        model(features.cuda(), lengths.cuda(), batch).loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1] == graphs[0], graphs


@pytest.mark.parametrize(
    "cuda, flash_attn, architecture, expected",
    [
        (True, True, "tiny-gemma2", "flash_attention_2"),
        (True, False, "tiny-gemma2", "flex_attention"),
        (True, False, "tiny-gemma3", "flex_attention"),
        (False, True, "tiny-gemma3", "sdpa"),  # flash-attn without CUDA is no use
        (False, False, "tiny-gemma2", "eager"),  # SDPA cannot soft-cap, whatever the version claims
    ],
)
def test_auto_attention_choice(monkeypatch, cuda, flash_attn, architecture, expected):
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object() if flash_attn else None)
    assert resolve_attn_implementation("auto", llm_config(architecture)) == expected
    assert resolve_attn_implementation("sdpa", llm_config(architecture)) == "sdpa"  # an explicit choice stands


def test_decoding_switches_flex_attention_to_dense_attention():
    flex, eager = tiny_llm("tiny-gemma3", 128, "flex_attention"), tiny_llm("tiny-gemma3", 128, "eager")
    embeds = torch.randn(2, 6, flex.config.hidden_size, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    decoded = greedy_decode(flex, embeds, mask, max_new_tokens=5, eos_token_id=1)
    assert flex.config._attn_implementation == "sdpa"
    assert decoded == greedy_decode(eager, embeds, mask, max_new_tokens=5, eos_token_id=1)
