"""APoT ImageNet models: `resnet18/34/50(bit=...)` and the quantized layers."""
from apot.ImageNet.models.quant_layer import *  # noqa: F401,F403
from apot.ImageNet.models.resnet import resnet18, resnet34, resnet50  # noqa: F401
