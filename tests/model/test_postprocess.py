import torch

from detr_ray.model import postprocess


def test_boxes_scaled_to_original_size_and_no_object_dropped():
    logits = torch.tensor([[[0.0, 5.0, 9.0], [4.0, 0.0, 0.0]]])  # query 0: no-object is the best logit
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (det,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    # Query 0's label is the best real class (1), with that class's probability as score.
    assert det["labels"].tolist() == [1, 0]
    p = torch.softmax(logits[0, 0], -1)[1]
    torch.testing.assert_close(det["scores"][0], p)
    torch.testing.assert_close(det["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    torch.testing.assert_close(det["boxes"][1], torch.tensor([0.0, 50.0, 100.0, 100.0]))


def test_category_id_table():
    logits = torch.tensor([[[0.0, 5.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    (det,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[10, 10]], label_to_category_id=[7, 42])
    assert det["labels"].tolist() == [42]
