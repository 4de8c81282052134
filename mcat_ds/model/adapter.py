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
from mcat_kernels.cross_attention import key_padding_mask, qformer_cross_attention
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
    valid encoder frames (``key_width`` wide), whose keys and values the adapter projects for all
    layers at once, through the padding-aware kernel entry point.
    """

    def __init__(self, config: AdapterConfig, key_width: int | None = None):
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.kernels = config.kernels
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(key_width or width, width)
        self.v_proj = nn.Linear(key_width or width, width)
        self.out_proj = nn.Linear(width, width)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
                state_lengths: torch.Tensor | None = None) -> torch.Tensor:
        q = _split_heads(self.q_proj(x), self.num_heads)
        dropout_p = self.attention_dropout if self.training else 0.0
        if keys_values is None:
            k, v = (_split_heads(proj(x), self.num_heads) for proj in (self.k_proj, self.v_proj))
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            k, v = (_split_heads(projected, self.num_heads) for projected in keys_values)
            attended = qformer_cross_attention(q, k, v, state_lengths, dropout_p=dropout_p, implementation=self.kernels)
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

    def attend(self, x: torch.Tensor, keys_values, state_lengths: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, keys_values, state_lengths)
        return x


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

    def project_keys_values(self, states: torch.Tensor, state_lengths: torch.Tensor):
        """Keys and values of every cross-attention layer, (B, T, width) each.

        ``varlen``: one GEMM over the valid frames of all samples (no padding row is projected), for
        all layers' K and V weights at once; the result is scattered into a (B, T) layout, T the
        longest utterance of the batch, whose padding rows the attention never reads.
        """
        attentions = [layer.cross_attn for layer in self.layers if layer.cross_attn is not None]
        if self.config.kv_projection == "per_layer":
            return [(attention.k_proj(states), attention.v_proj(states)) for attention in attentions]
        longest = int(state_lengths.max())
        valid = key_padding_mask(state_lengths, longest)
        frames = states[:, :longest][valid]
        projections = [proj for attention in attentions for proj in (attention.k_proj, attention.v_proj)]
        weight = torch.cat([proj.weight for proj in projections])
        bias = torch.cat([proj.bias for proj in projections])
        packed = F.linear(frames, weight, bias)
        padded = packed.new_zeros(states.shape[0], longest, packed.shape[-1]).index_put((valid.nonzero(as_tuple=True)), packed)
        chunks = padded.split(self.config.hidden_size, dim=-1)
        return list(zip(chunks[0::2], chunks[1::2]))

    def forward(self, states: torch.Tensor, state_lengths: torch.Tensor) -> torch.Tensor:
        keys_values = iter(self.project_keys_values(states, state_lengths))
        x = self.input_dropout(self.input_norm(self.queries.expand(states.shape[0], -1, -1)))
        for index, layer in enumerate(self.layers):
            x = layer.attend(x, next(keys_values) if layer.cross_attn is not None else None, state_lengths)
            if index < len(self.layers) - 1:
                x = layer.ffn(x)
        norm = self.layers[-1].ffn.norm
        pooled = layernorm_pool(self.layers[-1].ffn.branch(x), x, norm.weight, norm.bias, norm.eps,
                                self.config.pool_stride, implementation=self.config.kernels)
        return self.output_norm(self.fc2(F.relu(self.fc1(pooled))))

