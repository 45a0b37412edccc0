"""DETR's encoder-decoder transformer on nn.MultiheadAttention.

Layout is sequence-first ([S, B, C]) like the reference, and the module names match it, so
published weights load as they are. Position embeddings are added to queries and keys (never
values) at every attention; the decoder starts from zeros with learned query embeddings as its
positions, and returns every layer's output through the shared final LayerNorm.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        if self.pre_norm:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = k = _with_pos(src, pos)
        attn = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        if self.pre_norm:
            x = self.norm1(tgt)
            q = k = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(
                self.multihead_attn(
                    _with_pos(x, query_pos),
                    _with_pos(memory, pos),
                    memory,
                    key_padding_mask=memory_key_padding_mask,
                    need_weights=False,
                )[0]
            )
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.multihead_attn(
            _with_pos(tgt, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.LayerNorm | None):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm  # only with pre-norm, as in the reference

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.LayerNorm):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos) -> Tensor:
        """Returns [num_layers, Q, B, C]: every layer's output through the final norm."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        pre_norm: bool = False,
    ):
        super().__init__()
        enc = EncoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.encoder = Encoder(enc, num_encoder_layers, nn.LayerNorm(d_model) if pre_norm else None)
        dec = DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
        self.decoder = Decoder(dec, num_decoder_layers, nn.LayerNorm(d_model))
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> Tensor:
        """src [B,C,h,w], mask [B,h,w] True on padding, query_embed [Q,C], pos_embed [B,C,h,w]
        -> decoder outputs [num_dec_layers, B, Q, C]."""
        bs = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # [hw, B, C]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).expand(-1, bs, -1)  # [Q, B, C]
        mask = mask.flatten(1)
        memory = self.encoder(src, mask, pos_embed)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, mask, pos_embed, query_pos)
        return hs.transpose(1, 2)
