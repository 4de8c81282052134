"""A tiny random COMET (wmt22-comet-da layout) built locally, loaded through unbabel-comet's real path."""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_comet(root: Path, texts: list[str]) -> Path:
    """``root/comet`` with ``hparams.yaml`` and ``checkpoints/model.ckpt`` over a tiny XLM-R in ``root/xlmr``."""
    import pytorch_lightning
    import sentencepiece
    import yaml
    from comet.models import RegressionMetric
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    xlmr = root / "xlmr"
    xlmr.mkdir(parents=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(xlmr / "sentencepiece.bpe"), vocab_size=1000,
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0)
    tokenizer = XLMRobertaTokenizerFast(vocab_file=str(xlmr / "sentencepiece.bpe.model"))
    tokenizer.save_pretrained(xlmr)
    XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
                     ).save_pretrained(xlmr)
    torch.manual_seed(0)
    metric = RegressionMetric(pretrained_model=str(xlmr), hidden_sizes=[16], load_pretrained_weights=False,
                              layer_transformation="softmax", dropout=0.0)
    with torch.no_grad():
        for parameter in metric.parameters():
            parameter.normal_(std=0.2)  # random everywhere, so scores differ between segments
    hparams = {key: value for key, value in dict(metric.hparams).items()}
    hparams["class_identifier"] = "regression_metric"
    folder = root / "comet"
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": metric.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pytorch_lightning.__version__}, folder / "checkpoints" / "model.ckpt")
    (folder / "hparams.yaml").write_text(yaml.safe_dump(hparams), encoding="utf-8")
    return folder
