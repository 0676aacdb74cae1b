"""APoT MNIST models (1-channel ResNets) built from the ImageNet generation's quantized layers."""
from apot.ImageNet.models.quant_layer import *  # noqa: F401,F403
from apot.MNIST.models.resnet import resnet10, resnet14, resnet18, resnet34  # noqa: F401

ARCHS = ("resnet10", "resnet14", "resnet18", "resnet34")
