"""Image folders (folder:PATH) and ImageNet from tiny JPEG/PNG trees written with Pillow."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from rgb_helpers import write_folder, write_image

from pipeline.datasets import base, get_dataset, imagenet_wnids, iter_split, load_split, split_length
from pipeline.datasets.folder import class_names, decode_image
from pipeline.errors import TTTPipeError


@pytest.fixture
def pets(tmp_path):
    return write_folder(tmp_path / "pets", classes=("dog", "cat", "bird"), per_class=(2, 3, 1))


def test_spec_identity_is_name_plus_class_hash(pets, tmp_path):
    spec = get_dataset(f"folder:{pets}")
    assert spec.classes == ("bird", "cat", "dog") and spec.num_classes == 3
    assert spec.image_shape == (3, 224, 224) and spec.suite == "imagenet-c"
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    import hashlib
    assert spec.name == "folder:pets-" + hashlib.sha256(b"bird\ncat\ndog").hexdigest()[:8]
    moved = shutil.copytree(pets, tmp_path / "elsewhere" / "pets")
    other = get_dataset(f"folder:{moved}/")
    assert other.name == spec.name and other == spec  # the mount point is not the identity
    assert other.form != spec.form
    (moved / "train" / "fish").mkdir()
    write_image(moved / "train" / "fish" / "a.jpg", (20, 20))
    assert get_dataset(f"folder:{moved}").name != spec.name
    assert get_dataset(f"folder:{pets}", image_size=64).image_shape == (3, 64, 64)


def test_order_and_labels_match_torchvision_imagefolder(pets):
    import torchvision.datasets

    spec = get_dataset(f"folder:{pets}", image_size=32)
    for split, folder in (("train", "train"), ("test", "val")):
        data = load_split(spec, split)
        ref = torchvision.datasets.ImageFolder(str(pets / folder))
        assert data.images.shape == (6, 3, 32, 32) and data.images.dtype == np.uint8
        assert list(data.labels) == [label for _, label in ref.samples]
        assert tuple(ref.classes) == spec.classes
        assert data.source == str(pets / folder)


@pytest.mark.parametrize("size", [224, 32, 57])
@pytest.mark.parametrize("wh", [(300, 200), (120, 333), (256, 256), (37, 80)])
def test_pixels_match_torchvision_resize_center_crop(tmp_path, size, wh):
    from PIL import Image
    from torchvision import transforms

    path = tmp_path / "x.png"
    write_image(path, wh, seed=wh[0])
    ref = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])
    expected = np.asarray(ref(Image.open(path).convert("RGB"))).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(path, size), expected)


def test_grayscale_and_png_become_rgb(tmp_path):
    write_image(tmp_path / "train" / "a" / "g.png", (50, 40), mode="L")
    write_image(tmp_path / "train" / "a" / "p.PNG", (50, 40), mode="P")
    (tmp_path / "train" / "a" / "notes.txt").write_text("ignored")
    data = load_split(f"folder:{tmp_path}", "train", image_size=16)
    assert data.images.shape == (2, 3, 16, 16)
    assert (data.images[0, 0] == data.images[0, 1]).all()  # gray replicated


def test_iter_split_bounded_batches_and_rows(pets):
    spec = get_dataset(f"folder:{pets}", image_size=24)
    whole = load_split(spec, "train")
    got = list(iter_split(spec, "train", batch=4))
    assert [len(ids) for ids, _, _ in got] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in got]), whole.images)
    ids, labels, images = next(iter_split(spec, "train", batch=10, rows=slice(2, 5)))
    assert list(ids) == [2, 3, 4]
    np.testing.assert_array_equal(images, whole.images[2:5])
    np.testing.assert_array_equal(labels, whole.labels[2:5])
    assert split_length(spec, "train") == 6


def test_test_split_is_val_or_test_and_classes_come_from_train(tmp_path):
    root = write_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=1, splits=("train",))
    write_folder(root, classes=("b",), per_class=2, splits=("test",))
    spec = get_dataset(f"folder:{root}", image_size=16)
    data = load_split(spec, "test")
    assert list(data.labels) == [1, 1]  # "b" is class 1 of train's a, b, c
    write_folder(root, classes=("zebra",), per_class=1, splits=("val",))  # val/ wins over test/
    with pytest.raises(TTTPipeError, match="not among the classes of folder:d-"):
        load_split(spec, "test")


@pytest.mark.parametrize("case", ["not_a_dir", "no_splits", "no_classes", "empty_class",
                                  "no_images", "corrupt", "missing_split"])
def test_folder_errors_are_one_line(tmp_path, case):
    root = tmp_path / "data"
    match = {"not_a_dir": "is not a folder", "no_splits": "has no train/, val/ or test/",
             "no_classes": "has no class subfolders", "empty_class": "class folder .*b holds no images",
             "no_images": "class folder .* holds no images", "corrupt": "cannot decode image .*bad.jpg",
             "missing_split": "has no val/ or test/ folder for the test split"}[case]
    split = "train"
    if case == "no_splits":
        root.mkdir()
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
    elif case in ("empty_class", "corrupt", "missing_split"):
        write_folder(root, classes=("a",), per_class=1, splits=("train",))
        if case == "empty_class":
            (root / "train" / "b").mkdir()
        elif case == "corrupt":
            good = (root / "train" / "a" / "img_0.jpg").read_bytes()
            (root / "train" / "a" / "bad.jpg").write_bytes(good[: len(good) // 2])
        else:
            split = "test"
    elif case == "no_images":
        (root / "train" / "a").mkdir(parents=True)
        (root / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(TTTPipeError, match=match) as err:
        load_split(f"folder:{root}", split, image_size=16)
    assert "\n" not in str(err.value)


def test_corrupt_jpeg_named_while_streaming(tmp_path):
    root = write_folder(tmp_path / "d", classes=("a",), per_class=3, splits=("train",))
    (root / "train" / "a" / "img_2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    batches = iter_split(f"folder:{root}", "train", batch=2, image_size=16)
    assert len(next(batches)[0]) == 2
    with pytest.raises(TTTPipeError, match="img_2.jpg"):
        next(batches)


def test_imagenet_wnids_shipped():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and list(wnids) == sorted(wnids)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    spec = get_dataset("imagenet")
    assert spec.classes == wnids and spec.image_shape == (3, 224, 224)
    names = class_names(spec)
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"


def test_imagenet_reader(tmp_path, monkeypatch):
    wnids = imagenet_wnids()
    root = tmp_path / "ILSVRC2012"
    for split in ("train", "val"):
        for w in (wnids[0], wnids[999]):
            write_image(root / split / w / f"{w}_1.JPEG", (64, 48))
    data = load_split("imagenet", "test", data_dir=tmp_path, image_size=32)
    assert list(data.labels) == [0, 999] and data.images.shape == (2, 3, 32, 32)
    monkeypatch.delenv("TTT_PIPE_DATA", raising=False)
    monkeypatch.setattr(base, "CACHE_ROOT", tmp_path / "cache")
    with pytest.raises(TTTPipeError, match="imagenet not found .*image-net.org"):
        load_split("imagenet", "test")
    write_image(root / "val" / "n99999999" / "x.JPEG", (10, 10))
    with pytest.raises(TTTPipeError, match="1 subfolder\\(s\\) that are not among ImageNet wnids .*n99999999") as err:
        load_split("imagenet", "test", data_dir=root)
    assert "\n" not in str(err.value)


def test_bad_forms():
    with pytest.raises(TTTPipeError, match="unknown dataset 'folder:'; choose from: cifar10, .*folder:PATH"):
        get_dataset("folder:")
    with pytest.raises(TTTPipeError, match="--image-size must be an integer"):
        get_dataset("imagenet", image_size=0)


def test_flat_test_folder_is_an_unlabelled_split(tmp_path):
    root = write_folder(tmp_path / "cam", classes=("car", "person"), per_class=1, splits=("train",))
    for k in (2, 0, 1):
        write_image(root / "test" / f"frame_{k}.jpg", (40, 30), seed=k)
    spec = get_dataset(f"folder:{root}", image_size=16)
    assert spec.classes == ("car", "person")
    data = load_split(spec, "test")
    assert data.labels is None and len(data) == 3 and data.images.shape == (3, 3, 16, 16)
    batches = list(iter_split(spec, "test", batch=2))
    assert [b[1] for b in batches] == [None, None] and list(batches[1][0]) == [2]
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), data.images)
    assert split_length(spec, "test") == 3
    for k in range(3):  # the sorted file order: frame_0, frame_1, frame_2
        np.testing.assert_array_equal(data.images[k], decode_image(root / "test" / f"frame_{k}.jpg", 16))
    flat = tmp_path / "flat"  # a train split is never unlabelled: its folders are the classes
    write_image(flat / "train" / "a.jpg", (20, 20))
    with pytest.raises(TTTPipeError, match="train has no class subfolders"):
        get_dataset(f"folder:{flat}")


def test_flat_imagenet_val_is_refused(tmp_path):
    write_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", (30, 30))
    with pytest.raises(TTTPipeError, match="val has no class subfolders .*only for folder:PATH"):
        load_split("imagenet", "test", data_dir=tmp_path, image_size=16)
