"""MNIST ResNets: the ImageNet ResNet with 1 input channel, widths 16/32/64/128 and 10 classes
(first_conv k7 s2 p3 + maxpool, last_fc 128 -> 10)."""
from apot.ImageNet.models.resnet import BasicBlock, ResNet

MNIST = dict(num_classes=10, in_channels=1, widths=(16, 32, 64, 128))


def resnet10(**kwargs):
    return ResNet(BasicBlock, [1, 1, 1, 1], **MNIST, **kwargs)


def resnet14(**kwargs):
    return ResNet(BasicBlock, [2, 1, 1, 2], **MNIST, **kwargs)


def resnet18(**kwargs):
    return ResNet(BasicBlock, [2, 2, 2, 2], **MNIST, **kwargs)


def resnet34(**kwargs):
    return ResNet(BasicBlock, [3, 4, 6, 3], **MNIST, **kwargs)
