"""Dataset loading from real IDX files (gz, raw, torchvision layout) and the search path."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pytest
from helpers import make_idx, synthetic_digits, write_dataset, write_idx_file

from pipeline import datasets
from pipeline.datasets import base, idx
from pipeline.datasets import find_data_dir, load_split, read_idx, to_float
from pipeline.errors import TTTPipeError


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """No dataset anywhere by default: empty cache, no Debian dir, no TTT_PIPE_DATA."""
    monkeypatch.delenv("TTT_PIPE_DATA", raising=False)
    monkeypatch.setattr(base, "CACHE_ROOT", tmp_path / "cache")
    for name, source in list(idx.SOURCES.items()):
        monkeypatch.setitem(idx.SOURCES, name,
                            dataclasses.replace(source, debian_dir=str(tmp_path / "debian")))
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_load_split_reads_gz_and_raw_idx(tmp_path, gz):
    images, labels = synthetic_digits(20, seed=3)
    make_idx(tmp_path, images, labels, gz=gz, split="test")
    make_idx(tmp_path, images[:5], labels[:5], gz=gz, split="train")
    split = load_split("mnist", "test", data_dir=tmp_path)
    assert split.images.dtype == np.uint8 and split.images.shape == (20, 1, 28, 28)
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.images[:, 0], images)
    np.testing.assert_array_equal(split.labels, labels)
    assert len(load_split("mnist", "train", data_dir=tmp_path)) == 5
    assert split.spec.mean == (0.1307,) and split.spec.std == (0.3081,)
    assert split.spec.image_shape == (1, 28, 28) and split.spec.suite == "mnist-c"


def test_shared_fixture_has_both_datasets(idx_dir):
    for name in ("mnist", "fashion-mnist"):
        assert len(load_split(name, "train", data_dir=idx_dir / name)) == 64
        assert len(load_split(name, "test", data_dir=idx_dir)) == 32  # root/<name>/ found
    assert datasets.DATASETS["fashion-mnist"].std == (0.3530,)


def test_torchvision_layout(tmp_path):
    write_dataset(tmp_path / "FashionMNIST" / "raw", n_train=10, n_test=10, gz=False)
    split = load_split("fashion-mnist", "test", data_dir=tmp_path)
    assert split.source == str(tmp_path / "FashionMNIST" / "raw")
    with pytest.raises(TTTPipeError):  # MNIST's folder is not Fashion-MNIST's
        load_split("mnist", "test", data_dir=tmp_path)


def test_env_var_and_debian_dir_are_searched(nowhere, monkeypatch):
    write_dataset(nowhere / "debian", n_train=10, n_test=12)
    assert len(load_split("mnist", "test")) == 12
    write_dataset(nowhere / "env" / "mnist", n_train=10, n_test=7)
    monkeypatch.setenv("TTT_PIPE_DATA", str(nowhere / "env"))
    assert len(load_split("mnist", "test")) == 7  # $TTT_PIPE_DATA wins


def test_to_float_is_pixel_units():
    x = to_float(np.array([[[[0, 255], [51, 102]]]], np.uint8))
    assert x.dtype == np.float32 and x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(x[0, 0], [[0, 1], [0.2, 0.4]], atol=1e-7)
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)
    # bit-identical to the old (N, H, W) -> (N, 1, H, W) conversion, channel by channel
    old = (rgb[:, 1].astype(np.float32) / np.float32(255.0))[:, None]
    assert to_float(rgb).shape == (2, 3, 4, 5)
    assert to_float(rgb)[:, 1:2].tobytes() == old.tobytes()
    with pytest.raises(TTTPipeError, match=r"\(N, C, H, W\)"):
        to_float(rgb[:, 0])


def test_missing_data_dir_is_one_line_error(tmp_path):
    with pytest.raises(TTTPipeError) as err:
        load_split("fashion-mnist", "test", data_dir=tmp_path / "absent")
    message = str(err.value)
    assert "\n" not in message and "--data-dir" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_nothing_found_offline_never_downloads(nowhere, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "torchvision_download", lambda cls, root: calls.append(root))
    for env in ("TTT_PIPE_OFFLINE", "CI"):
        monkeypatch.delenv("TTT_PIPE_OFFLINE", raising=False)
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.setenv(env, "1")
        with pytest.raises(TTTPipeError, match="download not allowed") as err:
            load_split("mnist", "test")
        assert "\n" not in str(err.value) and "--data-dir" in str(err.value)
    assert calls == []


def test_download_attempted_when_allowed(nowhere, monkeypatch):
    calls = []

    def fake_download(cls, root):
        calls.append((cls, root))
        return "<urlopen error [Errno -2] Name or service not known>"

    monkeypatch.setattr(base, "torchvision_download", fake_download)
    monkeypatch.delenv("TTT_PIPE_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(TTTPipeError, match="download failed .*Name or service") as err:
        load_split("fashion-mnist", "test")
    assert "\n" not in str(err.value)
    assert calls == [("FashionMNIST", nowhere / "cache")]
    # an explicit data_dir is downloaded into only when asked
    with pytest.raises(TTTPipeError):
        load_split("mnist", "test", data_dir=nowhere / "mine")
    assert len(calls) == 1
    with pytest.raises(TTTPipeError):
        load_split("mnist", "test", data_dir=nowhere / "mine", download=True)
    assert calls[-1] == ("MNIST", nowhere / "mine")


def test_successful_download_is_used(nowhere, monkeypatch):
    def fake_download(cls, root):  # what torchvision leaves behind: root/<Cls>/raw/*
        write_dataset(root / cls / "raw", n_train=3, n_test=4)

    monkeypatch.setattr(base, "torchvision_download", fake_download)
    monkeypatch.delenv("TTT_PIPE_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert len(load_split("mnist", "test")) == 4
    assert find_data_dir("mnist", download=False) == nowhere / "cache" / "MNIST" / "raw"


def test_bad_names():
    with pytest.raises(TTTPipeError, match="unknown dataset 'cifar'; choose from: cifar10, "
                                           "cifar100, fashion-mnist, imagenet, mnist, folder:PATH"):
        load_split("cifar", "test")
    with pytest.raises(TTTPipeError, match="unknown split"):
        load_split("mnist", "val")


@pytest.mark.parametrize("damage", ["truncated", "magic", "gzip"])
def test_damaged_idx_files(tmp_path, damage):
    write_dataset(tmp_path, n_train=4, n_test=4)
    path = tmp_path / "t10k-images-idx3-ubyte"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-10])
    elif damage == "magic":
        path.write_bytes(b"\x12\x34" + data[2:])
    else:  # a .gz that is not gzip; the raw file is preferred, so remove it
        path.unlink()
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(data)
    with pytest.raises(TTTPipeError) as err:
        load_split("mnist", "test", data_dir=tmp_path)
    assert "\n" not in str(err.value) and "t10k-images-idx3-ubyte" in str(err.value)


def test_labels_must_match_images(tmp_path):
    images, labels = synthetic_digits(6)
    make_idx(tmp_path, images, labels, split="train")
    make_idx(tmp_path, images, labels[:5], split="test")
    with pytest.raises(TTTPipeError, match="5,.* labels for 6 images"):
        load_split("mnist", "test", data_dir=tmp_path)
    write_idx_file(tmp_path / "t10k-labels-idx1-ubyte", np.full(6, 12, np.uint8))
    with pytest.raises(TTTPipeError, match="labels outside 0..9"):
        load_split("mnist", "test", data_dir=tmp_path)


def test_read_idx_roundtrip_gz(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx_file(tmp_path / "x-idx3-ubyte", array, gz=True)
    with gzip.open(path, "rb") as f:
        assert f.read(4) == b"\x00\x00\x08\x03"
    np.testing.assert_array_equal(read_idx(path), array)
