import math

import torch

from detr_ray.model.position import PositionEmbeddingSine


def test_values_follow_the_formula():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=10000, normalize=True)
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    pos = pe(mask)
    assert pos.shape == (1, 8, 2, 4)
    # Pixel (y=1, x=2): normalized y = 2/2*2pi, x = 3/4*2pi; features (sin, cos) at dim_t 1, 100.
    y, x = 2 / 2 * 2 * math.pi, 3 / 4 * 2 * math.pi
    dims = [1.0, 1.0, 10000 ** (2 / 4), 10000 ** (2 / 4)]
    expect_y = [math.sin(y / dims[0]), math.cos(y / dims[1]), math.sin(y / dims[2]), math.cos(y / dims[3])]
    expect_x = [math.sin(x / dims[0]), math.cos(x / dims[1]), math.sin(x / dims[2]), math.cos(x / dims[3])]
    torch.testing.assert_close(pos[0, :, 1, 2], torch.tensor(expect_y + expect_x), atol=1e-4, rtol=1e-4)


def test_real_pixels_unchanged_by_padding():
    pe = PositionEmbeddingSine(8)
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    pmask = torch.ones(1, 8, 12, dtype=torch.bool)
    pmask[:, :5, :7] = False
    torch.testing.assert_close(pe(mask), pe(pmask)[..., :5, :7])
