"""APoT ImageNet models: `resnet18/34/50(bit=...)` and the quantized layers."""
from .quant_layer import *  # noqa: F401,F403
from .resnet import resnet18, resnet34, resnet50  # noqa: F401
