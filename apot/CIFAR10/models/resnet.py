"""CIFAR ResNets (He et al. 2016) with APoT layers: 3x3 first_conv → 3 stages (16/32/64 channels) of
BasicBlocks → AvgPool(8) → last_fc. `float=True` keeps plain convs inside the blocks (the "32-bit" model;
first_conv/last_fc stay 8-bit as in the original); otherwise every block conv and 1x1 downsample conv is a
QuantConv2d at `bit` bits. Parameter names match the published checkpoints.
"""
import math

import torch.nn as nn

from apot.CIFAR10.models.quant_layer import QuantConv2d, first_conv, last_fc


def conv3x3(in_planes, out_planes, stride=1, float=False, bit=4, power=True):
    """3x3 convolution with padding, quantized unless `float`."""
    if float:
        return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
    return QuantConv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False, bit=bit,
                       power=power)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, float=False, bit=4, power=True):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, float, bit, power)
        self.conv2 = conv3x3(planes, planes, 1, float, bit, power)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class ResNet_Cifar(nn.Module):

    def __init__(self, block, layers, num_classes=10, float=False, bit=4, power=True):
        super().__init__()
        self.float, self.bit, self.power = float, bit, power
        self.inplanes = 16
        self.conv1 = first_conv(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, layers[0])
        self.layer2 = self._make_layer(block, 32, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 64, layers[2], stride=2)
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.fc = last_fc(64 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.float:
                conv = nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False)
            else:
                conv = QuantConv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False,
                                   bit=self.bit, power=self.power)
            downsample = nn.Sequential(conv, nn.BatchNorm2d(planes * block.expansion))
        opts = dict(float=self.float, bit=self.bit, power=self.power)
        layers = [block(self.inplanes, planes, stride, downsample, **opts)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **opts) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)

    def show_params(self):
        for m in self.modules():
            if isinstance(m, QuantConv2d):
                m.show_params()


def resnet20_cifar(**kwargs):
    return ResNet_Cifar(BasicBlock, [3, 3, 3], **kwargs)


def resnet32_cifar(**kwargs):
    return ResNet_Cifar(BasicBlock, [5, 5, 5], **kwargs)


def resnet44_cifar(**kwargs):
    return ResNet_Cifar(BasicBlock, [7, 7, 7], **kwargs)


def resnet56_cifar(**kwargs):
    return ResNet_Cifar(BasicBlock, [9, 9, 9], **kwargs)


def resnet110_cifar(**kwargs):
    return ResNet_Cifar(BasicBlock, [18, 18, 18], **kwargs)


# main.py's -a/--arch names (the original accepts res20 and res56) -> (builder, result-record model name)
MODELS = {
    'res20': (resnet20_cifar, 'resnet20'),
    'res32': (resnet32_cifar, 'resnet32'),
    'res44': (resnet44_cifar, 'resnet44'),
    'res56': (resnet56_cifar, 'resnet56'),
    'res110': (resnet110_cifar, 'resnet110'),
}
