"""The workloads' data: synthetic sets are deterministic and learnable-shaped, the real formats
(CIFAR-10 pickles, LSP's joints.mat + images) read from tiny files written here in exactly
those formats, broken files give one error naming the file, and the sample plan is
deterministic and augments as specified."""

import pickle

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from profiler.workloads import data


# --- synthetic ---------------------------------------------------------------------------------

def test_synthetic_cifar_is_deterministic_and_shaped():
    train, test = data.synthetic_cifar(7, train_size=300, test_size=50)
    again, _ = data.synthetic_cifar(7, train_size=300, test_size=50)
    other, _ = data.synthetic_cifar(8, train_size=300, test_size=50)
    assert train.images.shape == (300, 3, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (50, 3, 32, 32) and train.labels.dtype == np.int64
    np.testing.assert_array_equal(train.images, again.images)
    np.testing.assert_array_equal(train.labels, again.labels)
    assert not np.array_equal(train.images, other.images)
    assert set(np.unique(train.labels)) == set(range(10))


def test_synthetic_cifar_classes_are_separable():
    """Labels are not noise: the nearest class mean on held-out images beats chance by far."""
    train, test = data.synthetic_cifar(0, train_size=2000, test_size=500)
    x = train.images.reshape(len(train), -1).astype(np.float64)
    means = np.stack([x[train.labels == c].mean(axis=0) for c in range(10)])
    xt = test.images.reshape(len(test), -1).astype(np.float64)
    predicted = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == test.labels) > 0.9


def test_synthetic_cifar_default_size_is_fast():
    import time
    began = time.perf_counter()
    train, test = data.synthetic_cifar(0)
    assert (len(train), len(test)) == (50_000, 10_000)
    assert time.perf_counter() - began < 20      # "generated fast" (about 1 s here)


def test_synthetic_pose_samples():
    train, test = data.synthetic_pose(3, train_size=10, test_size=4)
    image, joints, visible = train.sample(5)
    assert image.shape == (3, 220, 220) and image.dtype == np.uint8
    assert joints.shape == (28,) and joints.dtype == np.float32
    assert visible.shape == (28,) and set(np.unique(visible)) <= {0.0, 1.0}
    assert np.all(np.abs(joints) <= 0.5)
    np.testing.assert_array_equal(visible[0::2], visible[1::2])
    again = data.synthetic_pose(3, train_size=10, test_size=4)[0].sample(5)
    for a, b in zip((image, joints, visible), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(test.sample(3)[1], train.sample(3)[1])
    # Each visible joint is drawn where its coordinates say (its colour at that pixel).
    j = int(np.flatnonzero(visible[0::2])[0])
    x, y = np.round((joints[2 * j:2 * j + 2] + 0.5) * 220).astype(int)
    assert image[:, y, x].min() >= 80
    with pytest.raises(IndexError, match="out of range"):
        train.sample(10)


# --- CIFAR-10 pickles --------------------------------------------------------------------------

def write_cifar(root, per_batch=6, seed=0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        written[name] = batch
    return folder, written


def test_read_cifar10(tmp_path):
    folder, written = write_cifar(tmp_path)
    for path in (tmp_path, folder):
        train, test = data.read_cifar10(path)
        assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
        # CIFAR's row layout: 1024 red, then green, then blue values, row-major.
        np.testing.assert_array_equal(train.images[7],
                                      written["data_batch_2"][b"data"][1].reshape(3, 32, 32))
        np.testing.assert_array_equal(test.labels, written["test_batch"][b"labels"])


def test_read_cifar10_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.read_cifar10(tmp_path / "nope")
    folder, _ = write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3: no such file"):
        data.read_cifar10(tmp_path)
    (tmp_path / "b").mkdir()
    folder, _ = write_cifar(tmp_path / "b")
    content = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(content[:len(content) // 2])
    with pytest.raises(data.DataFormatError, match="data_batch_4: not a readable CIFAR-10"):
        data.read_cifar10(folder)
    with open(folder / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(data.DataFormatError, match=r"data_batch_4: b'data': expected uint8"):
        data.read_cifar10(folder)
    with open(folder / "data_batch_4", "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(data.DataFormatError, match="data_batch_4: expected a dict"):
        data.read_cifar10(folder)
    with open(folder / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, f)
    with pytest.raises(data.DataFormatError, match="labels': expected 2 labels in 0..9"):
        data.read_cifar10(folder)


# --- LSP ---------------------------------------------------------------------------------------

def write_lsp(root, n=4, layout="lsp", size=(150, 100)):
    """n JPEGs of ``size`` (width, height) and a joints.mat in LSP's (3, 14, N) layout (x, y,
    occluded flag) or LSP-extended's (14, 3, N) (x, y, visible flag)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    width, height = size
    xy = rng.uniform([0, 0], [width, height], size=(n, 14, 2))
    visible = rng.random((n, 14)) > 0.3
    for i in range(n):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"im{i + 1:04d}.jpg", quality=95)
    if layout == "lsp":
        joints = np.concatenate([xy, (~visible)[..., None]], axis=2).transpose(2, 1, 0)
    else:
        joints = np.concatenate([xy, visible[..., None]], axis=2).transpose(1, 2, 0)
    savemat(root / "joints.mat", {"joints": joints})
    return xy, visible


@pytest.mark.parametrize("layout", ["lsp", "lspet"])
def test_read_lsp(tmp_path, layout):
    xy, visible = write_lsp(tmp_path, layout=layout)
    train, test = data.read_lsp(tmp_path)
    assert (len(train), len(test)) == (2, 2)
    image, joints, vis = test.sample(1)
    assert image.shape == (3, 220, 220) and image.dtype == np.uint8
    np.testing.assert_allclose(joints.reshape(14, 2), xy[3] / [150, 100] - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(vis, np.repeat(visible[3], 2).astype(np.float32))
    # The flag's meaning can be forced: read the other way it inverts.
    flipped = data.read_lsp(tmp_path, flag_means="visible" if layout == "lsp" else "occluded")
    np.testing.assert_array_equal(flipped[1].sample(1)[2], 1 - vis)


def test_read_lsp_missing_and_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match="joints.mat: no such file"):
        data.read_lsp(tmp_path)
    write_lsp(tmp_path)
    (tmp_path / "joints.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(data.DataFormatError, match="joints.mat: not a readable MATLAB file"):
        data.read_lsp(tmp_path)
    savemat(tmp_path / "joints.mat", {"points": np.zeros((3, 14, 4))})
    with pytest.raises(data.DataFormatError, match="joints.mat: no variable 'joints'"):
        data.read_lsp(tmp_path)
    savemat(tmp_path / "joints.mat", {"joints": np.zeros((2, 14, 4))})
    with pytest.raises(data.DataFormatError, match=r"expected shape \(3, 14, N\)"):
        data.read_lsp(tmp_path)
    savemat(tmp_path / "joints.mat", {"joints": np.zeros((3, 14, 5))})
    with pytest.raises(data.DataFormatError, match="expected one image per joints.mat sample"):
        data.read_lsp(tmp_path)
    savemat(tmp_path / "joints.mat", {"joints": np.zeros((3, 14, 4))})
    (tmp_path / "images" / "im0002.jpg").write_bytes(b"not a jpeg")
    train, _ = data.read_lsp(tmp_path)
    with pytest.raises(data.DataFormatError, match="im0002.jpg: not a readable image"):
        train.sample(1)
    with pytest.raises(ValueError, match="flag_means: expected"):
        data.read_lsp(tmp_path, flag_means="maybe")


def test_load_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind: expected"):
        data.load_dataset("video")
    with pytest.raises(TypeError, match="data: expected 'synthetic' or a path"):
        data.load_dataset("pose", 3)
    with pytest.raises(FileNotFoundError, match="no such"):
        data.load_dataset("pose", str(tmp_path / "missing"))


# --- the sample plan ---------------------------------------------------------------------------

def test_plan_is_deterministic_per_seed_and_epoch():
    a = data.make_plan(10, 3, seed=5, epochs=2, augment=True)
    b = data.make_plan(10, 3, seed=5, epochs=2, augment=True)
    c = data.make_plan(10, 3, seed=6, epochs=2, augment=True)
    for field in ("index", "crop_y", "crop_x", "flip"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.index, c.index)
    assert len(a) == 18 and a.batches == 6          # 3 whole batches per epoch of 10
    first, second = a.index[:9], a.index[9:]
    assert len(set(first)) == 9 and len(set(second)) == 9
    assert not np.array_equal(first, second)        # a fresh order every epoch
    assert a.crop_y.min() >= 0 and a.crop_y.max() <= 8 and a.flip.any() and not a.flip.all()
    plain = data.make_plan(10, 5, shuffle=False)
    np.testing.assert_array_equal(plain.index, np.arange(10))
    assert not plain.flip.any() and set(plain.crop_x) == {4}


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=10, batch_size=0), "batch_size: expected a positive int"),
    (dict(n=10, batch_size=11), "batch_size: expected at most the dataset size 10"),
    (dict(n=10, batch_size=2, epochs=0), "epochs: expected a positive int"),
    (dict(n=10, batch_size=True), "batch_size: expected a positive int"),
])
def test_plan_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.make_plan(**kwargs)


def test_augment_image_pads_crops_and_flips():
    image = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    np.testing.assert_array_equal(data.augment_image(image, 2, 2, False, pad=2), image)
    shifted = data.augment_image(image, 0, 3, False, pad=2)   # 2 rows up, 1 column left
    np.testing.assert_array_equal(shifted[:, 2:, :4], image[:, :2, 1:])
    assert not shifted[:, :2].any() and not shifted[:, :, 4].any()
    np.testing.assert_array_equal(data.augment_image(image, 2, 2, True, pad=2),
                                  image[:, :, ::-1])


def test_sample_stream_applies_plan_and_standardises():
    train, _ = data.synthetic_cifar(0, train_size=20, test_size=1)
    plan = data.make_plan(20, 4, seed=1, augment=True)
    stream = data.SampleStream(train, plan)
    x, label = stream[5]
    i = plan.index[5]
    expected = data.augment_image(train.images[i], plan.crop_y[5], plan.crop_x[5],
                                  plan.flip[5]).astype(np.float32) / 255
    np.testing.assert_allclose(x, expected, rtol=1e-7)
    assert x.dtype == np.float32 and label == train.labels[i]
    images, labels = stream.batch(1)
    assert images.shape == (4, 3, 32, 32) and labels.dtype == np.int64
    mean, std = data.channel_stats(train.images)
    x_std = data.SampleStream(train, plan, mean, std)[5][0]
    np.testing.assert_allclose(x_std, (x - mean[:, None, None]) / std[:, None, None],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="indexes up to 19, dataset has 5 samples"):
        data.SampleStream(data.synthetic_cifar(0, train_size=5, test_size=1)[0], plan)
