"""Device-resident data (common/devdata.py) against the torchvision pipeline it replaces.

Normalisation must be the same float32 bits as ToTensor + Normalize; a crop/flip must be exactly the crop of
the zero-padded image at its offsets (and mirrored); the offsets/flips must have torchvision's distribution
(uniform over 0..8 per axis, independent, flip probability 1/2). Random draws use fixed seeds, so the
statistical checks are deterministic; their bounds are explained where they are asserted.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from common.data import ArrayDataset
from common.devdata import DeviceLoader, DeviceSums, as_uint8_images, crop_flip, normalize
from common.meters import AverageMeter

CIFAR_MEAN, CIFAR_STD = [0.491, 0.482, 0.447], [0.247, 0.243, 0.262]


def _dataset(n, shape, seed=0):
    g = np.random.default_rng(seed)
    data = g.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return ArrayDataset(data, name="toy", split="train", root="/nonexistent", classes=[str(i) for i in range(10)],
                        targets=(np.arange(n) % 10).tolist(), transform=None, n_official=n)


@pytest.mark.parametrize("shape,mean,std", [((32, 32, 3), CIFAR_MEAN, CIFAR_STD), ((28, 28), [0.131], [0.308])])
def test_normalize_is_totensor_normalize_bit_for_bit(shape, mean, std):
    ds = _dataset(16, shape)
    tv = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    want = torch.stack([tv(ds.image(i)) for i in range(len(ds))])
    got = normalize(as_uint8_images(ds.data), mean, std)
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))
    # every uint8 value, every channel
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, len(mean), 16, 16)
    want = T.Normalize(mean, std)(every[0].float().div(255))
    assert torch.equal(normalize(every, mean, std)[0], want)


def test_crop_flip_is_the_padded_crop_at_the_drawn_offsets():
    u8 = as_uint8_images(_dataset(64, (32, 32, 3)).data)
    out, off, flipped = crop_flip(u8, 4, True, torch.Generator().manual_seed(0))
    assert out.shape == u8.shape and out.dtype == torch.uint8
    assert 0 < int(flipped.sum()) < 64
    for k in range(64):
        want = TF.crop(TF.pad(u8[k], [4]), int(off[k, 0]), int(off[k, 1]), 32, 32)   # fill 0, like RandomCrop
        if flipped[k]:
            want = TF.hflip(want)
        assert torch.equal(out[k], want), k
    # no augmentation: the images themselves
    assert torch.equal(crop_flip(u8, 0, False)[0], u8)


def test_crop_offsets_and_flips_have_torchvision_distribution():
    n = 45000
    u8 = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    _, off, flipped = crop_flip(u8, 4, True, torch.Generator().manual_seed(1))
    assert off.min() == 0 and off.max() == 8
    # joint (row, col) histogram over 81 cells, expected n/81 each: Pearson chi-square with 80 degrees of
    # freedom has mean 80 and sd 12.6; 150 is > 5 sd (p < 1e-8), so only a wrong distribution (e.g. offsets
    # 0..7, or rows equal to cols) fails; the seed is fixed, so the test is deterministic.
    joint = torch.bincount(off[:, 0] * 9 + off[:, 1], minlength=81).double()
    chi2 = ((joint - n / 81) ** 2 / (n / 81)).sum().item()
    assert chi2 < 150, chi2
    # flips: binomial(n, 1/2) has sd sqrt(n)/2 = 106; 5 sd around n/2
    assert abs(int(flipped.sum()) - n / 2) < 5 * 106
    # flips independent of offsets: flip rate per row offset within 5 sd (n/9 draws each, sd ~ 0.0071)
    for r in range(9):
        rate = flipped[off[:, 0] == r].double().mean().item()
        assert abs(rate - 0.5) < 5 * 0.0071, (r, rate)


def test_torchvision_draws_the_same_ranges():
    """The pipeline it replaces: RandomCrop(32, padding=4) offsets are 0..8, RandomHorizontalFlip p = 0.5."""
    i, j, h, w = T.RandomCrop.get_params(torch.zeros(3, 40, 40), (32, 32))
    seen = {T.RandomCrop.get_params(torch.zeros(3, 40, 40), (32, 32))[0] for _ in range(400)}
    assert seen == set(range(9)) and (h, w) == (32, 32)
    assert T.RandomHorizontalFlip().p == 0.5


def test_loader_epoch_order_batches_and_eval_pipeline():
    ds = _dataset(50, (32, 32, 3))
    loader = DeviceLoader(ds, 16, "cpu", CIFAR_MEAN, CIFAR_STD, shuffle=True, crop_pad=4, flip=True,
                          generator=torch.Generator().manual_seed(0))
    assert len(loader) == 4
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(ds.targets)                 # each image once per epoch
    assert labels.tolist() != ds.targets                                 # shuffled
    assert torch.cat([y for _, y in loader]).tolist() != labels.tolist()  # a new order every epoch
    # evaluation loader = DataLoader over ToTensor + Normalize, in order, bit for bit
    ev = DeviceLoader(ds, 16, "cpu", CIFAR_MEAN, CIFAR_STD)
    tv = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ds.transform = tv
    ref = list(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False))
    for (x, y), (xr, yr) in zip(ev, ref):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    # augmented pixels are values of the normalised padded image: zeros of the padding become -mean/std
    pad_value = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), CIFAR_MEAN, CIFAR_STD).view(3)
    x0 = batches[0][0]
    border = x0[:, :, 0, :]                                              # top rows: padding when offset < 4
    assert any(torch.equal(border[k, :, 0], pad_value) for k in range(16))


def test_mnist_shape_and_device_sums():
    ds = _dataset(10, (28, 28))
    x, y = next(iter(DeviceLoader(ds, 10, "cpu", [0.131], [0.308], flip=True)))
    assert x.shape == (10, 1, 28, 28)
    sums = DeviceSums("cpu", "loss", "top1")
    sums.add(4, loss=torch.tensor(2.0), top1=torch.tensor(50.0))
    sums.add(2, loss=torch.tensor(0.5), top1=torch.tensor(100.0))
    meters = {"loss": AverageMeter(), "top1": AverageMeter()}
    out = sums.read(meters)
    assert out == {"loss": (0.5, 1.5), "top1": (100.0, 200.0 / 3)}
    assert meters["loss"].val == 0.5 and meters["loss"].avg == 1.5 and meters["loss"].count == 6
