import pytest
import torch
import transformers
from peft import PeftModel
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SENTENCES, random_features
from mcat_ds.batching import IGNORE_INDEX, collate_examples, tokenize_example
from mcat_ds.build import CheckpointError, build_model, count_parameters
from mcat_ds.checkpoint import LORA_DIR, load_checkpoint, save_checkpoint
from mcat_ds.model import GenerationOptions
from mcat_ds.presets import get_preset
from mcat_ds.prompts import build_prompt, build_target
from mcat_ds.tiny import write_tiny_llm

EXAMPLES = [
    ("srt", "eng", "deu", "Will it rain tomorrow?", "Regnet es morgen?"),
    ("asr", "cmn", None, "明天会下雨吗？", None),
    ("smt", "fra", "spa", "Il va pleuvoir demain ?", "¿Lloverá mañana?"),
]


def training_batch(model, tokenizer, examples=EXAMPLES):
    tokenized = [
        tokenize_example(
            tokenizer.hf,
            build_prompt(task, src, tgt, transcript=transcript),
            build_target(task, src, tgt, transcript=transcript, translation=translation),
        )
        for task, src, tgt, transcript, translation in examples
    ]
    return tokenized, collate_examples(tokenized, model.num_speech_tokens, tokenizer.hf.pad_token_id)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config())
    return model, tokenizer


def test_labels_cover_the_prediction_and_eos_only(tiny_model):
    model, tokenizer = tiny_model
    tokenized, batch = training_batch(model, tokenizer)
    for row, (example, (task, src, tgt, transcript, translation)) in enumerate(zip(tokenized, EXAMPLES)):
        labels = batch.labels[row]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        assert supervised[-1] == tokenizer.hf.eos_token_id
        target = build_target(task, src, tgt, transcript=transcript, translation=translation)
        assert tokenizer.hf.decode(supervised[:-1]) == target
        start = model.num_speech_tokens + len(example.prompt_ids)
        assert (labels[:start] == IGNORE_INDEX).all() and (labels[start:start + len(supervised)] != IGNORE_INDEX).all()
        assert batch.speech_mask[row, : model.num_speech_tokens].all()
        assert not batch.speech_mask[row, model.num_speech_tokens:].any()
        prompt = tokenizer.hf.decode(example.prompt_ids, skip_special_tokens=True)
        assert prompt == build_prompt(task, src, tgt, transcript=transcript)
        assert example.prompt_ids[0] == tokenizer.hf.bos_token_id


def test_batched_loss_equals_the_token_weighted_single_losses(tiny_model):
    model, tokenizer = tiny_model
    model.eval()
    features, lengths = random_features(3, [500, 120, 333])
    _, batch = training_batch(model, tokenizer)
    together = model(features, lengths, batch)
    total, tokens = 0.0, 0
    for row in range(3):
        _, single = training_batch(model, tokenizer, [EXAMPLES[row]])
        out = model(features[row:row + 1], lengths[row:row + 1], single)
        total += out.loss.item() * out.num_label_tokens
        tokens += out.num_label_tokens
    assert together.num_label_tokens == tokens
    assert together.loss.item() == pytest.approx(total / tokens, rel=1e-5)


def test_only_adapter_lora_and_token_rows_train(tiny_model):
    model, tokenizer = tiny_model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith(("adapter.", "llm.")) for name in trainable)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    llm_trainable = {name for name in trainable if name.startswith("llm.")}
    assert llm_trainable and all("lora_" in name or "trainable_tokens" in name for name in llm_trainable)
    model.train()
    assert not model.encoder.whisper.training  # stays in eval mode
    features, lengths = random_features(3, [500, 120, 333])
    _, batch = training_batch(model, tokenizer)
    model(features, lengths, batch).loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            if "lora_A" not in name:  # lora_B starts at zero, so lora_A's first gradient is zero
                assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_tag_rows_only_train_in_the_real_presets_setting(tiny_config):
    model, tokenizer = build_model(tiny_config("gemma2", "model.llm.train_embeddings=tags"))
    delta = next(p for n, p in model.llm.named_parameters() if "trainable_tokens_delta" in n)
    assert delta.shape == (70, 128)
    counts = count_parameters(model)
    assert counts.trainable == counts.adapter + counts.lora
    assert counts.total == counts.encoder + counts.adapter + counts.llm + counts.lora
    model_text, _ = build_model(tiny_config("gemma2", "model.llm.language_tags=text", "model.llm.train_embeddings=tags"))
    assert not any("trainable_tokens" in n for n, _ in model_text.llm.named_parameters())


def test_encoder_rejects_features_of_the_wrong_window(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match=r"Whisper expects features of shape \(batch, 80, 500\)"):
        model.speech_embeddings(torch.zeros(1, 80, 3000), torch.tensor([3000]))


def first_layer_input(model, features, lengths, batch):
    captured = {}

    def capture(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    layer = next(m for n, m in model.llm.named_modules() if n.endswith("layers.0"))
    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    model(features, lengths, batch)
    handle.remove()
    return captured["h"]


@pytest.mark.parametrize("llm", ["gemma2", "gemma3"])
@pytest.mark.parametrize("speech_scale", ["token", "none"])
def test_speech_reaches_the_llm_with_the_configured_scale(tiny_config, llm, speech_scale):
    model, tokenizer = build_model(tiny_config(llm, f"model.llm.speech_scale={speech_scale}"))
    model.eval()
    features, lengths = random_features(2, [500, 100])
    _, batch = training_batch(model, tokenizer, EXAMPLES[:2])
    hidden = first_layer_input(model, features, lengths, batch)
    width = hidden.shape[-1]
    adapter_out = model.adapter(*model.encoder(features, lengths))
    expected_scale = width**0.5 if speech_scale == "token" else 1.0
    torch.testing.assert_close(hidden[batch.speech_mask].view(2, 30, width), adapter_out * expected_scale)
    # token positions are exactly what the LLM makes of the ids on its own (Gemma: sqrt(width) x rows)
    base = model.llm.get_base_model()
    rows = base.get_input_embeddings().weight[batch.input_ids[~batch.speech_mask]]
    torch.testing.assert_close(hidden[~batch.speech_mask], rows * width**0.5)


def one_training_step(model, tokenizer):
    model.train()
    features, lengths = random_features(3, [500, 120, 333])
    _, batch = training_batch(model, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(features, lengths, batch).loss.backward()
    optimizer.step()
    model.eval()
    return features, lengths, batch


def test_save_then_load_gives_identical_logits(tiny_config, tmp_path):
    torch.manual_seed(0)
    config = tiny_config("gemma2", "model.llm.train_embeddings=tags")
    model, tokenizer = build_model(config)
    features, lengths, batch = one_training_step(model, tokenizer)
    expected = model(features, lengths, batch, full_logits=True).logits
    save_checkpoint(model, tokenizer, config, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["adapter.safetensors", "lora", "mcat_config.json"]
    assert not list(tmp_path.glob("*.partial-*"))

    torch.manual_seed(123)  # a different fresh init, overwritten by the load
    loaded, loaded_tokenizer, loaded_config = load_checkpoint(tmp_path / "ckpt")
    loaded.eval()
    assert loaded_config == config and loaded_tokenizer.tag_ids == tokenizer.tag_ids
    torch.testing.assert_close(loaded(features, lengths, batch, full_logits=True).logits, expected, rtol=0, atol=0)

    # the LoRA part is a plain peft adapter: peft alone reproduces the LLM (tags added first)
    base = transformers.AutoModelForCausalLM.from_pretrained(config.model.llm.checkpoint)
    base.resize_token_embeddings(len(tokenizer.hf))
    peft_llm = PeftModel.from_pretrained(base, tmp_path / "ckpt" / LORA_DIR).eval()
    ids = batch.input_ids[:, 30:]
    torch.testing.assert_close(peft_llm(input_ids=ids).logits, model.llm(input_ids=ids).logits)


def test_loading_against_a_base_of_another_shape_names_both_shapes(tiny_config, tiny_dirs, tmp_path):
    config = tiny_config()
    model, tokenizer = build_model(config)
    save_checkpoint(model, tokenizer, config, tmp_path / "ckpt")
    wider = write_tiny_llm(tmp_path / "wider", SENTENCES * 4, hidden_size=96, head_dim=24)
    with pytest.raises(CheckpointError, match=r"fc2.weight has shape \(128, 256\) in the checkpoint but \(96, 256\)"):
        load_checkpoint(tmp_path / "ckpt", llm_checkpoint=str(wider))


def test_missing_base_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    config = tiny_config()
    config.model.llm.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="LLM checkpoint directory .*nowhere does not exist"):
        build_model(config)
    with pytest.raises(CheckpointError, match="not an MCAT checkpoint"):
        load_checkpoint(tmp_path)


def prompts_for(model, tokenizer, pairs):
    tokenized = [tokenize_example(tokenizer.hf, build_prompt("srt", src, tgt)) for src, tgt in pairs]
    return collate_examples(tokenized, model.num_speech_tokens, tokenizer.hf.pad_token_id, "left")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_at_a_time(tiny_model, num_beams):
    model, tokenizer = tiny_model
    one_training_step(model, tokenizer)
    pairs = [("eng", "deu"), ("cmn", "jpn"), ("fra", "ara")]
    features, lengths = random_features(3, [500, 40, 260], seed=3)
    options = GenerationOptions(num_beams=num_beams, max_new_tokens=12)
    together = model.generate(features, lengths, prompts_for(model, tokenizer, pairs), options)
    alone = [
        model.generate(features[i:i + 1], lengths[i:i + 1], prompts_for(model, tokenizer, pairs[i:i + 1]), options)[0]
        for i in range(3)
    ]
    assert together == alone
    assert all(len(ids) <= 12 and tokenizer.hf.eos_token_id not in ids for ids in together)


def test_generation_needs_left_padding(tiny_model):
    model, tokenizer = tiny_model
    tokenized = [tokenize_example(tokenizer.hf, build_prompt("asr", code)) for code in ("eng", "cmn")]
    tokenized.append(tokenize_example(tokenizer.hf, build_prompt("smt", "eng", "deu", transcript="Will it rain?")))
    right = collate_examples(tokenized, model.num_speech_tokens, tokenizer.hf.pad_token_id, "right")
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(*random_features(3, [10, 10, 10]), right)


def test_language_model_of_a_multimodal_gemma3_checkpoint(tiny_config, tiny_dirs):
    model, tokenizer = build_model(tiny_config("gemma3_multimodal"))
    base = model.llm.get_base_model()
    assert type(base).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in name or "multi_modal" in name for name, _ in model.named_parameters())
    full = transformers.AutoModelForImageTextToText.from_pretrained(tiny_dirs["gemma3_multimodal"]).eval()
    ids = torch.tensor([[tokenizer.hf.bos_token_id, 17, 60, 5, 99]])
    base_tokens = len(tokenizer.hf) - 70  # rows past them are spare rows the tags took over
    torch.testing.assert_close(
        model.llm.eval()(input_ids=ids).logits[..., :base_tokens], full(input_ids=ids).logits[..., :base_tokens]
    )


class LargeFloat32Tensors(TorchDispatchMode):
    """Counts the elements of every fp32 tensor of more than a million elements an op produces."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel() > 1_000_000:
            self.elements += out.numel()
        return out


def test_random_models_of_real_sizes_are_built_in_their_dtype_not_cast_from_fp32():
    """A 9B/27B benchmark model made in fp32 and then cast needs twice its memory and the time to fill it."""
    from mcat_ds.build import build_model_skeleton

    for dtype, expected in ((None, "some"), (torch.bfloat16, "none")):
        with LargeFloat32Tensors() as counter:  # on the meta device: shapes and dtypes, no memory
            model = build_model_skeleton(get_preset("small-9b"), "meta", llm_layers=1, encoder_layers=1, dtype=dtype)
        assert (counter.elements > 0) == (expected == "some"), dtype
    embedding = model.llm.get_input_embeddings().weight
    assert embedding.dtype == torch.bfloat16 and embedding.numel() > 900_000_000  # Gemma2's 256k x 3584
    assert torch.get_default_dtype() == torch.float32  # restored
