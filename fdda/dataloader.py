"""Data for FDDA: ImageNet transforms, the validation loader (images that cannot be decoded are skipped and
counted: SkipUnreadable) and the calibration set (one image per class)."""
import sys

import torch
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import Dataset, Subset, default_collate

from common import data as cdata
from common.errors import UserError

NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def test_transform(img_size=224):
    """Resize 256 -> CenterCrop 224 (kept in proportion for other image sizes)."""
    return transforms.Compose([transforms.Resize(img_size * 256 // 224), transforms.CenterCrop(img_size),
                               transforms.ToTensor(), NORMALIZE])


def train_transform(img_size=224):
    return transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), NORMALIZE])


def imagenet_split(data_path, split, transform=None):
    """common.data's ImageNet ImageFolder; bad or missing data is one line naming --dataPath / FDDA_DATA."""
    return cdata.imagenet(data_path, split, transform, flag="--dataPath")


class CalibrationSet(Dataset):
    """The images chosen by BNScenters.py (one per class), with the training augmentation; items are
    (image, path, label) as the original's imagenet_dataset."""

    def __init__(self, path_label, img_size=224):
        self.items = [path_label[c] for c in sorted(path_label)]
        self.transform = train_transform(img_size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except OSError as e:
            raise UserError(f"calibration image {path} (chosen by BNScenters.py) cannot be read ({type(e).__name__})"
                            f"; re-run BNScenters.py on the current dataset") from None
        return self.transform(img), path, label


# what PIL raises for a file it cannot decode (UnidentifiedImageError and truncated data are OSErrors; some
# malformed PNG chunks raise SyntaxError); a missing or unreadable file is an OSError too
DECODE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


class Unreadable:
    """Stands in for a validation image that cannot be decoded: its path and why (collate_skipping drops it)."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason


class SkipUnreadable(Dataset):
    """The validation ImageFolder (common.data), with every image that cannot be decoded replaced by an
    Unreadable item instead of stopping the run at its first evaluation (the original crashed there, possibly
    after days of training). Only the decoding is guarded: the transform and the labels are the dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.classes, self.samples = dataset.classes, dataset.samples

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            img = self.dataset.image(i)
        except DECODE_ERRORS as e:
            return Unreadable(self.samples[i][0], f"{type(e).__name__}: {' '.join(str(e).split())[:100]}")
        tf = self.dataset.transform
        return (tf(img) if tf is not None else img), int(self.dataset.targets[i])


_REPORTED = set()       # paths already named: a file is named once per process, however often it is evaluated


def report_unreadable(items, say=None):
    """Name each skipped file once (say: a log's info, default stderr); returns how many were skipped."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for u in items:
        if u.path not in _REPORTED:
            _REPORTED.add(u.path)
            say(f"warning: validation image {u.path} cannot be decoded ({u.reason}): skipped, left out of the "
                f"accuracy and counted in the record (skipped_unreadable)")
    return len(items)


def collate_skipping(batch):
    """(images, labels, [Unreadable ...]) of a batch; images and labels are None when no item was readable."""
    gone = [b for b in batch if isinstance(b, Unreadable)]
    kept = [b for b in batch if not isinstance(b, Unreadable)]
    if not kept:
        return None, None, gone
    images, labels = default_collate(kept)
    return images, labels, gone


def loader(dataset, batch_size, shuffle, workers=0, drop_last=False, sampler=None):
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=workers, drop_last=drop_last,
                                       pin_memory=torch.cuda.is_available(),
                                       collate_fn=collate_skipping if isinstance(base, SkipUnreadable) else None)
