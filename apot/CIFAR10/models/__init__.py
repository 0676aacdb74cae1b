from apot.CIFAR10.models.quant_layer import (QuantConv2d, act_quantization, build_power_value, first_conv, last_fc,
                                              weight_quantization, weight_quantize_fn)
from apot.CIFAR10.models.resnet import (MODELS, ResNet_Cifar, resnet20_cifar, resnet32_cifar, resnet44_cifar,
                                         resnet56_cifar, resnet110_cifar)
