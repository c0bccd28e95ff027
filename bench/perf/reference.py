"""The reference loader itself: OGM-GE's CREMA-D `__getitem__`, copied from the release, for
`mmbalance bench` to time beside the suite's paths.

Source: GeWu-Lab/OGM-GE_CVPR2022 at 343dc1d (2025-01-08), `dataset/CramedDataset.py`.
`__getitem__` (lines 54-97) is copied statement for statement: `librosa.load(sr=22050)`, tiled
3 times and cut to 3 s, clipped to [-1, 1], `librosa.stft(n_fft=512, hop_length=353)`,
log(|X| + 1e-7); the frame transform (RandomResizedCrop(224), RandomHorizontalFlip, ToTensor,
ImageNet Normalize; Resize((224, 224)) at test) built on every call as the release builds it;
`--fps` frames opened with PIL. The release's own quirks stay, since they are part of its cost
and its output: the random frame index is drawn and then ignored (the frames read are the first
`fps` entries of the unsorted `os.listdir`), and the spectrogram is returned as a numpy array.

Two changes, neither inside `__getitem__`: `self.args.fps` is the attribute `self.fps`, and the
constructor takes the clips' paths and labels instead of reading `data/CREMAD/{train,test}.csv`
(lines 16-48), so that the copy reads any folder laid out as the release reads it:
`<audio>/<clip>.wav` and `<visual>/Image-01-FPS/<clip>/*.jpg`.

Which librosa runs decides two things the release leaves to it: librosa >= 0.10 resamples with
soxr ("soxr_hq"; resampy's "kaiser_best" before) and librosa >= 0.9 pads the STFT with zeros
('reflect' before). librosa is the optional extra `pip install mmbalance[reference]`; without it this
module still imports (`librosa` is then None) and the bench says how to install it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

try:
    import librosa
except ModuleNotFoundError:  # the optional extra: the bench's reference row names it instead
    librosa = None


class CramedDataset(Dataset):
    """OGM-GE's CREMA-D dataset: every read decodes the clip's wav and `fps` frames."""

    def __init__(self, audio: list[str], image: list[str], label: list[int], mode: str = "train",
                 fps: int = 1) -> None:
        self.audio, self.image, self.label = audio, image, label
        self.mode = mode
        self.fps = fps

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, torch.Tensor, int]:
        # audio
        samples, rate = librosa.load(self.audio[idx], sr=22050)
        resamples = np.tile(samples, 3)[:22050 * 3]
        resamples[resamples > 1.] = 1.
        resamples[resamples < -1.] = -1.

        spectrogram = librosa.stft(resamples, n_fft=512, hop_length=353)
        spectrogram = np.log(np.abs(spectrogram) + 1e-7)

        if self.mode == "train":
            transform = transforms.Compose([
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ])
        else:
            transform = transforms.Compose([
                transforms.Resize(size=(224, 224)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ])

        # Visual
        image_samples = os.listdir(self.image[idx])
        select_index = np.random.choice(len(image_samples), size=self.fps, replace=False)
        select_index.sort()
        images = torch.zeros((self.fps, 3, 224, 224))
        for i in range(self.fps):
            img = Image.open(os.path.join(self.image[idx], image_samples[i])).convert("RGB")
            img = transform(img)
            images[i] = img

        images = torch.permute(images, (1, 0, 2, 3))

        # label
        label = self.label[idx]

        return spectrogram, images, label
