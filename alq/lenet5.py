"""ALQ on LeNet5 / MNIST:  python lenet5.py --PRETRAIN --ALQ --POSTTRAIN  (Qu et al., CVPR 2020).

Published (README): 0.40 bits/weight, 22.7 KB weight storage, 99.1 % top-1.
MNIST is held in memory as tensors and batched directly (no per-image PIL work).
"""
import torch

from alq.distributed import TensorLoader
from alq.options import alq_argparser
from alq.stages import pretrain, run_pipeline
from alq.train import lr_x02_every_30, split_indices
from common.data import mnist
from common.errors import run_main

DEFAULTS = dict(val_size=10000, model_ori="./lenet5_model_ori.pth", model="./lenet5_model.pth", lr=1e-3, R=4,
                epoch_basis=20, epoch_coord=10, ld_coord=0.8, pr=0.8, top_k=0.005,
                structure=["kernelwise", "kernelwise", "subchannelwise", "subchannelwise"],
                subc=[0, 0, 2, 1], max_bit=[6, 6, 6, 6], batch_size=128, workers=1,
                pretrain_epochs=100, post_epochs=[50, 20])
MEAN, STD = 0.1307, 0.3081


class LeNet5(torch.nn.Module):
    """Conv(1,20,5) MaxPool ReLU Conv(20,50,5) MaxPool ReLU FC(800,500) ReLU FC(500,10) (pool before ReLU)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 20, 5, 1),
            torch.nn.MaxPool2d(2, 2),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(20, 50, 5, 1),
            torch.nn.MaxPool2d(2, 2),
            torch.nn.ReLU(inplace=True),
        )
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(4 * 4 * 50, 500),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(500, 10),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(-1, 4 * 4 * 50)
        return self.classifier(x)


def to_input(images):
    """uint8 (N, 28, 28) -> ToTensor + Normalize((0.1307,), (0.3081,)), vectorised, same arithmetic."""
    return images.unsqueeze(1).float().div(255).sub(MEAN).div(STD)


def make_loaders(args):
    train_full = mnist(args.data, train=True, download=True)
    test_set = mnist(args.data, train=False, download=True)
    val_idx, train_idx = split_indices(len(train_full.targets), args.val_size, args.seed)
    if args.train_limit:
        train_idx = train_idx[:args.train_limit]
    images, targets = torch.as_tensor(train_full.data), torch.as_tensor(train_full.targets)
    train = TensorLoader(images[train_idx], targets[train_idx], args.batch_size, shuffle=True, transform=to_input)
    val = TensorLoader(images[val_idx], targets[val_idx], args.batch_size, transform=to_input)
    test = TensorLoader(torch.as_tensor(test_set.data), torch.as_tensor(test_set.targets), args.batch_size,
                        transform=to_input)
    return train, val, test


def pretrain_recipe(ctx):
    """SGD lr 5e-2 momentum 0.5, lr *= 0.2 at epochs 0, 30, 60, 90; the best-validation model is kept."""
    return pretrain(ctx, lambda net: torch.optim.SGD(net.parameters(), lr=5e-2, momentum=0.5), lr_x02_every_30,
                    ctx.args.pretrain_epochs)


def get_parser():
    return alq_argparser("ALQ: adaptive loss-aware quantization of LeNet5 on MNIST", DEFAULTS,
                         "MNIST dataset directory (torchvision layout <data>/MNIST/raw; downloaded if missing and "
                         "the network allows)")


def main(argv=None):
    args = get_parser().parse_args(argv)
    run_pipeline(args, "lenet5", "mnist", LeNet5, make_loaders, pretrain_recipe)


if __name__ == "__main__":
    run_main(main)
