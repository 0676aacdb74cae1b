"""CIFAR ResNets (He et al. 2016) as the original model/cifar10/resnet.py: BasicBlock resnet20/32/44/56/110/1202,
Bottleneck resnet164/1001; stem conv1 (3->16), 1x1-conv + BN downsample ("option B"), avgpool, `fc`.

`option_a=True` builds the other common variant (akamaster/pytorch_resnet_cifar10: parameter-free zero-padding
shortcut, head named `linear`) only so that its published FP32 ResNet-20 can be loaded; it has no downsample
convs and so other LBA group counts than the paper's model (see main_cifar10.py --pretrained-option-a).
"""
import math

import torch.nn as nn
import torch.nn.functional as F


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.conv2 = conv3x3(planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.prelu1 = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.prelu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.prelu2(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, planes):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class ResNet_Cifar(nn.Module):

    def __init__(self, block, layers, num_classes=10, option_a=False):
        super().__init__()
        self.inplanes = 16
        self.option_a = option_a
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 16, layers[0])
        self.layer2 = self._make_layer(block, 32, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 64, layers[2], stride=2)
        self.avgpool = nn.AvgPool2d(8, stride=1)
        head = nn.Linear(64 * block.expansion, num_classes)
        if option_a:
            self.linear = head
        else:
            self.fc = head
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
            if self.option_a:
                if block is not BasicBlock:
                    raise ValueError("the option-A shortcut exists for BasicBlock ResNets only")
                downsample = PadShortcut(planes)
            else:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.linear(x) if self.option_a else self.fc(x)


DEPTHS = {'resnet20': (BasicBlock, 3), 'resnet32': (BasicBlock, 5), 'resnet44': (BasicBlock, 7),
          'resnet56': (BasicBlock, 9), 'resnet110': (BasicBlock, 18), 'resnet1202': (BasicBlock, 200),
          'resnet164': (Bottleneck, 18), 'resnet1001': (Bottleneck, 111)}


def _builder(name):
    block, n = DEPTHS[name]

    def build(**kwargs):
        return ResNet_Cifar(block, [n, n, n], **kwargs)
    build.__name__ = name
    build.__doc__ = f"{name}: {block.__name__} x {n} per stage"
    return build


resnet20, resnet32, resnet44, resnet56 = (_builder(n) for n in ('resnet20', 'resnet32', 'resnet44', 'resnet56'))
resnet110, resnet1202, resnet164, resnet1001 = (_builder(n) for n in ('resnet110', 'resnet1202', 'resnet164',
                                                                       'resnet1001'))
MODELS = {n: globals()[n] for n in sorted(DEPTHS)}   # the original's sorted `resnet*` callables
