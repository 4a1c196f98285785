"""The workloads' data, framework-free: datasets, readers of the real formats, and the sample
plan that makes every framework's loader deliver the same batches.

Datasets hold uint8 NCHW images (as CIFAR-10 stores them) and their targets. A
:class:`SamplePlan` fixes, from one seed, which sample goes where in which epoch and how it is
augmented (crop offsets, flips); a :class:`SampleStream` applies the plan. Every framework's
loader (``profiler.workloads.<framework>_base``) reads a SampleStream, or the plan's arrays,
so the same seed gives the same batches in every framework, augmentation included. Nothing here
imports a framework.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

CIFAR_CLASSES = 10
CIFAR_IMAGE_SHAPE = (3, 32, 32)
CIFAR_TRAIN_SIZE, CIFAR_TEST_SIZE = 50_000, 10_000
CIFAR_PAD = 4                      # augmentation: pad 4 pixels, random 32x32 crop, h-flip

POSE_IMAGE_SIZE = 220              # DeepPose's AlexNet input
POSE_JOINTS = 14                   # LSP's 14 joints
POSE_TRAIN_SIZE, POSE_TEST_SIZE = 1_000, 1_000   # LSP's split: first 1000 train, last 1000 test

SPLITS = ("train", "test")


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (names the file)."""


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

@dataclass
class ClassificationData:
    """Images (N, 3, H, W) uint8 and labels (N,) int64, in memory (CIFAR-10 is 180 MB)."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, i: int) -> Tuple[np.ndarray, np.int64]:
        return self.images[i], self.labels[i]


class PoseData:
    """Pose samples: image (3, 220, 220) uint8, joints (2J,) float32 as x0, y0, x1, y1, ...
    in image coordinates scaled to [-0.5, 0.5], visibility (2J,) float32 (1 visible, 0 not;
    both coordinates of a joint share its flag). Samples are produced on access, as a real
    pipeline decodes JPEGs on access, so the loader's workers have real work."""

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


def _class_templates(seed: int) -> np.ndarray:
    """One smooth random pattern per class (10, 3, 32, 32) in [0, 255]: what makes the
    synthetic CIFAR task learnable (labels are not noise)."""
    rng = np.random.default_rng([seed, 0xC1FA])
    coarse = rng.uniform(0, 255, size=(CIFAR_CLASSES, 3, 4, 4))
    return np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)


def synthetic_cifar(seed: int = 0, *, train_size: int = CIFAR_TRAIN_SIZE,
                    test_size: int = CIFAR_TEST_SIZE) -> Tuple[ClassificationData,
                                                                ClassificationData]:
    """CIFAR-shaped data (32x32x3 uint8, 10 classes), deterministic from ``seed``: each image
    is its class's smooth template (60%) plus uniform noise (40%). 60,000 images take about a
    second."""
    for name, size in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"synthetic_cifar: {name}: expected a positive int, got {size!r}")
    templates = (_class_templates(seed) * 3).astype(np.uint16)
    out = []
    for split, size in enumerate((train_size, test_size)):
        rng = np.random.default_rng([seed, split])
        labels = rng.integers(0, CIFAR_CLASSES, size=size, dtype=np.int64)
        images = np.empty((size,) + CIFAR_IMAGE_SHAPE, np.uint8)
        for start in range(0, size, 8192):        # chunks keep the uint16 temporaries small
            stop = min(start + 8192, size)
            noise = rng.integers(0, 256, size=(stop - start,) + CIFAR_IMAGE_SHAPE,
                                 dtype=np.uint16)
            images[start:stop] = (templates[labels[start:stop]] + 2 * noise) // 5
        out.append(ClassificationData(images, labels))
    return out[0], out[1]


def _read_cifar_batch(path: Path) -> ClassificationData:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10: {path}: no such file (expected the Python-pickle "
                                f"layout, cifar-10-batches-py/data_batch_1..5 and test_batch)")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, ImportError) as e:
        raise DataFormatError(f"CIFAR-10: {path}: not a readable CIFAR-10 pickle (truncated "
                              f"or another format): {type(e).__name__}: {e}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataFormatError(f"CIFAR-10: {path}: expected a dict with b'data' and b'labels', "
                              f"got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"CIFAR-10: {path}: b'data': expected uint8 (N, 3072), got "
                              f"{data.dtype} {data.shape}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0
                                                         or labels.max() >= CIFAR_CLASSES)):
        raise DataFormatError(f"CIFAR-10: {path}: b'labels': expected {len(data)} labels in "
                              f"0..9, got shape {labels.shape}")
    return ClassificationData(data.reshape((-1,) + CIFAR_IMAGE_SHAPE), labels)


def read_cifar10(path) -> Tuple[ClassificationData, ClassificationData]:
    """CIFAR-10 from its Python-pickle layout: ``path`` is the ``cifar-10-batches-py`` folder
    (or its parent) holding data_batch_1..5 and test_batch. Every problem raises one error
    naming the file."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10: {root}: no such directory")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    train = ClassificationData(np.concatenate([p.images for p in parts]),
                               np.concatenate([p.labels for p in parts]))
    return train, _read_cifar_batch(root / "test_batch")


# A standing stick figure in [-1, 1] (LSP's joint order: right ankle, knee, hip, left hip,
# knee, ankle, right wrist, elbow, shoulder, left shoulder, elbow, wrist, neck, head top).
_FIGURE = np.array([[-0.3, 0.95], [-0.3, 0.5], [-0.2, 0.05], [0.2, 0.05], [0.3, 0.5],
                    [0.3, 0.95], [-0.6, 0.1], [-0.5, -0.3], [-0.3, -0.6], [0.3, -0.6],
                    [0.5, -0.3], [0.6, 0.1], [0.0, -0.7], [0.0, -0.95]])
_JOINT_COLOURS = (np.random.default_rng(0x7015).uniform(80, 255, size=(POSE_JOINTS, 3))
                  .astype(np.uint8))


class SyntheticPoseData(PoseData):
    """DeepPose-shaped samples rendered on access, deterministic from (seed, split, index): a
    dark noisy background and, for every visible joint, a 7x7 square in that joint's colour at
    the joint's position (a jittered, scaled, shifted stick figure; ~10% of joints hidden)."""

    def __init__(self, seed: int, split: str, size: int):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"SyntheticPoseData: size: expected a positive int, got {size!r}")
        self.seed, self.split_id, self.size = seed, SPLITS.index(split), int(size)

    def __len__(self) -> int:
        return self.size

    def sample(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(f"SyntheticPoseData: index {i} out of range 0..{self.size - 1}")
        rng = np.random.default_rng([self.seed, 0x905E, self.split_id, int(i)])
        s = POSE_IMAGE_SIZE
        image = rng.integers(0, 60, size=(3, s, s), dtype=np.uint8)
        centre = rng.uniform(0.35 * s, 0.65 * s, size=2)
        scale = rng.uniform(0.2 * s, 0.3 * s)
        xy = centre + scale * (_FIGURE + rng.normal(0, 0.05, size=_FIGURE.shape))
        xy = np.clip(xy, 4, s - 5)
        visible = rng.random(POSE_JOINTS) > 0.1
        for j in np.flatnonzero(visible):
            x, y = int(round(xy[j, 0])), int(round(xy[j, 1]))
            image[:, y - 3:y + 4, x - 3:x + 4] = _JOINT_COLOURS[j][:, None, None]
        joints = (xy / s - 0.5).astype(np.float32).reshape(-1)
        return image, joints, np.repeat(visible, 2).astype(np.float32)


def synthetic_pose(seed: int = 0, *, train_size: int = POSE_TRAIN_SIZE,
                   test_size: int = POSE_TEST_SIZE) -> Tuple[PoseData, PoseData]:
    """Synthetic DeepPose data (220x220 images, 14 joints with visibility), train and test."""
    return (SyntheticPoseData(seed, "train", train_size),
            SyntheticPoseData(seed, "test", test_size))


class LSPData(PoseData):
    """LSP samples: JPEG decoded with Pillow on access and resized to 220x220 (bilinear; the
    joints scaled with it: a whole-image resize, not DeepPose's person crop)."""

    def __init__(self, image_paths, joints_xy: np.ndarray, visible: np.ndarray):
        self.image_paths, self.joints_xy, self.visible = list(image_paths), joints_xy, visible

    def __len__(self) -> int:
        return len(self.image_paths)

    def sample(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path = self.image_paths[i]
        try:
            with Image.open(path) as im:
                width, height = im.size
                rgb = im.convert("RGB").resize((POSE_IMAGE_SIZE, POSE_IMAGE_SIZE),
                                               Image.BILINEAR)
        except (OSError, UnidentifiedImageError) as e:
            raise DataFormatError(f"LSP: {path}: not a readable image: {e}") from None
        image = np.ascontiguousarray(np.asarray(rgb, np.uint8).transpose(2, 0, 1))
        joints = (self.joints_xy[i] / np.array([width, height]) - 0.5).astype(np.float32)
        return image, joints.reshape(-1), np.repeat(self.visible[i], 2).astype(np.float32)


def read_lsp(path, *, flag_means: str = "auto") -> Tuple[LSPData, LSPData]:
    """The LSP layout: ``path`` holds ``joints.mat`` (a ``joints`` array, read with SciPy) and
    ``images/`` (im0001.jpg, ...; sorted names are matched to joints in order). Train = the
    first half, test = the second (LSP: 1000 + 1000).

    ``joints`` is (3, 14, N) as in LSP or (14, 3, N) as in LSP-extended: x, y and a flag.
    ``flag_means``: "visible" (1 = visible), "occluded" (1 = occluded) or "auto": LSP's
    (3, 14, N) file is read as an occlusion flag and LSP-extended's (14, 3, N) as a visibility
    flag, as the two datasets are commonly read.
    """
    from scipy.io import loadmat

    if flag_means not in ("auto", "visible", "occluded"):
        raise ValueError(f"read_lsp: flag_means: expected 'auto', 'visible' or 'occluded', "
                         f"got {flag_means!r}")
    root = Path(path)
    mat_path, image_dir = root / "joints.mat", root / "images"
    for p, what in ((root, "directory"), (mat_path, "file"), (image_dir, "directory")):
        if not p.exists():
            raise FileNotFoundError(f"LSP: {p}: no such {what} (expected joints.mat and "
                                    f"images/ under {root})")
    try:
        mat = loadmat(str(mat_path))
    except Exception as e:       # SciPy raises a zoo of types for a malformed .mat
        raise DataFormatError(f"LSP: {mat_path}: not a readable MATLAB file: "
                              f"{type(e).__name__}: {e}") from None
    if "joints" not in mat:
        raise DataFormatError(f"LSP: {mat_path}: no variable 'joints' (found "
                              f"{sorted(k for k in mat if not k.startswith('__'))})")
    joints = np.asarray(mat["joints"])
    if joints.ndim == 3 and joints.shape[:2] == (3, POSE_JOINTS):
        per_sample, default_flag = joints.transpose(2, 1, 0), "occluded"
    elif joints.ndim == 3 and joints.shape[:2] == (POSE_JOINTS, 3):
        per_sample, default_flag = joints.transpose(2, 0, 1), "visible"
    else:
        raise DataFormatError(f"LSP: {mat_path}: 'joints': expected shape (3, 14, N) or "
                              f"(14, 3, N), got {joints.shape}")
    if not np.issubdtype(per_sample.dtype, np.number) or not np.all(np.isfinite(per_sample)):
        raise DataFormatError(f"LSP: {mat_path}: 'joints': expected finite numbers")
    images = sorted(p for p in image_dir.iterdir()
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(images) != len(per_sample) or len(images) < 2:
        raise DataFormatError(f"LSP: {image_dir}: expected one image per joints.mat sample "
                              f"({len(per_sample)}, at least 2), found {len(images)}")
    flag = per_sample[:, :, 2] > 0.5
    visible = ~flag if (default_flag if flag_means == "auto" else flag_means) == "occluded" \
        else flag
    xy = per_sample[:, :, :2].astype(np.float64)
    half = len(images) // 2
    return (LSPData(images[:half], xy[:half], visible[:half]),
            LSPData(images[half:], xy[half:], visible[half:]))


def load_dataset(kind: str, data: str = "synthetic", *, seed: int = 0,
                 train_size: Optional[int] = None, test_size: Optional[int] = None):
    """(train, test) for ``kind`` "classification" (CIFAR-10) or "pose" (LSP): ``data`` is
    "synthetic" (built in, from ``seed``; sizes default to the real datasets') or a path."""
    if kind not in ("classification", "pose"):
        raise ValueError(f"load_dataset: kind: expected 'classification' or 'pose', got "
                         f"{kind!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"load_dataset: data: expected 'synthetic' or a path, got "
                        f"{type(data).__name__}")
    if data == "synthetic":
        sizes = {}
        if train_size is not None:
            sizes["train_size"] = train_size
        if test_size is not None:
            sizes["test_size"] = test_size
        return (synthetic_cifar if kind == "classification" else synthetic_pose)(seed, **sizes)
    return read_cifar10(data) if kind == "classification" else read_lsp(data)


# ---------------------------------------------------------------------------------------------
# The sample plan: order and augmentation, decided once, applied by every framework alike
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplePlan:
    """What the k-th sample of the stream is: ``index[k]`` into the dataset, cropped at
    (``crop_y[k]``, ``crop_x[k]``) of the padded image and mirrored where ``flip[k]``. Batches
    are consecutive runs of ``batch_size``; every epoch is whole batches (the rest dropped, so
    every step has the same shape)."""
    index: np.ndarray
    crop_y: np.ndarray
    crop_x: np.ndarray
    flip: np.ndarray
    batch_size: int
    augment: bool
    pad: int

    def __len__(self) -> int:
        return len(self.index)

    @property
    def batches(self) -> int:
        return len(self.index) // self.batch_size


def make_plan(n: int, batch_size: int, *, seed: int = 0, epochs: int = 1, shuffle: bool = True,
              augment: bool = False, pad: int = CIFAR_PAD) -> SamplePlan:
    """The plan for ``epochs`` passes over ``n`` samples, deterministic from ``seed``: a fresh
    permutation per epoch (or dataset order), and with ``augment`` a random crop offset in
    [0, 2*pad] per axis and a coin-flip mirror per sample."""
    for name, value in (("n", n), ("batch_size", batch_size), ("epochs", epochs)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"make_plan: {name}: expected a positive int, got {value!r}")
    if batch_size > n:
        raise ValueError(f"make_plan: batch_size: expected at most the dataset size {n}, got "
                         f"{batch_size}")
    per_epoch = n // batch_size * batch_size
    parts = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, 0x0DE7, epoch])
        parts.append(rng.permutation(n)[:per_epoch] if shuffle else np.arange(per_epoch))
    index = np.concatenate(parts).astype(np.int64)
    rng = np.random.default_rng([seed, 0xA06])
    if augment:
        crop_y = rng.integers(0, 2 * pad + 1, size=len(index))
        crop_x = rng.integers(0, 2 * pad + 1, size=len(index))
        flip = rng.random(len(index)) < 0.5
    else:
        crop_y = crop_x = np.full(len(index), pad)
        flip = np.zeros(len(index), bool)
    return SamplePlan(index, crop_y.astype(np.int64), crop_x.astype(np.int64), flip,
                      int(batch_size), bool(augment), int(pad))


def augment_image(image: np.ndarray, crop_y: int, crop_x: int, flip: bool,
                  pad: int = CIFAR_PAD) -> np.ndarray:
    """Zero-pad (C, H, W) by ``pad``, crop H x W at (crop_y, crop_x), mirror if ``flip``."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    out = padded[:, crop_y:crop_y + h, crop_x:crop_x + w]
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1] units (float32)."""
    x = images.astype(np.float64) / 255.0
    return (x.mean(axis=(0, 2, 3)).astype(np.float32), x.std(axis=(0, 2, 3)).astype(np.float32))


class SampleStream:
    """The plan applied to a dataset: ``stream[k]`` is the k-th sample as float32 arrays ready
    for a model: image (3, H, W) in [0, 1] (or standardised with ``mean``/``std``), then the
    targets (label int64, or joints and visibility float32). Picklable, so loader workers
    get their own copy."""

    def __init__(self, dataset, plan: SamplePlan, mean: Optional[np.ndarray] = None,
                 std: Optional[np.ndarray] = None):
        if len(plan) and int(plan.index.max()) >= len(dataset):
            raise ValueError(f"SampleStream: plan: indexes up to {int(plan.index.max())}, "
                             f"dataset has {len(dataset)} samples")
        self.dataset, self.plan, self.mean, self.std = dataset, plan, mean, std

    def __len__(self) -> int:
        return len(self.plan)

    def image_to_float(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32) * np.float32(1 / 255)
        if self.mean is not None:
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return x

    def __getitem__(self, k: int):
        p = self.plan
        image, *targets = self.dataset.sample(int(p.index[k]))
        if p.augment:
            image = augment_image(image, int(p.crop_y[k]), int(p.crop_x[k]), bool(p.flip[k]),
                                  p.pad)
        return (self.image_to_float(image), *targets)

    def batch(self, b: int):
        """The b-th batch, stacked (what every framework's loader must deliver)."""
        samples = [self[k] for k in range(b * self.plan.batch_size,
                                          (b + 1) * self.plan.batch_size)]
        return tuple(np.stack(column) for column in zip(*samples))
