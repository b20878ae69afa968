"""The readers of sturdy.datasets on small files generated here in exactly each format (byte layout, headers, gzip),
compared with the arrays written; the uint8 cache; the data spec; download with checksums; the bad inputs."""

import gzip
import hashlib
import io
import os
import struct
import tarfile
import time

import numpy as np
import pytest
import torch

from sturdy.data import ImageDataset
from sturdy.datasets import ARCHIVES, Archive, DataSpec, download, load_data, parse_data_spec, read_idx
from sturdy.datasets import cache as cache_module
from sturdy.datasets import cifar as cifar_module
from sturdy.datasets import fetch as download_module
from sturdy.datasets.cache import CACHE_DIR, cache_files
from sturdy.errors import ConfigurationError, DataError

RNG = np.random.default_rng(0)


def _pixels(n, c, h, w):
    return RNG.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ---------------------------------------------------------------- CIFAR


def _write_cifar_file(path, images, labels, coarse=None):
    rows = [bytes([int(c)]) if coarse is not None else b"" for c in (coarse if coarse is not None else labels)]
    with open(path, "wb") as fh:
        for i in range(len(labels)):
            fh.write(rows[i] + bytes([int(labels[i])]) + images[i].tobytes())  # label byte(s), then R, G, B planes


def _cifar10(folder, per_file=3):
    images, labels = _pixels(5 * per_file + 4, 3, 32, 32), RNG.integers(0, 10, 5 * per_file + 4)
    for i in range(5):
        part = slice(i * per_file, (i + 1) * per_file)
        _write_cifar_file(folder / f"data_batch_{i + 1}.bin", images[part], labels[part])
    _write_cifar_file(folder / "test_batch.bin", images[5 * per_file:], labels[5 * per_file:])
    return images, labels


def test_cifar10_reads_records_in_order(tmp_path):
    images, labels = _cifar10(tmp_path)
    train = load_data(f"cifar10:{tmp_path}", split="train")
    test = load_data(f"cifar10:{tmp_path}", split="test")
    assert (train.name, train.split, train.num_classes, test.split) == ("cifar10", "train", 10, "test")
    assert train.images.dtype == torch.uint8 and train.images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(train.images.numpy(), images[:15])
    np.testing.assert_array_equal(train.labels.numpy(), labels[:15])
    np.testing.assert_array_equal(test.images.numpy(), images[15:])


def test_cifar10_in_the_unpacked_folder_and_cifar100_uses_fine_labels(tmp_path):
    (tmp_path / "cifar-10-batches-bin").mkdir()
    _cifar10(tmp_path / "cifar-10-batches-bin")
    assert len(load_data(f"cifar10:{tmp_path}", split="test")) == 4
    images, fine, coarse = _pixels(6, 3, 32, 32), RNG.integers(0, 100, 6), RNG.integers(0, 20, 6)
    _write_cifar_file(tmp_path / "train.bin", images, fine, coarse=coarse)
    data = load_data(f"cifar100:{tmp_path}", split="train")
    assert data.num_classes == 100
    np.testing.assert_array_equal(data.labels.numpy(), fine)
    np.testing.assert_array_equal(data.images.numpy(), images)


def test_cifar_bad_files_are_named(tmp_path):
    _cifar10(tmp_path)
    with open(tmp_path / "test_batch.bin", "ab") as fh:
        fh.write(b"\x00" * 10)
    with pytest.raises(DataError, match=r"test_batch\.bin is not a cifar10 binary file"):
        load_data(f"cifar10:{tmp_path}", split="test")
    _write_cifar_file(tmp_path / "test_batch.bin", _pixels(2, 3, 32, 32), np.array([3, 12]))
    with pytest.raises(DataError, match=r"test_batch\.bin holds label 12, outside 0\.\.9"):
        load_data(f"cifar10:{tmp_path}", split="test")
    (tmp_path / "data_batch_3.bin").unlink()
    (tmp_path / "py" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataError, match=r"torchvision's pickled CIFAR-10 .*sturdy reads the binary version"):
        load_data(f"cifar10:{tmp_path / 'py'}", split="train")
    with pytest.raises(DataError, match=r"no cifar10 train file found: looked for data_batch_3\.bin"):
        load_data(f"cifar10:{tmp_path}", split="train")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)


def _idx(array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder, prefix, images, labels, gz):
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write(_idx(images, 2051))
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write(_idx(labels, 2049))


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_idx_files_gzipped_or_not(tmp_path, gz, kind):
    images, labels = _pixels(7, 1, 28, 28)[:, 0], RNG.integers(0, 10, 7)
    _write_idx(tmp_path, "train", images, labels, gz)
    _write_idx(tmp_path, "t10k", images[:3], labels[:3], gz)
    train = load_data(f"{kind}:{tmp_path}", split="train")
    assert (train.name, train.images.shape, train.images.dtype) == (kind, (7, 1, 28, 28), torch.uint8)
    np.testing.assert_array_equal(train.images.numpy()[:, 0], images)
    np.testing.assert_array_equal(train.labels.numpy(), labels)
    assert len(load_data(f"{kind}:{tmp_path}", split="test")) == 3


def test_idx_in_torchvision_folder_and_bad_headers(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw, "t10k", _pixels(2, 1, 28, 28)[:, 0], np.array([1, 2]), gz=True)
    assert len(load_data(f"mnist:{tmp_path}", split="test")) == 2
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(_idx(np.array([1, 2]), 2049)[:-1])
    with pytest.raises(DataError, match=r"bad-idx1-ubyte holds 1 values after its header; the header says shape"):
        read_idx(bad)
    bad.write_bytes(_idx(np.array([1, 2]), 2049))
    with pytest.raises(DataError, match=r"IDX magic number 2049; expected 2051"):
        read_idx(bad, magic=2051)
    bad.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)  # float values
    with pytest.raises(DataError, match=r"type 0x0d; expected unsigned bytes"):
        read_idx(bad)
    _write_idx(raw, "t10k", _pixels(2, 1, 28, 28)[:, 0], np.array([1, 10]), gz=True)
    with pytest.raises(DataError, match=r"holds label 10, outside 0\.\.9"):
        load_data(f"mnist:{tmp_path}", split="test")


# ---------------------------------------------------------------- SVHN


def test_svhn_mat_files_label_10_is_digit_0(tmp_path):
    from scipy.io import savemat

    images, labels = _pixels(5, 3, 32, 32), np.array([10, 1, 9, 10, 5])
    savemat(tmp_path / "test_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": labels[:, None]})
    data = load_data(f"svhn:{tmp_path}", split="test")
    np.testing.assert_array_equal(data.images.numpy(), images)
    assert data.labels.tolist() == [0, 1, 9, 0, 5] and data.name == "svhn"
    savemat(tmp_path / "train_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": np.array([[0], [1], [2], [3], [4]])})
    with pytest.raises(DataError, match=r"train_32x32\.mat holds label 0, outside SVHN's 1\.\.10"):
        load_data(f"svhn:{tmp_path}", split="train")


# ---------------------------------------------------------------- image folder


def _save_png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_classes_sorted_rgb_and_gray(tmp_path):
    written = {}
    for label, name in enumerate(["cat", "dog"]):
        for i in range(2):
            pixels = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            _save_png(tmp_path / name / f"{i}.png", pixels)
            written[(label, i)] = pixels
    data = load_data(f"folder:{tmp_path}", split="train")
    assert (data.num_classes, data.images.shape, data.name) == (2, (4, 3, 6, 5), "folder")
    assert data.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(data.images[2].numpy(), written[(1, 0)].transpose(2, 0, 1))
    gray = tmp_path / "gray"
    _save_png(gray / "a" / "x.png", np.full((4, 4), 7, dtype=np.uint8))
    _save_png(gray / "b" / "y.png", np.full((4, 4), 9, dtype=np.uint8))
    one = load_data(f"folder:{gray}", split="test")
    assert one.images.shape == (2, 1, 4, 4) and one.images[1].unique().tolist() == [9]


def test_image_folder_split_folders_and_resize(tmp_path):
    _save_png(tmp_path / "train" / "a" / "1.png", np.zeros((8, 8, 3), dtype=np.uint8))
    _save_png(tmp_path / "train" / "b" / "2.jpg", np.zeros((12, 10, 3), dtype=np.uint8))
    _save_png(tmp_path / "val" / "a" / "3.png", np.zeros((8, 8, 3), dtype=np.uint8))
    assert load_data(f"folder:{tmp_path}", split="test").images.shape == (1, 3, 8, 8)
    resized = load_data(f"folder:{tmp_path}", split="train", image_size=6)
    assert resized.images.shape == (2, 3, 6, 6) and resized.labels.tolist() == [0, 1]


def test_image_folder_refusals_name_the_problem(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no images in its class folders \(a\)"):
        load_data(f"folder:{tmp_path / 'empty'}", split="train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"holds no class folders"):
        load_data(f"folder:{tmp_path / 'flat'}", split="train")
    mixed = tmp_path / "mixed"
    _save_png(mixed / "a" / "1.png", np.zeros((8, 8, 3), dtype=np.uint8))
    _save_png(mixed / "b" / "2.png", np.zeros((9, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mixed sizes: .*1\.png is 8x8, .*2\.png is 8x9; give an image size"):
        load_data(f"folder:{mixed}", split="train")
    (mixed / "b" / "2.png").unlink()
    (mixed / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png is not a readable image") as info:
        load_data(f"folder:{mixed}", split="train")
    assert "\n" not in str(info.value)
    truncated = tmp_path / "truncated"
    _save_png(truncated / "a" / "1.png", RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    whole = (truncated / "a" / "1.png").read_bytes()
    (truncated / "a" / "1.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"1\.png is not a readable image"):
        load_data(f"folder:{truncated}", split="train")


# ---------------------------------------------------------------- .npz


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_layouts_uint8(tmp_path, layout):
    images, labels = _pixels(4, 3 if layout != "nhw" else 1, 5, 6), np.array([0, 2, 1, 2])
    stored = {"nchw": images, "nhwc": images.transpose(0, 2, 3, 1), "nhw": images[:, 0]}[layout]
    np.savez(tmp_path / "d.npz", images=stored, labels=labels)
    data = load_data(f"npz:{tmp_path / 'd.npz'}", split="train")
    assert data.images.dtype == torch.uint8 and data.num_classes == 3 and data.name == "npz"
    np.testing.assert_array_equal(data.images.numpy(), images)
    np.testing.assert_array_equal(data.labels.numpy(), labels)


def test_npz_float_images_kept_exact_and_per_split_keys(tmp_path):
    images = RNG.random((3, 3, 5, 6)).astype(np.float32)
    np.savez_compressed(tmp_path / "f.npz", train_images=images, train_labels=np.array([0, 1, 1]),
                        test_images=images[:1], test_labels=np.array([1]), num_classes=np.array(5))
    train = load_data(f"npz:{tmp_path / 'f.npz'}", split="train")
    assert train.images.dtype == torch.float32 and train.num_classes == 5
    np.testing.assert_array_equal(train.images.numpy(), images)
    assert len(load_data(f"npz:{tmp_path / 'f.npz'}", split="test")) == 1


@pytest.mark.parametrize("arrays, message", [
    ({"labels": np.array([0, 1])}, r"holds no 'images' array \(it holds \['labels'\]\)"),
    ({"images": np.zeros((2, 4, 4), np.uint8)}, r"holds no 'labels' array"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, -1])}, r"holds label -1, outside"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 3]), "num_classes": np.array(3)},
     r"'labels' holds label 3, outside 0\.\.2 \(3 classes\)"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0.5, 1.0])}, r"expected integer class indices"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, 1])}, r"3 images and 2 labels"),
    ({"images": np.full((2, 4, 4), 1.5), "labels": np.array([0, 1])}, r"outside \[0, 1\]"),
    ({"images": np.zeros((2, 5, 4, 7), np.uint8), "labels": np.array([0, 1])}, r"no channel axis"),
    ({"images": np.zeros((2, 3, 0, 4), np.uint8), "labels": np.array([0, 1])}, r"images of no pixels"),
])
def test_npz_refusals(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'bad.npz'}", split="train")


def test_npz_refusal_is_not_wrapped_as_unreadable(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0, 1]))
    with pytest.raises(DataError) as exc:
        load_data(f"npz:{tmp_path / 'bad.npz'}", split="test")
    assert str(exc.value).startswith(f"{tmp_path / 'bad.npz'} holds no 'test_images' array")
    assert "could not be read" not in str(exc.value)


def test_npz_not_an_npz_file(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"x\.npz could not be read as an \.npz file"):
        load_data(f"npz:{tmp_path / 'x.npz'}", split="train")


# ---------------------------------------------------------------- the cache


def test_cache_memory_maps_on_the_second_load(tmp_path, monkeypatch):
    _cifar10(tmp_path)
    first = load_data(f"cifar10:{tmp_path}", split="train")
    images_path, labels_path, meta_path = cache_files(tmp_path, "cifar10-train")
    assert images_path.is_file() and labels_path.is_file() and meta_path.is_file()
    assert not [p for p in (tmp_path / CACHE_DIR).iterdir() if p.name.endswith(".tmp")]
    loaded = cache_module.load_cached(tmp_path, "cifar10-train", cache_module.fingerprint(
        [tmp_path / f"data_batch_{i}.bin" for i in range(1, 6)]))
    assert loaded is not None and isinstance(loaded[0], np.memmap)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(cifar_module, "_decode", no_decoding)
    second = load_data(f"cifar10:{tmp_path}", split="train")
    torch.testing.assert_close(second.images, first.images, rtol=0, atol=0)
    torch.testing.assert_close(second.labels, first.labels, rtol=0, atol=0)
    second.images[0].zero_()  # copy-on-write: the cache file is never changed
    third_images = np.load(images_path)
    np.testing.assert_array_equal(third_images, first.images.numpy())


def test_stale_or_damaged_cache_is_rebuilt(tmp_path):
    images, labels = _cifar10(tmp_path)
    load_data(f"cifar10:{tmp_path}", split="test")
    new_images, new_labels = _pixels(2, 3, 32, 32), np.array([4, 5])
    _write_cifar_file(tmp_path / "test_batch.bin", new_images, new_labels)
    later = time.time() + 5
    os.utime(tmp_path / "test_batch.bin", (later, later))
    rebuilt = load_data(f"cifar10:{tmp_path}", split="test")
    np.testing.assert_array_equal(rebuilt.images.numpy(), new_images)
    assert rebuilt.labels.tolist() == [4, 5]
    images_path = cache_files(tmp_path, "cifar10-test")[0]
    images_path.write_bytes(images_path.read_bytes()[:200])  # a damaged cache file
    again = load_data(f"cifar10:{tmp_path}", split="test")
    np.testing.assert_array_equal(again.images.numpy(), new_images)
    assert np.load(images_path).shape == (2, 3, 32, 32)


def test_read_only_folder_reads_without_cache(tmp_path, monkeypatch):
    _cifar10(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(cache_module, "atomic_writer", refuse)
    assert len(load_data(f"cifar10:{tmp_path}", split="test")) == 4
    assert not cache_files(tmp_path, "cifar10-test")[2].exists()


# ---------------------------------------------------------------- limit, image size, the spec


def test_limit_is_a_fixed_subset_and_image_size_resizes(tmp_path):
    images, labels = _cifar10(tmp_path, per_file=4)
    a = load_data(f"cifar10:{tmp_path}", split="train", limit=5)
    b = load_data(f"cifar10:{tmp_path}", split="train", limit=5)
    assert len(a) == 5 and torch.equal(a.images, b.images)
    rows = {images[i].tobytes(): labels[i] for i in range(20)}
    assert all(rows[x.numpy().tobytes()] == y for x, y in zip(a.images, a.labels))
    small = load_data(f"cifar10:{tmp_path}", split="test", image_size=16)
    assert small.images.shape == (4, 3, 16, 16) and small.images.dtype == torch.uint8
    assert len(load_data("digits", split="test", limit=10)) == 10
    assert load_data("digits", split="train", image_size=16).images.shape[1:] == (1, 16, 16)


def test_spec_parsing(tmp_path):
    _cifar10(tmp_path)
    assert parse_data_spec("digits") == DataSpec("digits")
    assert parse_data_spec("cifar10", root_hint=tmp_path) == DataSpec("cifar10", tmp_path)
    assert str(parse_data_spec(f"CIFAR-10:{tmp_path}")) == f"cifar10:{tmp_path}"
    assert len(load_data("cifar10", split="test", root_hint=tmp_path)) == 4
    refusals = [("imagenet:x", DataError, r"unknown data 'imagenet'"),
                ("digits:x", ConfigurationError, "takes no path"),
                ("npz", ConfigurationError, r"npz:FILE"), ("folder:", ConfigurationError, r"folder:DIR"),
                ("", ConfigurationError, "empty"), (f"npz:{tmp_path / 'none.npz'}", DataError, "does not exist"),
                (f"npz:{tmp_path}", DataError, "is not a file"),
                (f"mnist:{tmp_path / 'none'}", DataError, r"does not exist \(--download")]
    for spec, error, message in refusals:
        with pytest.raises(error, match=message):
            parse_data_spec(spec)
    for kwargs, message in [({"split": "val"}, "split"), ({"split": "train", "limit": 0}, "limit"),
                            ({"split": "train", "image_size": 0}, "image size")]:
        with pytest.raises(ConfigurationError, match=message):
            load_data("digits", **kwargs)


def test_uint8_image_dataset_trains_through_the_core(tmp_path):
    from sturdy.training.evaluation import evaluate

    data = ImageDataset(torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8), torch.arange(6) % 2, 2, "x", "train")
    as_float = data.as_float()
    assert as_float.images.dtype == torch.float32 and float(as_float.images.max()) <= 1.0
    torch.testing.assert_close(as_float.images * 255, data.images.float())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    assert evaluate(model, data) == pytest.approx(evaluate(model, as_float))
    with pytest.raises(DataError, match="uint8 pixels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.long), 2)


# ---------------------------------------------------------------- download


def _tarball(member_name="cifar-10-batches-bin"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        images, labels = _pixels(2, 3, 32, 32), np.array([1, 2])
        records = b"".join(bytes([int(labels[i])]) + images[i].tobytes() for i in range(2))
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            info = tarfile.TarInfo(f"{member_name}/{name}")
            info.size = len(records)
            tar.addfile(info, io.BytesIO(records))
    return buffer.getvalue()


def test_download_from_a_file_url_checks_and_unpacks(tmp_path, monkeypatch):
    payload = _tarball()
    source = tmp_path / "mirror" / "cifar-10-binary.tar.gz"
    source.parent.mkdir()
    source.write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(ARCHIVES, "cifar10", (Archive(source.as_uri(), md5, "cifar-10-batches-bin"),))
    root = download("cifar10", tmp_path / "data")
    assert (root / "cifar-10-binary.tar.gz").read_bytes() == payload
    data = load_data(f"cifar10:{root}", split="test")
    assert data.labels.tolist() == [1, 2]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]  # no temp files
    assert (root / "cifar-10-batches-bin" / CACHE_DIR).is_dir()  # the cache lies beside the files read
    download("cifar10", root)  # present and matching: nothing fetched again


class _Served(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_checksum_mismatch_leaves_no_partial_archive(tmp_path, monkeypatch):
    payload = b"generated bytes" * 1000
    monkeypatch.setattr(download_module, "urlopen", lambda url, timeout: _Served(payload))
    good = Archive("https://example.invalid/train_32x32.mat", hashlib.md5(payload).hexdigest())
    bad = Archive("https://example.invalid/test_32x32.mat", "0" * 32)
    monkeypatch.setitem(ARCHIVES, "svhn", (good, bad))
    root = tmp_path / "svhn"
    with pytest.raises(DataError, match=r"test_32x32\.mat has MD5 [0-9a-f]{32}, not the published 0{32}"):
        download("svhn", root)
    assert sorted(p.name for p in root.iterdir()) == ["train_32x32.mat"]  # the good one kept, nothing partial

    class Broken(_Served):
        def read(self, size=-1):
            raise ConnectionResetError("connection reset")

    monkeypatch.setattr(download_module, "urlopen", lambda url, timeout: Broken())
    with pytest.raises(DataError, match=r"could not download https://example\.invalid/test_32x32\.mat"):
        download("svhn", root)
    assert sorted(p.name for p in root.iterdir()) == ["train_32x32.mat"]
    with pytest.raises(ConfigurationError, match="nothing to download for 'folder'"):
        download("folder", root)


def test_archive_with_an_unsafe_member_is_not_unpacked(tmp_path, monkeypatch):
    payload = _tarball(member_name="../escape")
    monkeypatch.setattr(download_module, "urlopen", lambda url, timeout: _Served(payload))
    monkeypatch.setitem(ARCHIVES, "cifar10", (Archive("https://example.invalid/cifar-10-binary.tar.gz",
                                                      hashlib.md5(payload).hexdigest(), "cifar-10-batches-bin"),))
    with pytest.raises(DataError, match=r"holds '\.\./escape/data_batch_1\.bin', not a plain file"):
        download("cifar10", tmp_path / "data")
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-binary.tar.gz"]


def test_published_checksums_are_md5_hex():
    for archives in ARCHIVES.values():
        for archive in archives:
            assert len(archive.md5) == 32 and int(archive.md5, 16) >= 0 and archive.url.startswith("http")
