"""Data for FDDA: ImageNet transforms, the validation loader and the calibration set (one image per class)."""
import torch
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import Dataset

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


def loader(dataset, batch_size, shuffle, workers=0, drop_last=False, sampler=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=workers, drop_last=drop_last,
                                       pin_memory=torch.cuda.is_available())
