"""ALQ on VGG_small / CIFAR-10:  python vgg.py --PRETRAIN --ALQ --POSTTRAIN  (Qu et al., CVPR 2020).

Published (README): 0.66 bits/weight, 1.29 MB weight storage, 92.0 % top-1.
"""
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from alq.options import alq_argparser
from alq.stages import pretrain, run_pipeline
from alq.train import lr_x02_every_30, split_indices
from common.data import cifar10
from common.errors import run_main

DEFAULTS = dict(val_size=5000, model_ori="./vgg_small_model_ori.pth", model="./vgg_small_model.pth", lr=1e-3, R=5,
                epoch_basis=20, epoch_coord=10, ld_coord=0.8, pr=0.4, top_k=0.002,
                structure=["channelwise"] + ["pixelwise"] * 5 + ["subchannelwise"] * 3,
                subc=[0, 0, 0, 0, 0, 0, 16, 2, 2], max_bit=[6] * 9, batch_size=128, workers=8,
                pretrain_epochs=100, post_epochs=[50, 20])
NORMALIZE = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


class VGG_small(torch.nn.Module):
    """6 conv (128,128,256,256,512,512; MaxPool before BN on every 2nd) + FC 8192-1024-1024-10 with BN1d."""

    def __init__(self):
        super().__init__()

        def conv(cin, cout, pool):
            layers = [torch.nn.Conv2d(cin, cout, kernel_size=3, padding=1)]
            if pool:
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            return layers + [torch.nn.BatchNorm2d(cout, affine=True, momentum=0.1), torch.nn.ReLU(inplace=True)]
        self.features = torch.nn.Sequential(*conv(3, 128, False), *conv(128, 128, True), *conv(128, 256, False),
                                            *conv(256, 256, True), *conv(256, 512, False), *conv(512, 512, True))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(512 * 4 * 4, 1024),
            torch.nn.BatchNorm1d(1024, affine=True, momentum=0.1),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(1024, 1024),
            torch.nn.BatchNorm1d(1024, affine=True, momentum=0.1),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(1024, 10),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def make_loaders(args):
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), NORMALIZE])
    test_tf = transforms.Compose([transforms.ToTensor(), NORMALIZE])
    train_full = cifar10(args.data, train=True, transform=train_tf, download=True)
    test_set = cifar10(args.data, train=False, transform=test_tf, download=True)
    val_idx, train_idx = split_indices(len(train_full), args.val_size, args.seed)
    if args.train_limit:
        train_idx = train_idx[:args.train_limit]
    # the original validates on a split of the augmented training set; --val_no_aug uses the test transform
    val_src = cifar10(args.data, train=True, transform=test_tf) if args.val_no_aug else train_full
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=torch.cuda.is_available())
    return (DataLoader(Subset(train_full, train_idx.tolist()), shuffle=True, **kw),
            DataLoader(Subset(val_src, val_idx.tolist()), shuffle=False, **kw),
            DataLoader(test_set, shuffle=False, **kw))


def pretrain_recipe(ctx):
    """Adam lr 5e-2, lr *= 0.2 at epochs 0, 30, 60, 90; the best-validation model is kept."""
    return pretrain(ctx, lambda net: torch.optim.Adam(net.parameters(), lr=5e-2), lr_x02_every_30,
                    ctx.args.pretrain_epochs)


def get_parser():
    return alq_argparser("ALQ: adaptive loss-aware quantization of VGG_small on CIFAR-10", DEFAULTS,
                         "CIFAR10 dataset directory (cifar-10-batches-py, or train/<class>/*.png and "
                         "test/<class>/*.png; downloaded if missing and the network allows)")


def main(argv=None):
    args = get_parser().parse_args(argv)
    run_pipeline(args, "vgg", "cifar10", VGG_small, make_loaders, pretrain_recipe)


if __name__ == "__main__":
    run_main(main)
