"""Validation's target-language decisions: where they sit in the labels, and their accuracy."""

import torch

from conftest import random_features
from mcat_ds.batching import collate_examples, tokenize_example
from mcat_ds.build import build_model
from mcat_ds.model import MCATOutput
from mcat_ds.prompts import build_prompt, build_target
from mcat_ds.train.validation import decision_masks, validate


def srt_and_smt(tokenizer, src="eng", tgt="deu"):
    transcript, translation = "Will it rain tomorrow?", "Regnet es morgen?"
    return {task: tokenize_example(tokenizer.hf, build_prompt(task, src, tgt, transcript=transcript),
                                   build_target(task, src, tgt, transcript=transcript, translation=translation))
            for task in ("srt", "smt")}


def test_decisions_are_the_copied_tag_and_the_translation_first_token(tiny_config):
    _, tokenizer = build_model(tiny_config())
    tags = tokenizer.tag_ids
    examples = srt_and_smt(tokenizer)
    for padding in ("right", "packed"):
        srt = collate_examples([examples["srt"]] * 2, 30, tokenizer.hf.pad_token_id, padding)
        masks = decision_masks(srt.labels, tags.values(), "srt")
        targets = srt.labels[:, 1:]
        assert targets[masks.tag].tolist() == [tags["deu"]] * 2  # the target tag, not the source tag
        first = tokenizer.hf("Regnet es morgen?", add_special_tokens=False)["input_ids"][0]
        assert targets[masks.first_token].tolist() == [first] * 2
        smt = collate_examples([examples["smt"]] * 2, 30, tokenizer.hf.pad_token_id, padding)
        smt_masks = decision_masks(smt.labels, tags.values(), "smt")
        assert smt_masks.tag is None and smt.labels[:, 1:][smt_masks.first_token].tolist() == [first] * 2
    assert decision_masks(srt.labels, tags.values(), "asr") is None
    assert decision_masks(srt.labels, {}, "srt") is None  # tags as text: no single-token decision


class _Engine:
    def __init__(self, model):
        self.model = model

    def eval(self):
        self.model.eval()

    def train(self):
        self.model.train()


def test_predictions_at_decisions_are_the_full_logits_argmax(tiny_config):
    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_config())
    batch = collate_examples([srt_and_smt(tokenizer)["srt"]] * 3, model.num_speech_tokens, tokenizer.hf.pad_token_id)
    features, lengths = random_features(3, [300, 200, 100])
    masks = decision_masks(batch.labels, tokenizer.tag_ids.values(), "srt")
    either = masks.tag | masks.first_token
    full = model(features, lengths, batch, full_logits=True, predict_at=either)
    fused = model(features, lengths, batch, predict_at=either)
    assert fused.logits is None and fused.predictions.shape == (6,)
    assert torch.equal(fused.predictions, full.logits[:, :-1][either].argmax(-1))
    assert torch.equal(full.predictions, fused.predictions)


def test_validation_counts_each_decision_apart(tiny_config):
    model, tokenizer = build_model(tiny_config())
    batch = collate_examples([srt_and_smt(tokenizer)["srt"]] * 4, model.num_speech_tokens, tokenizer.hf.pad_token_id)

    class Loaded:
        llm = batch

    def forward_with(wrong_tags: int):
        def forward(_, predict_at):
            expected = batch.labels[:, 1:][predict_at].clone()
            is_tag = decision_masks(batch.labels, tokenizer.tag_ids.values(), "srt").tag[predict_at]
            tag_rows = is_tag.nonzero().squeeze(1)
            expected[tag_rows[:wrong_tags]] = tokenizer.tag_ids["fra"]  # a wrong target language
            return MCATOutput(torch.tensor(0.5), None, 10, expected)
        return forward

    for wrong in (0, 1, 4):
        record = validate(_Engine(model), [Loaded()], tokenizer.tag_ids.values(), "srt", forward_with(wrong),
                          lambda values: values)
        assert record == {"val_loss": 0.5, "val_tag_accuracy": (4 - wrong) / 4, "val_first_token_accuracy": 1.0}
    asr = validate(_Engine(model), [Loaded()], tokenizer.tag_ids.values(), "asr",
                   lambda _, predict_at: MCATOutput(torch.tensor(0.25), None, 8), lambda values: values)
    assert asr == {"val_loss": 0.25}
