"""The dataset registry: the one table of every dataset cnnpipe knows.

Archive MD5s are upstream's (the same lists torchvision ships); content
SHA-256s are of the *decompressed* bytes, which is what matters when a mirror
re-compressed the files (Debian's ``dataset-fashion-mnist`` did).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from cnnpipe.util.errors import DataError


@dataclass(frozen=True)
class RawFile:
    """One upstream file. ``content_sha256`` hashes the gunzipped bytes (the IDX data, or a tar.gz's tar)."""

    name: str
    role: str  # train_images | train_labels | test_images | test_labels | archive
    md5: str | None = None
    content_sha256: str | None = None
    size: int | None = None  # archive bytes, for a progress bar before headers arrive


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str  # "idx-gz" (MNIST family), "cifar-python" (CIFAR tar.gz of pickled batches) or "image-folder"
    urls: tuple[str, ...]  # base URLs tried in order; file names are appended
    files: tuple[RawFile, ...]
    image_shape: tuple[int, int, int]  # C, H, W
    classes: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()  # local OS-packaged copies (e.g. Debian)
    digits: bool = False  # handwriting: flips and crops change the label meaning
    train_size: int = 0
    test_size: int = 0
    homepage: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_folder(self) -> bool:
        """Your own class-per-folder images: shape from params, classes known only after ``prepare``."""
        return self.format == FOLDER_FORMAT

    def file(self, role: str) -> RawFile:
        for raw in self.files:
            if raw.role == role:
                return raw
        raise KeyError(f"{self.name} has no {role} file")


FOLDER = "folder"  # data.dataset for class-per-folder images (data.source)
FOLDER_FORMAT = "image-folder"
# What ``data.source`` is for the benchmark datasets: this file lists their upstream sources.
REGISTRY_SOURCE = "src/cnnpipe/data/registry.py"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")  # what a folder dataset's data.source may be packed as


def is_archive_name(name: str) -> bool:
    """Whether ``name`` (a path or URL) ends like an archive cnnpipe can unpack."""
    return name.split("?", 1)[0].lower().endswith(ARCHIVE_SUFFIXES)

_IDX_ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(md5s: tuple[str, ...], sha256s: tuple[str | None, ...] = (None,) * 4) -> tuple[RawFile, ...]:
    return tuple(
        RawFile(name=name, role=role, md5=md5, content_sha256=sha)
        for name, role, md5, sha in zip(_IDX_NAMES, _IDX_ROLES, md5s, sha256s)
    )


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="fashion-mnist",
            format="idx-gz",
            urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            files=_idx_files(
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
                (
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                ),
            ),
            image_shape=(1, 28, 28),
            classes=(
                "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
            ),
            system_dirs=("/usr/share/datasets/fashion-mnist",),
            train_size=60000,
            test_size=10000,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        ),
        DatasetSpec(
            name="mnist",
            format="idx-gz",
            urls=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            files=_idx_files(
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                )
            ),
            image_shape=(1, 28, 28),
            classes=tuple(str(d) for d in range(10)),
            system_dirs=("/usr/share/datasets/mnist",),
            digits=True,
            train_size=60000,
            test_size=10000,
            homepage="http://yann.lecun.com/exdb/mnist/",
        ),
        DatasetSpec(
            name="kmnist",
            format="idx-gz",
            urls=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
            files=_idx_files(
                (
                    "bdb82020997e1d708af4cf47b453dcf7",
                    "e144d726b3acfaa3e44228e80efcd344",
                    "5c965bf0a639b31b8f53240b1b52f4d7",
                    "7320c461ea6c1c855c0b718fb2a4b134",
                )
            ),
            image_shape=(1, 28, 28),
            classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            system_dirs=("/usr/share/datasets/kmnist",),
            digits=True,
            train_size=60000,
            test_size=10000,
            homepage="https://github.com/rois-codh/kmnist",
        ),
        DatasetSpec(
            name="cifar10",
            format="cifar-python",
            urls=("https://www.cs.toronto.edu/~kriz/",),
            files=(
                RawFile(
                    name="cifar-10-python.tar.gz",
                    role="archive",
                    md5="c58f30108f718f92721af3b95e74349a",
                    size=170498071,
                ),
            ),
            image_shape=(3, 32, 32),
            classes=(
                "airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck",
            ),
            system_dirs=("/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"),
            train_size=50000,
            test_size=10000,
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        ),
        DatasetSpec(
            name=FOLDER,
            format=FOLDER_FORMAT,
            urls=(),
            files=(),
            image_shape=(3, 64, 64),  # placeholder: data.channels x data.image_size (see folder_spec)
            classes=(),  # the folder names, found by the prepare stage
            homepage="",  # README: "Your own images"
        ),
    )
}


def folder_spec(image_size: tuple[int, int] | list[int], channels: int, classes: tuple[str, ...] = ()) -> DatasetSpec:
    """The folder dataset at ``channels`` x ``image_size`` (classes, when known, from ``stats.json``)."""
    from dataclasses import replace

    height, width = (int(d) for d in image_size)
    return replace(DATASETS[FOLDER], image_shape=(int(channels), height, width), classes=tuple(classes))


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
