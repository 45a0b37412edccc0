import torch

from detr_ray.model.position import PositionEmbeddingSine
from detr_ray.model.transformer import Transformer


def _run(transformer, src, mask, queries):
    pos = PositionEmbeddingSine(src.shape[1] // 2)(mask)
    return transformer(src, mask, queries, pos)


def test_padding_does_not_change_attention_over_real_keys():
    torch.manual_seed(0)
    for pre_norm in (False, True):
        t = Transformer(
            d_model=32,
            nhead=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=64,
            dropout=0.1,
            pre_norm=pre_norm,
        ).eval()
        queries = torch.randn(5, 32)
        src = torch.randn(1, 32, 4, 6)
        mask = torch.zeros(1, 4, 6, dtype=torch.bool)
        # Same image padded by 3 columns and 2 rows of garbage, marked as padding.
        padded = torch.randn(1, 32, 6, 9) * 100
        padded[..., :4, :6] = src
        pmask = torch.ones(1, 6, 9, dtype=torch.bool)
        pmask[:, :4, :6] = False
        with torch.no_grad():
            a = _run(t, src, mask, queries)
            b = _run(t, padded, pmask, queries)
            mem_a = t.encoder(
                src.flatten(2).permute(2, 0, 1),
                mask.flatten(1),
                PositionEmbeddingSine(16)(mask).flatten(2).permute(2, 0, 1),
            )
            mem_b = t.encoder(
                padded.flatten(2).permute(2, 0, 1),
                pmask.flatten(1),
                PositionEmbeddingSine(16)(pmask).flatten(2).permute(2, 0, 1),
            )
        assert a.shape == (2, 1, 5, 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        real = (~pmask.flatten(1))[0]
        torch.testing.assert_close(mem_a[:, 0], mem_b[real, 0], atol=1e-5, rtol=1e-5)


def test_decoder_returns_every_layer_through_final_norm():
    torch.manual_seed(0)
    t = Transformer(
        d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=3, dim_feedforward=32, dropout=0.0
    ).eval()
    with torch.no_grad():
        t.decoder.norm.weight.fill_(2.0)
        t.decoder.norm.bias.fill_(0.5)
        src = torch.randn(2, 16, 3, 3)
        mask = torch.zeros(2, 3, 3, dtype=torch.bool)
        hs = _run(t, src, mask, torch.randn(4, 16))
    assert hs.shape == (3, 2, 4, 16)
    # Each layer's output went through the final LayerNorm (weight 2, bias 0.5): mean 0.5, std ~2.
    torch.testing.assert_close(hs.mean(-1), torch.full((3, 2, 4), 0.5), atol=1e-4, rtol=0)
    assert torch.allclose(hs.std(-1, unbiased=False), torch.full((3, 2, 4), 2.0), atol=1e-2)
