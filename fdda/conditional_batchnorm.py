"""Class-conditional batch norm (CCBN) and the GDFQ/FDDA generator.

CCBN: a non-affine BatchNorm2d (batch statistics in training, running statistics otherwise) followed by a
per-class affine map, gamma[y] * x_hat + beta[y], with gamma, beta embeddings initialised to 1 and 0.
"""
import torch.nn as nn
import torch.nn.functional as F


class CategoricalConditionalBatchNorm2d(nn.BatchNorm2d):
    """BN without its own affine parameters, then the affine map of each sample's class `c`."""

    def __init__(self, num_classes, num_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps, momentum, affine=False, track_running_stats=True)
        self.weights = nn.Embedding(num_classes, num_features)   # gamma per class (the original's names)
        self.biases = nn.Embedding(num_classes, num_features)    # beta per class
        nn.init.ones_(self.weights.weight)
        nn.init.zeros_(self.biases.weight)

    def forward(self, x, c):
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, self.momentum,
                           self.eps)
        return self.weights(c)[:, :, None, None] * out + self.biases(c)[:, :, None, None]


class Generator_imagenet(nn.Module):
    """z (N x latent_dim), y (N) -> images N x channels x img_size x img_size, BN-normalised per channel.

    Linear -> CCBN -> up x2 -> conv3x3 -> CCBN(eps) -> LeakyReLU(0.2) -> up x2 -> conv3x3 -> CCBN(eps)
    -> LeakyReLU(0.2) -> conv3x3 -> tanh -> BatchNorm2d(affine=False). Attribute names are the original's.
    """

    def __init__(self, num_classes, latent_dim=100, img_size=224, channels=3, ccbn_eps=0.8):
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(latent_dim, 128 * self.init_size ** 2))
        self.conv_blocks0_0 = CategoricalConditionalBatchNorm2d(num_classes, 128)
        self.conv_blocks1_0 = nn.Conv2d(128, 128, 3, stride=1, padding=1)
        self.conv_blocks1_1 = CategoricalConditionalBatchNorm2d(num_classes, 128, ccbn_eps)
        self.conv_blocks1_2 = nn.LeakyReLU(0.2, inplace=True)
        self.conv_blocks2_0 = nn.Conv2d(128, 64, 3, stride=1, padding=1)
        self.conv_blocks2_1 = CategoricalConditionalBatchNorm2d(num_classes, 64, ccbn_eps)
        self.conv_blocks2_2 = nn.LeakyReLU(0.2, inplace=True)
        self.conv_blocks2_3 = nn.Conv2d(64, channels, 3, stride=1, padding=1)
        self.conv_blocks2_4 = nn.Tanh()
        self.conv_blocks2_5 = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z, labels):
        out = self.l1(z).view(z.shape[0], 128, self.init_size, self.init_size)
        img = self.conv_blocks0_0(out, labels)
        img = F.interpolate(img, scale_factor=2)
        img = self.conv_blocks1_2(self.conv_blocks1_1(self.conv_blocks1_0(img), labels))
        img = F.interpolate(img, scale_factor=2)
        img = self.conv_blocks2_2(self.conv_blocks2_1(self.conv_blocks2_0(img), labels))
        return self.conv_blocks2_5(self.conv_blocks2_4(self.conv_blocks2_3(img)))
