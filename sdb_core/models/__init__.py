"""A small zoo of classifiers created by name, timm style: ``create_model("resnet20", 10, (3, 32, 32))``.

Every model takes any input shape (C, H, W) with H, W >= 8, returns raw logits (B, num_classes)
and exposes ``num_classes`` and ``in_shape``. Families register on import, one file each.
"""
from sdb_core.models import cnn, mlp, resnet, vit, wrn  # noqa: F401  (registers the families)
from sdb_core.models._factory import MODELS, create_model, list_models, register_model

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
