"""The speech adapter: a BLIP-2 Q-Former over the encoder states, average pooling, an MLP, a LayerNorm.

Numerically this is ``transformers.Blip2QFormerModel`` (post-LN BERT layers; queries only, no text
input) followed by the release's pooling and projection. The module and parameter names are ours;
``mcat_ds.release`` maps release checkpoints onto them. Cross-attention and the pooling epilogue go
through ``mcat_kernels`` entry points, the seam where the fused kernels plug in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcat_ds.config import AdapterConfig
from mcat_kernels.cross_attention import qformer_cross_attention
from mcat_kernels.layernorm_pool import layernorm_pool


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class QFormerAttention(nn.Module):
    """Multi-head attention from the queries, then dropout, residual add and LayerNorm (post-LN).

    Self-attention among the queries when ``key_width`` is None; otherwise cross-attention to the
    valid encoder frames (``key_width`` wide) through the fused, padding-aware kernel entry point.
    """

    def __init__(self, config: AdapterConfig, key_width: int | None = None):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.is_cross = key_width is not None
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(key_width or width, width)
        self.v_proj = nn.Linear(key_width or width, width)
        self.out_proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, states: torch.Tensor | None = None,
                state_lengths: torch.Tensor | None = None) -> torch.Tensor:
        keys = states if self.is_cross else x
        q = _split_heads(self.q_proj(x), self.num_heads)
        k = _split_heads(self.k_proj(keys), self.num_heads)
        v = _split_heads(self.v_proj(keys), self.num_heads)
        dropout_p = self.attention_dropout if self.training else 0.0
        if self.is_cross:
            attended = qformer_cross_attention(q, k, v, state_lengths, dropout_p=dropout_p)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return self.norm(self.dropout(self.out_proj(_merge_heads(attended))) + x)


class QFormerFeedForward(nn.Module):
    """The query feed-forward block; its residual add + LayerNorm is split out so the last layer
    can hand it to the fused pooling epilogue."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.branch(x) + x)


class QFormerLayer(nn.Module):
    def __init__(self, config: AdapterConfig, encoder_width: int, has_cross_attention: bool):
        super().__init__()
        self.self_attn = QFormerAttention(config)
        self.cross_attn = QFormerAttention(config, key_width=encoder_width) if has_cross_attention else None
        self.ffn = QFormerFeedForward(config)

    def attend(self, x: torch.Tensor, states: torch.Tensor, state_lengths: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, states, state_lengths)
        return x

    def forward(self, x: torch.Tensor, states: torch.Tensor, state_lengths: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attend(x, states, state_lengths))


class SpeechAdapter(nn.Module):
    """Encoder states (B, T, encoder_width) -> speech embeddings (B, num_queries // pool_stride, llm_width)."""

    def __init__(self, config: AdapterConfig, encoder_width: int, llm_width: int):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"adapter hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        if not 1 <= config.pool_stride <= config.num_queries:
            raise ValueError(f"pool_stride {config.pool_stride} must be in [1, num_queries={config.num_queries}]")
        self.config = config
        self.queries = nn.Parameter(torch.empty(1, config.num_queries, config.hidden_size))
        self.input_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(config, encoder_width, has_cross_attention=index % config.cross_attention_every == 0)
            for index in range(config.num_layers)
        )
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_hidden_size)
        self.fc2 = nn.Linear(config.mlp_hidden_size, llm_width)
        self.output_norm = nn.LayerNorm(llm_width, eps=config.output_norm_eps)
        self.reset_parameters()

    @property
    def num_speech_tokens(self) -> int:
        return self.config.num_queries // self.config.pool_stride

    def reset_parameters(self) -> None:
        nn.init.normal_(self.queries, std=self.config.query_init_std)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
        if self.config.init == "blip2":
            # BLIP-2 initialises the Q-Former's linears N(0, 0.02); the release's MLP keeps PyTorch's init.
            for module in self.layers.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)

    def forward(self, states: torch.Tensor, state_lengths: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(self.input_norm(self.queries.expand(states.shape[0], -1, -1)))
        for layer in self.layers[:-1]:
            x = layer(x, states, state_lengths)
        last = self.layers[-1]
        x = last.attend(x, states, state_lengths)
        norm = last.ffn.norm
        pooled = layernorm_pool(last.ffn.branch(x), x, norm.weight, norm.bias, norm.eps, self.config.pool_stride)
        return self.output_norm(self.fc2(F.relu(self.fc1(pooled))))

