"""AlignQ's networks with the original's quantizer placement (read from tinganchen/AlignQ, seed era).

Every network takes a `scheme` (alignq.quant.CDFScheme or a baseline's scheme from alignq.baselines) that
builds its quantized convolutions (`scheme.conv`) and activation quantizers (`scheme.act`); `scheme.order`
says where the activation quantizer sits: 'ours' before the ReLU (AlignQ), 'after' behind it (uniform,
dorefa, llsq, bwn) or 'none' (apot, lsq quantize activations inside their convolution). Inputs are never
quantized; classifier heads stay FP32.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from alignq.quant import ActQuant, QConv2d


class CDFScheme:
    """AlignQ: CDF weight transform in every conv, R(2 Phi(x) - 1) activations, optional ADMM per quantizer."""
    order = "ours"

    def __init__(self, wbit, abit, stage="second", act_range=2.0, admm_dim=0, corr_eps=0.0):
        self.wbit, self.abit, self.stage, self.act_range = wbit, abit, stage, act_range
        self.admm_dim, self.corr_eps = admm_dim, corr_eps

    def conv(self, *args, **kw):
        return QConv2d(*args, w_bit=self.wbit, **kw)

    def act(self, admm=True):
        return ActQuant(self.abit, self.stage, self.act_range, self.admm_dim if admm else 0, self.corr_eps)


# ---------------------------------------------------------------------------------------------- CIFAR ResNet


class Block(nn.Module):
    """The original's 'PreActBlock_conv_Q' (post-activation in fact); 1x1 conv + BN shortcut on stride 2."""

    def __init__(self, s, in_planes, out_planes, stride=1):
        super().__init__()
        self.order = s.order
        self.conv0 = s.conv(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(out_planes)
        self.act_q0 = s.act()
        self.conv1 = s.conv(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_planes)
        self.act_q1 = s.act()
        self.skip_conv = None
        if stride != 1:
            self.skip_conv = s.conv(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
            self.skip_bn = nn.BatchNorm2d(out_planes)
            self.act_skip_q = s.act()

    def forward(self, x):
        shortcut = x if self.skip_conv is None else self.act_skip_q(self.skip_bn(self.skip_conv(x)))
        if self.order == "after":
            out = self.act_q0(F.relu(self.bn0(self.conv0(x))))
            return self.act_q1(F.relu(self.bn1(self.conv1(out)) + shortcut))
        out = F.relu(self.act_q0(self.bn0(self.conv0(x))))
        out = self.act_q1(self.bn1(self.conv1(out)))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, s, num_units, num_classes=10):
        super().__init__()
        self.order = s.order
        self.conv0 = s.conv(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act_q0 = s.act()
        strides = [1] * num_units[0] + [2] + [1] * (num_units[1] - 1) + [2] + [1] * (num_units[2] - 1)
        channels = [16] * num_units[0] + [32] * num_units[1] + [64] * num_units[2]
        self.layers = nn.ModuleList()
        in_planes = 16
        for stride, c in zip(strides, channels):
            self.layers.append(Block(s, in_planes, c, stride))
            in_planes = c
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.logit = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.bn(self.conv0(x))
        out = self.act_q0(F.relu(out)) if self.order == "after" else F.relu(self.act_q0(out))
        for layer in self.layers:
            out = layer(out)
        return self.logit(torch.flatten(self.avgpool(out), 1))


def resnet20_quant(s, num_classes=10):
    return CifarResNet(s, [3, 3, 3], num_classes)


def resnet56_quant(s, num_classes=10):
    return CifarResNet(s, [9, 9, 9], num_classes)


# ---------------------------------------------------------------------------------------------- MobileNetV2


class MBBlock(nn.Module):
    """Inverted residual as the original: act quantizer after each BN; stride 1 adds a conv1x1+BN+act+ReLU shortcut."""

    def __init__(self, s, in_planes, out_planes, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = s.conv(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act_q1 = s.act()
        self.conv2 = s.conv(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act_q2 = s.act()
        self.conv3 = s.conv(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.act_q3 = s.act()
        self.shortcut = None
        if stride == 1:   # the original uses a conv shortcut even when in_planes == out_planes
            self.shortcut = nn.Sequential(s.conv(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                                          nn.BatchNorm2d(out_planes), s.act(), nn.ReLU())

    def forward(self, x):
        out = F.relu6(self.act_q1(self.bn1(self.conv1(x))))
        out = F.relu6(self.act_q2(self.bn2(self.conv2(out))))
        out = self.act_q3(self.bn3(self.conv3(out)))
        return out + self.shortcut(x) if self.shortcut is not None else out


class MobileNetV2(nn.Module):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, s, num_classes=10):
        super().__init__()
        self.conv1 = s.conv(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act_q1 = s.act()
        layers, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in self.cfg:
            for st in [stride] + [1] * (num_blocks - 1):
                layers.append(MBBlock(s, in_planes, out_planes, expansion, st))
                in_planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.conv2 = s.conv(320, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.act_q2 = s.act()
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = F.relu(self.act_q1(self.bn1(self.conv1(x))))
        out = self.layers(out)
        out = F.relu(self.act_q2(self.bn2(self.conv2(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(torch.flatten(out, 1))


def mobile_v2(s, num_classes=10):
    return MobileNetV2(s, num_classes)


# ---------------------------------------------------------------------------------------------- DenseNet-40


class DenseLayer(nn.Module):
    """BN -> act quantizer -> ReLU -> quantized 3x3 conv (growth 12), concatenated to the input."""

    def __init__(self, s, inplanes, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act_q0 = s.act()
        self.conv1 = s.conv(inplanes, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat((x, self.conv1(F.relu(self.act_q0(self.bn1(x))))), 1)


class Transition(nn.Module):
    def __init__(self, s, inplanes, outplanes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act_q0 = s.act()
        self.conv1 = s.conv(inplanes, outplanes, kernel_size=1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(F.relu(self.act_q0(self.bn1(x)))), 2)


class DenseNet(nn.Module):
    """DenseNet-40 (3 dense blocks of 12 layers, growth 12, compression rate 1 as the original's densenet_40_quant)."""

    def __init__(self, s, depth=40, growth=12, compression=1, num_classes=10):
        super().__init__()
        n = (depth - 4) // 3
        planes = 2 * growth
        self.conv1 = s.conv(3, planes, kernel_size=3, padding=1, bias=False)
        stages = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(s, planes, growth))
                planes += growth
            stages.append(nn.Sequential(*layers))
            if i < 2:
                out = planes // compression
                stages.append(Transition(s, planes, out))
                planes = out
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3 = stages
        self.bn = nn.BatchNorm2d(planes)
        self.act_q0 = s.act()
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x):
        x = self.dense3(self.trans2(self.dense2(self.trans1(self.dense1(self.conv1(x))))))
        x = F.relu(self.act_q0(self.bn(x)))
        return self.fc(torch.flatten(F.avg_pool2d(x, 8), 1))


def densenet_40_quant(s, num_classes=10):
    return DenseNet(s, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------- DANN / DSAN


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -alpha."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.alpha, None


def grl_alpha(p, eps=1e-6):
    """DANN's GRL coefficient 2 / (1 + exp(-10 p) + eps) - 1 (the Office-31 loops add eps = 1e-6, the digit one 0)."""
    return 2.0 / (1.0 + math.exp(-10.0 * p) + eps) - 1.0


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: conv-bn-act_q-relu x2, conv-bn-act_q3 (the ADMM one), + shortcut, ReLU."""
    expansion = 4

    def __init__(self, s, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = s.conv(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act_q1 = s.act(admm=False)
        self.conv2 = s.conv(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act_q2 = s.act(admm=False)
        self.conv3 = s.conv(width, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.act_q3 = s.act(admm=True)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.act_q1(self.bn1(self.conv1(x))))
        out = F.relu(self.act_q2(self.bn2(self.conv2(out))))
        out = self.act_q3(self.bn3(self.conv3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 feature extractor with torchvision's parameter names (so ImageNet weights load by name)."""

    def __init__(self, s, layers=(3, 4, 6, 3)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = s.conv(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act_q0 = s.act(admm=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(s, 64, layers[0])
        self.layer2 = self._make_layer(s, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(s, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(s, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, s, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(s.conv(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(s, self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(s, self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.act_q0(self.bn1(self.conv1(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class DANN(nn.Module):
    """feature -> class_classifier; feature -> GRL(alpha) -> domain_classifier (both heads FP32)."""

    def __init__(self, feature, feat_dim, num_classes, domain_head=None):
        super().__init__()
        self.feature = feature
        self.class_classifier = nn.Sequential()
        self.class_classifier.add_module("c_fc3", nn.Linear(feat_dim, num_classes))
        self.domain_classifier = domain_head or nn.Sequential()
        if domain_head is None:
            self.domain_classifier.add_module("d_fc2", nn.Linear(feat_dim, 2))

    def forward(self, x, alpha=1.0):
        f = self.feature(x)
        return self.class_classifier(f), self.domain_classifier(GradReverse.apply(f, alpha))


def resnet50_dann(s, num_classes=31):
    return DANN(ResNet50(s), 2048, num_classes)


class DigitFeature(nn.Module):
    """The original's MNISTmodel_quant feature extractor (3x28x28 -> 48x4x4); grey input is expanded to 3 channels."""

    def __init__(self, s):
        super().__init__()
        after = s.order == "after"
        parts = [s.conv(3, 32, kernel_size=5), nn.BatchNorm2d(32)]
        parts += [nn.ReLU(), s.act()] if after else [s.act(), nn.ReLU()]
        parts += [nn.MaxPool2d(2), s.conv(32, 48, kernel_size=5), nn.BatchNorm2d(48)]
        parts += [nn.Dropout2d(), nn.ReLU(), s.act()] if after else [s.act(), nn.Dropout2d(), nn.ReLU()]
        parts += [nn.MaxPool2d(2)]
        self.net = nn.Sequential(*parts)

    def forward(self, x):
        return torch.flatten(self.net(x.expand(x.shape[0], 3, 28, 28)), 1)


class DigitDANN(nn.Module):
    """MNISTmodel_quant: FP32 classifier 768-100-100-10 and discriminator 768-100-2 behind the GRL."""

    def __init__(self, s, num_classes=10):
        super().__init__()
        self.feature = DigitFeature(s)
        self.classifier = nn.Sequential(nn.Linear(768, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 100),
                                        nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, num_classes))
        self.discriminator = nn.Sequential(nn.Linear(768, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 2))

    def forward(self, x, alpha=1.0):
        f = self.feature(x)
        return self.classifier(f), self.discriminator(GradReverse.apply(f, alpha))


def MNISTmodel_quant(s, num_classes=10):  # noqa: N802 - the original's --model name
    return DigitDANN(s, num_classes)


MODELS = {
    "resnet20_quant": resnet20_quant, "resnet56_quant": resnet56_quant, "mobile_v2": mobile_v2,
    "densenet_40_quant": densenet_40_quant, "resnet50_dann": resnet50_dann, "MNISTmodel_quant": MNISTmodel_quant,
}
