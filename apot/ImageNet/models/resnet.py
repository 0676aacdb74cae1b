"""ResNet with APoT QuantConv2d in every block, torchvision layout (same state_dict keys as
torchvision.models.resnet*, plus `act_alpha`/`weight_alpha` per QuantConv2d).

The stem (`first_conv`) and classifier (`last_fc`) use 8-bit weights. `pretrained=True` loads
torchvision's ImageNet weights from a local file (never downloads); see `load_torchvision_weights`.
The MNIST models reuse `ResNet` with 1 input channel and widths 16/32/64/128.
"""
import os

import torch
import torch.nn as nn

from common.checkpoint import extract_state_dict, load_checkpoint, load_model_state
from common.errors import UserError
from apot.ImageNet.models.quant_layer import QuantConv2d, first_conv, last_fc

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "load_torchvision_weights"]

# torchvision file names of the weights the original downloaded (model_zoo URLs), then the names
# newer torchvision releases use for the same IMAGENET1K_V1 weights
TORCHVISION_FILES = {
    "resnet18": ("resnet18-5c106cde.pth", "resnet18-f37072fd.pth"),
    "resnet34": ("resnet34-333f7ec4.pth", "resnet34-b627a593.pth"),
    "resnet50": ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth"),
}


def conv3x3(in_planes, out_planes, stride=1, **q):
    return QuantConv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False, **q)


def conv1x1(in_planes, out_planes, stride=1, **q):
    return QuantConv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False, **q)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, **q):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, **q)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, **q)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, **q):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes, **q)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, **q)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion, **q)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """bit/power/additive configure every QuantConv2d (bit=32: full precision convs)."""

    def __init__(self, block, layers, num_classes=1000, in_channels=3, widths=(64, 128, 256, 512),
                 bit=32, power=True, additive=True, zero_init_residual=False):
        super().__init__()
        self.bit = bit
        self._q = dict(bit=bit, power=power, additive=additive)
        self.inplanes = widths[0]
        self.conv1 = first_conv(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = last_fc(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride, **self._q),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **self._q)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **self._q) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def show_params(self):
        for m in self.modules():
            if isinstance(m, QuantConv2d):
                m.show_params()


def _torchvision_path(arch):
    """The cached torchvision weights file ($TORCH_HOME/hub/checkpoints), or the original's name if none."""
    hub = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
    paths = [os.path.join(hub, "hub", "checkpoints", f) for f in TORCHVISION_FILES[arch]]
    return next((p for p in paths if os.path.isfile(p)), paths[0])


def load_torchvision_weights(model, arch, path=None):
    """Full-precision init from a torchvision ImageNet state dict (local file, no download).

    Only the QuantConv2d clipping parameters (act_alpha, weight_alpha) may be missing; they keep their
    initial values 6.0 / 3.0. Any other mismatch is an error.
    """
    path = path or _torchvision_path(arch)
    if not os.path.isfile(path):
        raise UserError(f"full-precision {arch} weights not found at {path}; the original downloads "
                        f"{TORCHVISION_FILES[arch][0]} from download.pytorch.org - put that file there (or pass its "
                        f"path with --fp-init PATH), or train from scratch with --fp-init none")
    sd = extract_state_dict(load_checkpoint(path, what=f"torchvision {arch} weights", flag="--fp-init"))
    missing, unexpected = load_model_state(model, sd, strict=False, what=f"torchvision {arch} weights {path}")
    bad = [k for k in missing if not k.endswith(("act_alpha", "weight_alpha"))] + list(unexpected)
    if bad:
        raise UserError(f"torchvision {arch} weights {path} do not match the model ({', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}); is it a torchvision {arch} state dict?")
    return model


def _resnet(arch, block, layers, pretrained, **kwargs):
    model = ResNet(block, layers, **kwargs)
    if pretrained:
        load_torchvision_weights(model, arch, pretrained if isinstance(pretrained, str) else None)
    return model


def resnet18(pretrained=False, **kwargs):
    """ResNet-18; pretrained=True or a path loads local torchvision weights."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], pretrained, **kwargs)


def resnet34(pretrained=False, **kwargs):
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], pretrained, **kwargs)


def resnet50(pretrained=False, **kwargs):
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], pretrained, **kwargs)
