"""Model registry: `create_model(name, num_classes, in_channels, image_size, **options)`.

Every model is an nn.Module with two parts, `backbone` (feature extractor) and
`head` (the classifier), so `freeze=backbone` and weight transfer work the same
for all of them. `models` imports nothing from `train` or `data`.
"""

from __future__ import annotations

from .registry import MODELS, create_model, list_models, describe_model  # noqa: F401
from . import papers, vgg, resnet, mobilenet, efficientnet  # noqa: F401  (registers the builders)
from .weights import load_weights, freeze_backbone  # noqa: F401
from .fused import set_fusion  # noqa: F401
