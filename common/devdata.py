"""Small datasets held on the training device as uint8 tensors, normalised and augmented in whole batches.

`DeviceLoader` replaces `DataLoader(dataset, transform=Compose([RandomCrop(32, padding=4),
RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)]))` for MNIST / CIFAR-10 (the arrays that
`common.data` already decodes once): no per-image PIL work, no worker processes, one gather per batch.

Same distribution as the torchvision pipeline, image by image: crop offsets (i, j) independent and uniform
over 0..2*pad (RandomCrop draws `randint(0, h + 2*pad - h + 1)`), zero padding (fill 0 on the uint8 image,
i.e. (0 - mean)/std after normalisation), then a horizontal flip with probability 1/2; shuffling is a
fresh permutation every epoch (RandomSampler), the last batch may be partial (drop_last=False).
Normalisation is the same float32 arithmetic as ToTensor + Normalize: (u8 / 255 - mean) / std.
The random numbers come from the device's generator, so the stream differs from the DataLoader's.

`DeviceSums` accumulates per-iteration loss/accuracy on the device and reads them (one host sync) only when
asked, so logging every --print-freq iterations does not synchronise every step on CUDA.
"""
import math

import numpy as np
import torch


def as_uint8_images(data):
    """N x H x W (grey) or N x H x W x C uint8 (numpy or torch) -> N x C x H x W uint8 tensor (CPU)."""
    t = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    if t.dtype != torch.uint8 or t.dim() not in (3, 4):
        raise ValueError(f"expected N x H x W [x C] uint8 images, got {tuple(t.shape)} {t.dtype}")
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)


def normalize(u8, mean, std):
    """torchvision ToTensor + Normalize on a uint8 N x C x H x W batch: (u8 / 255 - mean) / std in float32."""
    x = u8.to(torch.float32).div(255)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub(mean).div(std)


def crop_flip(u8, pad, flip, generator=None):
    """Random crop (zero padding `pad`, same output size) and random horizontal flip, per image, as one gather.

    Returns (images, offsets (N x 2: row, col), flipped (N bool)); offsets and flips are returned for tests.
    """
    n, _, h, w = u8.shape
    dev = u8.device
    if pad:
        off = torch.randint(0, 2 * pad + 1, (n, 2), device=dev, generator=generator)
        u8 = torch.nn.functional.pad(u8, (pad, pad, pad, pad))
    else:
        off = torch.zeros(n, 2, dtype=torch.long, device=dev)
    flipped = (torch.rand(n, device=dev, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool,
                                                                                               device=dev)
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = off[:, :1] + ar_h                                                   # N x h
    cols = off[:, 1:] + torch.where(flipped[:, None], w - 1 - ar_w, ar_w)      # N x w, reversed when flipped
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = u8.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]    # N x h x w x C
    return out.permute(0, 3, 1, 2).contiguous(), off, flipped


class DeviceLoader:
    """Batches (normalised float32 images, int64 labels) from uint8 images kept on `device`.

    dataset: a `common.data` ArrayDataset (its `.data` / `.targets`), kept as `.dataset` for len / size_note.
    crop_pad: RandomCrop padding (0: no crop); flip: RandomHorizontalFlip(0.5); shuffle: new order each epoch.
    """

    def __init__(self, dataset, batch_size, device, mean, std, shuffle=False, crop_pad=0, flip=False,
                 generator=None):
        self.dataset, self.batch_size, self.device = dataset, int(batch_size), torch.device(device)
        self.images = as_uint8_images(dataset.data).to(self.device)
        self.targets = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long).to(self.device)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} labels")
        self.mean, self.std = list(mean), list(std)
        self.shuffle, self.crop_pad, self.flip, self.generator = shuffle, crop_pad, flip, generator

    def __len__(self):
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self):
        n = len(self.targets)
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            u8, y = self.images[idx], self.targets[idx]
            if self.crop_pad or self.flip:
                u8 = crop_flip(u8, self.crop_pad, self.flip, self.generator)[0]
            yield normalize(u8, self.mean, self.std), y


class DeviceSums:
    """Weighted running sums of per-iteration scalars kept on the device; `read()` syncs once.

        sums = DeviceSums(device, 'loss', 'top1')
        sums.add(n, loss=loss, top1=prec)               # no host sync
        if i % print_freq == 0: sums.read(meters)       # meters: {'loss': AverageMeter, ...} get val/sum/count/avg
    """

    def __init__(self, device, *names):
        self.names = names
        self.total = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)   # sums..., count
        self.last = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, n, **values):
        last = torch.stack([values[k].detach().to(torch.float64).reshape(()) for k in self.names])
        self.last = last
        self.total += torch.cat([last * n, last.new_tensor([n])])

    def read(self, meters=None):
        """{name: (latest, average)} as floats; with `meters`, also sets their val/sum/count/avg."""
        both = torch.cat([self.total, self.last]).tolist()                  # the only host sync
        total, last = both[:len(self.names) + 1], both[len(self.names) + 1:]
        count = total[-1]
        out = {k: (last[i], total[i] / count if count else 0.0) for i, k in enumerate(self.names)}
        for k, m in (meters or {}).items():
            m.val, m.sum, m.count = last[self.names.index(k)], total[self.names.index(k)], int(count)
            m.avg = m.sum / m.count if m.count else 0.0
        return out
