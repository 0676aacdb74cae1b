"""Data of the AlignQ experiments on top of common/data.py; MNIST-M is implemented here (common/ lacks it).

CIFAR-10 (cifar-10-batches-py or train/test class folders, also under <root>/cifar10), SVHN (.mat),
MNIST (idx), MNIST-M, Office-31 (`office31/<domain>/images/<class>/*.jpg`, 80/20 per-class split).
Transforms are the original's, per experiment.
"""
import os

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader

from common.data import ArrayDataset, cifar10, data_root, mnist, office31, office31_split, svhn
from common.errors import UserError

CIFAR_NORM = T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
IMAGENET_NORM = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
HALF_NORM3 = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def default_data_dir():
    """The project's data root: $QUANTLAB_DATA, else ./data (common.data.data_root)."""
    return data_root()


def _sub(root, name):
    """`root/name` when it exists (the shared layout), else `root` itself."""
    p = os.path.join(root, name)
    return p if os.path.isdir(p) else root


def mnist_m(root, train=True, transform=None, flag="--data_dir"):
    """MNIST-M: `<root>/MNISTM/processed/mnist_m_{train,test}.pt` (the original's MNISTM class: a (uint8 N x 28 x 28
    x 3, int64 N) pair) or Ganin's release `<root>/mnist_m/mnist_m_{train,test}/*.png` + `mnist_m_{train,test}_labels.txt`."""
    split = "train" if train else "test"
    cands = [os.path.join(r, "MNISTM", "processed", f"mnist_m_{split}.pt") for r in (root, _sub(root, "mnistm"))]
    pt = next((p for p in cands if os.path.isfile(p)), None)
    if pt is not None:
        try:
            data, targets = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"MNIST-M file {pt} is unreadable ({type(e).__name__}); expected a (data, targets) "
                            f"pair of tensors") from None
        if data.dtype != torch.uint8 or data.dim() != 4 or tuple(data.shape[1:]) != (28, 28, 3) \
                or len(data) != len(targets):
            raise UserError(f"MNIST-M file {pt} must hold uint8 N x 28 x 28 x 3 images and N labels")
        return ArrayDataset(data.numpy(), name="MNIST-M", split=split, root=root, classes=[str(i) for i in range(10)],
                            targets=[int(t) for t in targets], transform=transform,
                            n_official=59001 if train else 9001)
    d = os.path.join(_sub(root, "mnist_m"), f"mnist_m_{split}")
    labels = os.path.join(_sub(root, "mnist_m"), f"mnist_m_{split}_labels.txt")
    if not (os.path.isdir(d) and os.path.isfile(labels)):
        raise UserError(f"MNIST-M not found under {root}: expected MNISTM/processed/mnist_m_{split}.pt or "
                        f"mnist_m/mnist_m_{split}/*.png + mnist_m/mnist_m_{split}_labels.txt; pass {flag} PATH")
    from PIL import Image
    with open(labels) as f:
        rows = [line.split() for line in f if line.strip()]
    imgs = []
    for name, _ in rows:
        with Image.open(os.path.join(d, name)) as im:
            imgs.append(np.asarray(im.convert("RGB").resize((28, 28))))
    return ArrayDataset(np.stack(imgs), name="MNIST-M", split=split, root=root, classes=[str(i) for i in range(10)],
                        targets=[int(t) for _, t in rows], transform=transform, n_official=59001 if train else 9001)


def _loader(ds, batch, shuffle, args, device):
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=args.workers,
                      pin_memory=device.type == "cuda", drop_last=False)


def classification_loaders(args, device, test_only=False):
    """(train loader or None, test loader) for cifar10 / svhn experiments."""
    root = args.data_dir or default_data_dir()
    if args.dataset == "svhn":
        tf = T.Compose([T.ToTensor(), HALF_NORM3])
        test = svhn(_sub(root, "svhn"), "test", transform=tf, flag="--data_dir")
        train = None if test_only else svhn(_sub(root, "svhn"), "train", transform=tf, flag="--data_dir")
    elif args.dataset == "cifar10":
        test = cifar10(_sub(root, "cifar10"), train=False, transform=T.Compose([T.ToTensor(), CIFAR_NORM]),
                       flag="--data_dir")
        train = None if test_only else cifar10(
            _sub(root, "cifar10"), train=True, flag="--data_dir",
            transform=T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), CIFAR_NORM]))
    else:
        raise UserError(f"--dataset {args.dataset!r} is not one of this experiment's datasets (cifar10, svhn)")
    return (None if train is None else _loader(train, args.train_batch_size, True, args, device),
            _loader(test, args.eval_batch_size, False, args, device))


def _digits(name, root, train):
    if name == "mnist":
        tf = T.Compose([T.Resize((28, 28)), T.ToTensor(), T.Normalize(mean=(0.5,), std=(0.5,))])
        return mnist(root, train=train, transform=tf, flag="--data_dir")
    if name == "mnistm":
        return mnist_m(root, train=train, transform=T.Compose([T.Resize((28, 28)), T.ToTensor(), HALF_NORM3]))
    raise UserError(f"digit domain {name!r} is not supported: choose mnist or mnistm")


def _office(root, domain, split, size=224, seed=1):
    """(train, test) of one Office-31 domain: 80/20 per-class split, or the whole domain for both.
    Resize((256, 256)) then a 224 crop as the original (`size` scales both; tests use small images)."""
    r = size * 256 // 224
    train_tf = T.Compose([T.Resize((r, r)), T.RandomCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          IMAGENET_NORM])
    test_tf = T.Compose([T.Resize((r, r)), T.CenterCrop(size), T.ToTensor(), IMAGENET_NORM])
    ds = office31(root, domain, transform=train_tf, flag="--data_dir")
    if split:
        return office31_split(ds, 0.8, seed=seed, test_transform=test_tf)
    return ds, office31(root, domain, transform=test_tf, flag="--data_dir")


def domain_loaders(args, device):
    """{'src_train', 'src_test', 'tgt_train', 'tgt_test'} loaders for dann/dsan experiments."""
    root = args.data_dir or default_data_dir()
    out = {}
    for side, name, split in (("src", args.src_data, args.src_split and args.train_split),
                              ("tgt", args.tgt_data, args.tgt_split and args.train_split)):
        if args.dataset == "office31":
            train, test = _office(root, name, split, args.img_size)
        else:
            train, test = _digits(name, root, True), _digits(name, root, False)
        out[f"{side}_train"] = _loader(train, args.train_batch_size, True, args, device)
        out[f"{side}_test"] = _loader(test, args.eval_batch_size, False, args, device)
    return out
