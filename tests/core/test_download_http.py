"""The real fetch path of sturdy.datasets.download, end to end over HTTP: a server on 127.0.0.1 (a thread of the test)
serves archives generated in the official formats (the CIFAR-10 binary ``.tar.gz``, MNIST's gzipped IDX files) as
a mirror (``STURDY_DATA_MIRROR`` or ``mirror=``), with no stubbed ``urlopen``: the checksum passing, a wrong checksum
and a transfer cut off mid-body refused with one line and no partial file, and the cache memory-mapped on the
second run."""

import gzip
import hashlib
import io
import json
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sturdy.cli import main
from sturdy.datasets import ARCHIVES, Archive, download, load_data
from sturdy.datasets import cache as cache_module
from sturdy.datasets import cifar as cifar_module
from sturdy.datasets import idx as idx_module
from sturdy.datasets.cache import CACHE_DIR
from sturdy.datasets.fetch import MIRROR_ENV
from sturdy.errors import ConfigurationError, DataError

RNG = np.random.default_rng(7)


class _Mirror:
    """Files served at ``/PATH``; a path in ``cut`` announces its full length but sends only half, then closes."""

    def __init__(self):
        self.files, self.cut, self.requests = {}, set(), []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one response per connection: closing it ends the body

            def do_GET(self):  # noqa: N802 - the name http.server calls
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404, "File not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in mirror.cut else body)
                self.wfile.flush()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fetched(self, suffix):
        return sum(path.endswith(suffix) for path in self.requests)


@pytest.fixture
def mirror():
    served = _Mirror()
    served.thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()
        served.thread.join(timeout=10)


def _cifar10_archive():
    """A CIFAR-10 binary ``.tar.gz``: ``cifar-10-batches-bin/`` with five training batches and a test batch of
    records ``<label byte><1024 R><1024 G><1024 B>``."""
    images, labels = RNG.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8), RNG.integers(0, 10, 12)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i, name in enumerate([f"data_batch_{b}.bin" for b in range(1, 6)] + ["test_batch.bin"]):
            part = slice(2 * i, 2 * i + 2)
            records = b"".join(bytes([int(y)]) + x.tobytes() for x, y in zip(images[part], labels[part]))
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(records)
            tar.addfile(info, io.BytesIO(records))
    return buffer.getvalue(), images, labels


def _idx_gz(array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _mnist_files():
    files, arrays = {}, {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images, labels = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, 10, n, dtype=np.uint8)
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx_gz(images, 2051)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx_gz(labels, 2049)
        arrays[prefix] = (images, labels)
    return files, arrays


def _serve(monkeypatch, served, kind, files, unpacks_to=None):
    """Serve ``files`` under ``/KIND/`` and make their MD5s the published ones (the official URLs kept)."""
    archives = []
    for archive, (name, body) in zip(ARCHIVES[kind], files.items()):
        assert archive.filename == name
        served.files[f"/{kind}/{name}"] = body
        archives.append(Archive(archive.url, hashlib.md5(body).hexdigest(), archive.unpacks_to))
    monkeypatch.setitem(ARCHIVES, kind, tuple(archives))


def _spy_cache(monkeypatch):
    """The arrays each ``load_cached`` call found (``None``: decoded)."""
    found = []
    original = cache_module.load_cached

    def spy(*args, **kwargs):
        found.append(original(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(cache_module, "load_cached", spy)
    return found


def test_cifar10_from_a_mirror_checks_unpacks_and_maps_the_cache(tmp_path, monkeypatch, mirror):
    payload, images, labels = _cifar10_archive()
    _serve(monkeypatch, mirror, "cifar10", {"cifar-10-binary.tar.gz": payload})
    monkeypatch.setenv(MIRROR_ENV, mirror.url + "/")
    root = download("cifar10", tmp_path / "data")
    assert mirror.requests == ["/cifar10/cifar-10-binary.tar.gz"]
    assert (root / "cifar-10-binary.tar.gz").read_bytes() == payload
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]

    found = _spy_cache(monkeypatch)
    first = load_data(f"cifar10:{root}", split="test")
    np.testing.assert_array_equal(first.images.numpy(), images[10:])
    np.testing.assert_array_equal(first.labels.numpy(), labels[10:])
    assert found == [None]  # decoded and cached

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache matches")

    monkeypatch.setattr(cifar_module, "_decode", no_decoding)
    download("cifar10", root)  # the second run: nothing fetched, nothing unpacked
    second = load_data(f"cifar10:{root}", split="test")
    assert len(mirror.requests) == 1
    mapped = found[-1]
    assert mapped is not None and isinstance(mapped[0], np.memmap)
    assert second.images.data_ptr() == mapped[0].ctypes.data  # the tensor reads the mapped file, not a copy
    np.testing.assert_array_equal(second.images.numpy(), images[10:])


def test_mnist_gz_through_the_command_line_twice(tmp_path, monkeypatch, mirror, capsys):
    files, arrays = _mnist_files()
    _serve(monkeypatch, mirror, "mnist", files)
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    root = tmp_path / "mnist"
    command = ["evaluate", "--model", "linear", "--data", f"mnist:{root}", "--download"]
    assert main(command) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["test_size"] == 4 and first["sources"]["data"]["image_shape"] == [1, 28, 28]
    assert sorted(mirror.requests) == sorted(f"/mnist/{name}" for name in files)
    assert sorted(p.name for p in root.iterdir()) == sorted([CACHE_DIR, *files])  # no temporary file left

    found = _spy_cache(monkeypatch)
    monkeypatch.setattr(idx_module, "_decode", lambda *a: pytest.fail("decoded again although the cache matches"))
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == first["test_accuracy"]
    assert len(mirror.requests) == len(files)  # the checksums match: nothing fetched again
    assert found and all(f is not None and isinstance(f[0], np.memmap) for f in found)
    test = load_data(f"mnist:{root}", split="test")
    np.testing.assert_array_equal(test.images.numpy()[:, 0], arrays["t10k"][0])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k"][1])


def test_a_wrong_checksum_is_refused_in_one_line_and_nothing_kept(tmp_path, monkeypatch, mirror, capsys):
    files, _ = _mnist_files()
    _serve(monkeypatch, mirror, "mnist", files)
    wrong = ARCHIVES["mnist"][2]  # the test images
    monkeypatch.setitem(ARCHIVES, "mnist", ARCHIVES["mnist"][:2] + (Archive(wrong.url, "0" * 32),)
                        + ARCHIVES["mnist"][3:])
    monkeypatch.setenv(MIRROR_ENV, mirror.url)
    root = tmp_path / "mnist"
    assert main(["evaluate", "--model", "linear", "--data", f"mnist:{root}", "--download"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{mirror.url}/mnist/t10k-images-idx3-ubyte.gz has MD5 " in err and "not the published 000" in err
    assert sorted(p.name for p in root.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_a_transfer_cut_off_mid_body_leaves_no_partial_archive(tmp_path, monkeypatch, mirror):
    payload, _, _ = _cifar10_archive()
    _serve(monkeypatch, mirror, "cifar10", {"cifar-10-binary.tar.gz": payload})
    mirror.cut.add("/cifar10/cifar-10-binary.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(DataError) as exc:
        download("cifar10", root, mirror=mirror.url)
    assert f"was cut off after {len(payload) // 2} of {len(payload)} bytes" in str(exc.value)
    assert list(root.iterdir()) == []  # neither the archive nor a temporary part of it
    mirror.cut.clear()
    download("cifar10", root, mirror=mirror.url)  # the next try completes
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]


def test_a_missing_file_or_a_bad_mirror_is_one_error(tmp_path, monkeypatch, mirror):
    with pytest.raises(DataError, match=r"could not download http://127\.0\.0\.1:\d+/svhn/train_32x32\.mat "
                                         r"\(HTTP Error 404: File not found\).*set STURDY_DATA_MIRROR"):
        download("svhn", tmp_path / "svhn", mirror=mirror.url)
    assert list((tmp_path / "svhn").iterdir()) == []
    monkeypatch.setenv(MIRROR_ENV, "127.0.0.1:8000")
    with pytest.raises(ConfigurationError, match="the data mirror '127.0.0.1:8000' is not a URL"):
        download("svhn", tmp_path / "svhn")
