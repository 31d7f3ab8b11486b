"""Stand-ins for the torchvision transforms train_dreambooth.py uses: Resize (shorter side, bilinear), Center/RandomCrop,
ToTensor ([0, 1], CHW), Normalize. At --resolution 32 on 32 px photos Resize and the crops are identities."""
from __future__ import annotations

import enum
import random

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    BILINEAR = Image.BILINEAR


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    def __init__(self, size: int, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if min(w, h) == self.size:
            return img
        scale = self.size / min(w, h)
        return img.resize((round(w * scale), round(h * scale)), self.interpolation.value)


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left, top = random.randint(0, w - self.size), random.randint(0, h - self.size)
        return img.crop((left, top, left + self.size, top + self.size))


class ToTensor:
    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
