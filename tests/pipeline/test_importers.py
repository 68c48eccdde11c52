"""The released corrupted sets' readers on tiny files of both layouts (CIFAR-C .npy,
ImageNet-C JPEG trees)."""

from __future__ import annotations

import numpy as np
import pytest
from rgb_helpers import write_cifar_c, write_image

from pipeline.datasets import base, get_dataset, imagenet_wnids, load_split
from pipeline.datasets.importers import COMMON, RELEASED, plan_import, read_unit
from pipeline.errors import TTTPipeError

N = 8  # clean test samples per severity block


def test_cifar_c_units_and_rows(tmp_path):
    labels, arrays = write_cifar_c(tmp_path / "CIFAR-10-C", N)
    spec = get_dataset("cifar10")
    units = plan_import("cifar-c", tmp_path / "CIFAR-10-C", spec, "all", "1,5", seed=3)
    assert [(u.corruption, u.severity) for u in units] == [("gaussian_noise", 1), ("gaussian_noise", 5),
                                                           ("fog", 1), ("fog", 5)]
    perm = np.random.default_rng(3).permutation(N)
    for u in units:
        assert len(u) == N and u.shuffle_seed == 3 and u.dataset == "cifar10"
        np.testing.assert_array_equal(u.sample_ids, perm)
        ids, y, x = read_unit(u)
        assert x.dtype == np.uint8 and x.shape == (N, 3, 32, 32)
        np.testing.assert_array_equal(y, labels[ids])
        block = arrays[u.corruption][(u.severity - 1) * N:u.severity * N]
        np.testing.assert_array_equal(x, block[ids].transpose(0, 3, 1, 2))
        ids2, y2, x2 = read_unit(u, slice(2, 5))  # a chunk of the unit's row order
        np.testing.assert_array_equal(ids2, ids[2:5])
        np.testing.assert_array_equal(x2, x[2:5])
        for got, want in zip(read_unit(u.part(slice(2, 5))), (ids2, y2, x2)):
            np.testing.assert_array_equal(got, want)


def test_cifar_c_limit_is_seeded_subset_and_same_across_units(tmp_path):
    write_cifar_c(tmp_path, N)
    spec = get_dataset("cifar100")
    a = plan_import("cifar-c", tmp_path, spec, "gaussian_noise,fog", [2], limit=3, seed=7)
    b = plan_import("cifar-c", tmp_path, spec, "gaussian_noise", 2, limit=3, seed=7)
    assert len(a[0]) == 3 and len(set(a[0].sample_ids)) == 3
    np.testing.assert_array_equal(a[0].sample_ids, a[1].sample_ids)
    np.testing.assert_array_equal(a[0].sample_ids, b[0].sample_ids)
    c = plan_import("cifar-c", tmp_path, spec, "fog", 2, limit=3, seed=8)
    assert not np.array_equal(a[0].sample_ids, c[0].sample_ids)


def test_cifar_c_uses_memory_maps(tmp_path, monkeypatch):
    write_cifar_c(tmp_path, N)
    calls = []
    real = np.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    units = plan_import("cifar-c", tmp_path, get_dataset("cifar10"), "fog", 1)
    read_unit(units[0], slice(0, 2))
    assert all(kw.get("allow_pickle") is False for kw in calls)
    assert [kw.get("mmap_mode") for kw in calls[1:]] == ["r", "r"]  # data files: mapped


@pytest.mark.parametrize("case", ["shape", "dtype", "labels_len", "labels_repeat", "labels_range",
                                  "no_labels", "missing", "unknown", "layout", "not_npy", "gray",
                                  "empty"])
def test_cifar_c_errors_are_one_line(tmp_path, case):
    write_cifar_c(tmp_path, N)
    spec, corruptions, layout = get_dataset("cifar10"), "fog", "cifar-c"
    match = {"shape": r"fog.npy holds uint8 \(40, 32, 30, 3\), expected uint8 \(40, 32, 32, 3\)",
             "dtype": r"fog.npy holds float32", "labels_len": r"labels.npy holds .* expected integers \(5 x n,\)",
             "labels_repeat": "does not repeat the same 8 labels", "labels_range": "labels outside 0..9",
             "no_labels": "has no labels.npy", "missing": "has no zoom_blur.npy",
             "unknown": "unknown corruption\\(s\\) fogg", "layout": "unknown layout 'cifar-x'; choose from: cifar-c, imagenet-c",
             "not_npy": "cannot read .*fog.npy", "gray": "holds RGB images; mnist is 1-channel",
             "empty": "holds no cifar-c <corruption>.npy files"}[case]
    if case == "shape":
        np.save(tmp_path / "fog.npy", np.zeros((40, 32, 30, 3), np.uint8))
    elif case == "dtype":
        np.save(tmp_path / "fog.npy", np.zeros((40, 32, 32, 3), np.float32))
    elif case == "labels_len":
        np.save(tmp_path / "labels.npy", np.zeros(41, np.int64))
    elif case == "labels_repeat":
        labels = np.load(tmp_path / "labels.npy")
        labels[-1] = (labels[-1] + 1) % 10
        np.save(tmp_path / "labels.npy", labels)
    elif case == "labels_range":
        spec = get_dataset("cifar10")
        np.save(tmp_path / "labels.npy", np.full(40, 10, np.int64))
    elif case == "no_labels":
        (tmp_path / "labels.npy").unlink()
    elif case == "missing":
        corruptions = "fog,zoom_blur"
    elif case == "unknown":
        corruptions = "fogg"
    elif case == "layout":
        layout = "cifar-x"
    elif case == "not_npy":
        (tmp_path / "fog.npy").write_bytes(b"not a numpy file at all")
    elif case == "gray":
        spec = get_dataset("mnist")
    elif case == "empty":
        corruptions = "all"
        for f in tmp_path.glob("*.npy"):
            if f.name != "labels.npy":
                f.unlink()
    with pytest.raises(TTTPipeError, match=match) as err:
        plan_import(layout, tmp_path, spec, corruptions, "1,2")
    assert "\n" not in str(err.value)


def test_cifar_c_pickled_npy_refused(tmp_path):
    write_cifar_c(tmp_path, N)
    np.save(tmp_path / "fog.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TTTPipeError, match="cannot read .*fog.npy"):
        plan_import("cifar-c", tmp_path, get_dataset("cifar10"), "fog", 1)


def test_selection_names():
    assert len(RELEASED) == 19 and len(COMMON) == 15
    with pytest.raises(TTTPipeError, match="severities must be among 1..5"):
        plan_import("cifar-c", ".", get_dataset("cifar10"), "fog", "0,6")


WNIDS = imagenet_wnids()


def write_imagenet_c(src, classes, names=("fog",), levels=(1, 2), per_class=2, size=24):
    for name in names:
        for s in levels:
            for c, cls in enumerate(classes):
                for k in range(per_class):
                    write_image(src / name / str(s) / cls / f"ILSVRC2012_val_{c:04d}{k:04d}.JPEG",
                                (size, size), seed=100 * c + k + s)


def test_imagenet_c_ids_from_clean_val(tmp_path):
    classes = (WNIDS[5], WNIDS[1])
    src = tmp_path / "ImageNet-C"
    write_imagenet_c(src, classes)
    clean = tmp_path / "imagenet"
    for c, cls in enumerate(classes):  # the clean val split holds one more file per class
        for k in (0, 1, 2):
            write_image(clean / "val" / cls / f"ILSVRC2012_val_{c:04d}{k:04d}.JPEG", (40, 50))
    spec = get_dataset("imagenet", image_size=24)
    units = plan_import("imagenet-c", src, spec, "fog", "1,2", seed=1, data_dir=clean)
    assert len(units) == 2 and all(u.id_source == "clean-test" for u in units)
    val = load_split(spec, "test", data_dir=clean)
    names = dict(enumerate(sorted((cls, f"ILSVRC2012_val_{c:04d}{k:04d}")
                                  for c, cls in enumerate(classes) for k in range(3))))
    for u in units:
        ids, labels, images = read_unit(u)
        assert images.shape == (4, 3, 24, 24) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, val.labels[ids])  # same class as the clean image
        for i, f in zip(ids, (u.files[r] for r in u.rows)):
            cls, stem = names[int(i)]
            assert f.startswith(cls) and stem in f
        assert set(labels) == {1, 5}
    np.testing.assert_array_equal(units[0].sample_ids, units[1].sample_ids)
    assert units[0].files is units[1].files  # one copy of equal file lists
    part = units[1].part(slice(1, 3))  # a shard's worth: only its own files travel
    assert len(part) == 2 and len(part.files) == 2
    for got, want in zip(read_unit(part), read_unit(units[1], slice(1, 3))):
        np.testing.assert_array_equal(got, want)


def test_imagenet_c_without_clean_split_numbers_in_sorted_order(tmp_path, monkeypatch):
    monkeypatch.delenv("TTT_PIPE_DATA", raising=False)
    monkeypatch.setattr(base, "CACHE_ROOT", tmp_path / "cache")
    classes = (WNIDS[0], WNIDS[2])
    write_imagenet_c(tmp_path / "src", classes, levels=(3,), per_class=3)
    spec = get_dataset("imagenet", image_size=24)
    (unit,) = plan_import("imagenet-c", tmp_path / "src", spec, "fog", 3, seed=0, limit=4)
    assert unit.id_source == "corrupted-order" and len(unit) == 4
    perm = np.random.default_rng(0).permutation(6)[:4]
    np.testing.assert_array_equal(unit.sample_ids, perm)
    np.testing.assert_array_equal(unit.labels, np.array([0, 0, 0, 2, 2, 2])[perm])


def test_imagenet_c_for_a_folder_dataset(tmp_path):
    for split in ("train", "val"):
        for cls in ("bird", "cat"):
            write_image(tmp_path / "pets" / split / cls / f"{cls}1.jpg", (30, 30))
    write_imagenet_c(tmp_path / "pets-c", ("cat",), per_class=1, levels=(1,), size=32)
    (tmp_path / "pets-c/fog/1/cat/ILSVRC2012_val_00000000.JPEG").rename(tmp_path / "pets-c/fog/1/cat/cat1.JPEG")
    spec = get_dataset(f"folder:{tmp_path / 'pets'}", image_size=32)
    (unit,) = plan_import("imagenet-c", tmp_path / "pets-c", spec, "fog", 1)
    assert unit.id_source == "clean-test" and list(unit.sample_ids) == [1] and list(unit.labels) == [1]


def test_imagenet_c_names_without_namesake_fall_back_to_corrupted_order(tmp_path, caplog):
    src = tmp_path / "src"
    write_imagenet_c(src, (WNIDS[0],), levels=(1,), per_class=2)
    write_image(tmp_path / "clean" / "val" / WNIDS[0] / "ILSVRC2012_val_00000000.JPEG", (30, 30))
    write_image(tmp_path / "clean" / "val" / WNIDS[0] / "other.JPEG", (30, 30))
    spec = get_dataset("imagenet", image_size=24)
    (unit,) = plan_import("imagenet-c", src, spec, "fog", 1, data_dir=tmp_path / "clean")
    assert unit.id_source == "corrupted-order" and sorted(unit.sample_ids) == [0, 1]
    assert "1 of 2 files have no namesake" in caplog.text


@pytest.mark.parametrize("case", ["unknown_wnid", "size", "severity", "corrupt", "no_dirs"])
def test_imagenet_c_errors_are_one_line(tmp_path, case):
    src = tmp_path / "src"
    write_imagenet_c(src, (WNIDS[0],), levels=(1,), per_class=2)
    spec, data_dir, severities = get_dataset("imagenet", image_size=24), None, "1"
    match = {"unknown_wnid": "not among ImageNet wnids .*n00000001", "size": "is 24x24, not 32x32",
             "severity": "has no severity folder 2/", "corrupt": "cannot decode image .*broken.JPEG",
             "no_dirs": "holds no imagenet-c <corruption>/ folders"}[case]
    if case == "unknown_wnid":
        write_image(src / "fog" / "1" / "n00000001" / "a.JPEG", (24, 24))
    elif case == "size":
        spec = get_dataset("imagenet", image_size=32)  # the files are 24x24: not re-cropped
    elif case == "severity":
        severities = "1,2"
    elif case == "corrupt":
        (src / "fog" / "1" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8garbage")
    elif case == "no_dirs":
        src = tmp_path / "empty"
        src.mkdir()
    with pytest.raises(TTTPipeError, match=match) as err:
        units = plan_import("imagenet-c", src, spec, "all", severities, data_dir=data_dir)
        read_unit(units[0])
    assert "\n" not in str(err.value)
