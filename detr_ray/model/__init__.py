"""DETR (Carion et al., 2020): model, Hungarian matcher, set loss, post-processing, weights."""

from detr_ray.config import DETRConfig
from detr_ray.model.criterion import SetCriterion, build_criterion, default_weight_dict
from detr_ray.model.detr import DETR, build_model, parameter_groups
from detr_ray.model.matcher import HungarianMatcher
from detr_ray.model.postprocess import postprocess
from detr_ray.model.weights import LoadReport, WeightsError, load_pretrained, read_state_dict

__all__ = [
    "DETR",
    "DETRConfig",
    "HungarianMatcher",
    "LoadReport",
    "SetCriterion",
    "WeightsError",
    "build_criterion",
    "build_model",
    "default_weight_dict",
    "load_pretrained",
    "parameter_groups",
    "postprocess",
    "read_state_dict",
]
