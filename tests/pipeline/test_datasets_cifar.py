"""CIFAR-10/100 from tiny files in the official python (pickle) and binary formats."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from rgb_helpers import cifar_arrays, write_cifar_binary, write_cifar_python

from pipeline.datasets import base, get_dataset, iter_split, load_split, to_float
from pipeline.datasets.cifar import read_python_batch
from pipeline.errors import TTTPipeError


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    monkeypatch.delenv("TTT_PIPE_DATA", raising=False)
    monkeypatch.setattr(base, "CACHE_ROOT", tmp_path / "cache")
    return tmp_path


def test_specs():
    c10, c100 = get_dataset("cifar10"), get_dataset("cifar100")
    assert c10.image_shape == c100.image_shape == (3, 32, 32)
    assert c10.num_classes == 10 and c100.num_classes == 100 and len(set(c100.classes)) == 100
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2470, 0.2435, 0.2616)
    assert c100.mean == (0.5071, 0.4865, 0.4409) and c10.suite == c100.suite == "imagenet-c"
    assert c10.classes[0] == "airplane" and c100.classes[:2] == ("apple", "aquarium_fish")
    with pytest.raises(TTTPipeError, match="32x32; --image-size only applies"):
        get_dataset("cifar10", image_size=64)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("version", ["cpickle", "python2", "python4", "binary"])
def test_reads_both_versions(tmp_path, name, version):
    if version == "binary":
        write_cifar_binary(tmp_path, name, n_train=10, n_test=6)
    else:
        protocol = None if version == "cpickle" else int(version[-1])  # cpickle: as the official files
        write_cifar_python(tmp_path, name, n_train=10, n_test=6, protocol=protocol)
    k = get_dataset(name).num_classes
    test, train = load_split(name, "test", data_dir=tmp_path), load_split(name, "train", data_dir=tmp_path)
    x, y = cifar_arrays(6, k, seed=1)
    assert test.images.dtype == np.uint8 and test.images.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(test.images, x)
    np.testing.assert_array_equal(test.labels, y)  # fine labels for cifar100
    assert test.labels.dtype == np.int64
    np.testing.assert_array_equal(train.images, cifar_arrays(10, k, seed=0)[0])  # 5 batches in order
    assert to_float(test.images).shape == (6, 3, 32, 32)
    batches = list(iter_split(name, "test", tmp_path, batch=4))
    assert [len(b[0]) for b in batches] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), x)


def test_binary_preferred_and_layouts(tmp_path):
    write_cifar_python(tmp_path / "a", seed=0)
    write_cifar_binary(tmp_path / "a", seed=5)
    split = load_split("cifar10", "test", data_dir=tmp_path / "a")
    assert split.source.endswith("cifar-10-batches-bin")
    write_cifar_python(tmp_path / "b" / "cifar10")  # <root>/<name>/<official folder>
    assert load_split("cifar10", "test", data_dir=tmp_path / "b").source.endswith("cifar-10-batches-py")
    folder = write_cifar_binary(tmp_path / "c")
    assert len(load_split("cifar10", "test", data_dir=folder)) == 6  # the folder itself


def test_env_and_cache_search(nowhere, monkeypatch):
    write_cifar_python(nowhere / "cache", "cifar100")  # torchvision's layout in the cache
    assert len(load_split("cifar100", "test")) == 6
    write_cifar_binary(nowhere / "env", "cifar100", n_test=3)
    monkeypatch.setenv("TTT_PIPE_DATA", str(nowhere / "env"))
    assert len(load_split("cifar100", "test")) == 3


def test_offline_nothing_found(nowhere, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "torchvision_download", lambda cls, root: calls.append(cls))
    with pytest.raises(TTTPipeError, match="cifar10 files not found.*download not allowed") as err:
        load_split("cifar10", "test")
    assert "\n" not in str(err.value) and "cifar-10-batches-bin/ or cifar-10-batches-py/" in str(err.value)
    assert calls == []


def test_download_when_allowed(nowhere, monkeypatch):
    def fake(cls, root):  # torchvision's CIFAR100(download=True) leaves cifar-100-python/
        assert cls == "CIFAR100"
        write_cifar_python(root, "cifar100", n_test=2)

    monkeypatch.setattr(base, "torchvision_download", fake)
    monkeypatch.delenv("TTT_PIPE_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert len(load_split("cifar100", "test")) == 2


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code_without_running_it(tmp_path):
    folder = write_cifar_python(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(TTTPipeError, match=r"not a CIFAR batch: it pickles (posix|nt)\.system") as err:
        load_split("cifar10", "test", data_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    with open(folder / "test_batch", "wb") as f:  # any other global, e.g. a builtin
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": eval}, f)
    with pytest.raises(TTTPipeError, match=r"it pickles builtins\.eval"):
        read_python_batch(folder / "test_batch")


def test_python_batch_contents_checked(tmp_path):
    folder = write_cifar_python(tmp_path)
    path = folder / "test_batch"
    bad = [({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, "'data' is uint8 \\(2, 100\\)"),
           ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "'data' is float32"),
           ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "'labels' are not 2 integers"),
           ([1, 2, 3], "holds a list, not a dict")]
    for obj, match in bad:
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(TTTPipeError, match=match) as err:
            load_split("cifar10", "test", data_dir=tmp_path)
        assert "\n" not in str(err.value)
    path.write_bytes(pickle.dumps({"data": 1}, protocol=2)[:-5])  # truncated pickle
    with pytest.raises(TTTPipeError, match="not a readable CIFAR batch"):
        load_split("cifar10", "test", data_dir=tmp_path)


def test_binary_damage(tmp_path):
    folder = write_cifar_binary(tmp_path)
    path = folder / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(TTTPipeError, match="test_batch.bin is truncated .*3073-byte records") as err:
        load_split("cifar10", "test", data_dir=tmp_path)
    assert "\n" not in str(err.value)
    folder = write_cifar_binary(tmp_path / "c100", "cifar100")
    data = bytearray((folder / "test.bin").read_bytes())
    data[1] = 250  # a fine label out of range
    (folder / "test.bin").write_bytes(bytes(data))
    with pytest.raises(TTTPipeError, match="labels outside 0..99"):
        load_split("cifar100", "test", data_dir=tmp_path / "c100")


def test_meta_must_name_the_dataset(tmp_path):
    folder = write_cifar_binary(tmp_path)
    (folder / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(TTTPipeError, match="lists 2 classes .* not cifar10's 10"):
        load_split("cifar10", "test", data_dir=tmp_path)


def test_failed_download_leaves_no_new_folder(nowhere, monkeypatch):
    import torchvision.datasets

    def failing(root, train, download):  # torchvision makes root, then fails to fetch
        os.makedirs(root, exist_ok=True)
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\n<urlopen error offline>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", failing)
    monkeypatch.delenv("TTT_PIPE_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(TTTPipeError, match=r"download failed \(<urlopen error offline>\)") as err:
        load_split("cifar10", "test")
    assert "\n" not in str(err.value)
    assert not (nowhere / "cache").exists()
