"""The release's "qqm" speech adapter rebuilt on transformers' Blip2QFormerModel, with the release's
parameter names: the reference SpeechAdapter is tested against and benchmarked against."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mcat_ds.config import AdapterConfig


class ReleaseQFormerPoolAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, encoder_width: int, llm_width: int, attn_implementation: str = "eager"):
        super().__init__()
        qformer_config = Blip2QFormerConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            cross_attention_frequency=config.cross_attention_every,
            encoder_hidden_size=encoder_width,
            layer_norm_eps=config.layer_norm_eps,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.attention_dropout,
            attn_implementation=attn_implementation,  # eager: what the release's transformers ran
        )
        self.stride = config.pool_stride
        self.query = nn.Parameter(torch.randn(1, config.num_queries, config.hidden_size))
        self.qformer = Blip2QFormerModel(qformer_config)
        self.linear1 = nn.Linear(config.hidden_size, config.mlp_hidden_size)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(config.mlp_hidden_size, llm_width)
        self.norm = nn.LayerNorm(llm_width, eps=config.output_norm_eps)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(states.shape[0], -1, -1)
        out = self.qformer(query_embeds=query, encoder_hidden_states=states, encoder_attention_mask=mask).last_hidden_state
        batch, rows, width = out.shape
        kept = rows - rows % self.stride
        pooled = out[:, :kept].reshape(batch, kept // self.stride, self.stride, width).mean(2)
        return self.norm(self.linear2(self.relu(self.linear1(pooled))))

