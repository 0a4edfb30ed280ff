"""Datasets: find and check the images, split them, and stream them through tf.data.

Every file is decoded once with Pillow before training starts, so unreadable files are skipped
and listed up front instead of crashing an epoch. Images flow as raw RGB 0-255 (float32) because
each model carries its own preprocessing.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetl.edge.images import ImageError, decode_image, decode_images, is_image_file, load_rgb
from edgetl.errors import EdgetlError

BUILTIN_DATASETS = {
    "digits": "scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes, upscaled to RGB "
              "(offline, no download).",
    "tf_flowers": "TensorFlow flower_photos: 3,670 photos, 5 classes, downloaded once into the Keras cache "
                  "(~/.keras/datasets).",
}
DISK_SHUFFLE_BUFFER = 1024  # decoded images held for shuffling when the cache is on disk
FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"


class DatasetError(EdgetlError, ValueError):
    """A dataset that cannot be trained on; the message says which folder and how to fix it."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class HeadLabels:
    """One multi-task head's class names and the label index of every image (by path)."""

    name: str
    class_names: list[str]
    by_path: dict[str, int]
    source: str  # "folder" or the CSV path

    def labels(self, samples: list[Sample]) -> np.ndarray:
        """Label indices aligned with `samples`."""
        return np.array([self.by_path[s.path] for s in samples], dtype=np.int64)


@dataclass
class DatasetSplits:
    """Class names, train/val/test samples, the files that were skipped (with reasons) and, for a
    multi-task recipe, each head's labels (`heads`, empty for a single head on the class folders)."""

    source: str
    root: str
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    heads: list[HeadLabels] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def primary_class_names(self) -> list[str]:
        """The class names of labels.txt: the first head's, or the class folders'."""
        return self.heads[0].class_names if self.heads else self.class_names

    def targets(self, samples: list[Sample]) -> dict[str, np.ndarray] | None:
        """{head: label indices aligned with `samples`} for a multi-task recipe, else None."""
        return {h.name: h.labels(samples) for h in self.heads} or None

    def fingerprint(self) -> dict:
        """File counts per split and class, and a hash of the file list (detects a changed dataset)."""
        digest = hashlib.sha256()
        counts = {}
        for split in ("train", "val", "test"):
            samples = getattr(self, split)
            per_class = Counter(self.class_names[s.label] for s in samples)
            counts[split] = {"total": len(samples), "per_class": {c: per_class.get(c, 0) for c in self.class_names}}
            for s in sorted(samples, key=lambda s: s.path):
                rel = os.path.relpath(s.path, self.root)
                heads = "".join(f"\t{h.by_path[s.path]}" for h in self.heads)
                digest.update(f"{split}\t{rel}\t{s.label}{heads}\t{os.path.getsize(s.path)}\n".encode())
        out = {"source": self.source, "root": self.root, "classes": self.class_names, "counts": counts,
               "files_sha256": digest.hexdigest(), "skipped": len(self.skipped)}
        if self.heads:
            out["heads"] = {h.name: {"source": h.source, "classes": h.class_names, "counts": {
                split: dict(zip(h.class_names, np.bincount(h.labels(getattr(self, split)),
                                                           minlength=len(h.class_names)).tolist()))
                for split in ("train", "val", "test")}} for h in self.heads}
        return out


# ---------------------------------------------------------------------------------------------------------
# Finding the data


def resolve_source(source: str) -> tuple[str, Path]:
    """Map a recipe's `data.source` (or --data) to (kind, folder), materialising built-ins if needed."""
    if source == "digits":
        return "digits", materialize_digits()
    if source == "tf_flowers":
        return "tf_flowers", download_flowers()
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"data source {source!r}: no such folder. Use a class-per-folder directory, or one "
                           f"of the built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    if not path.is_dir():
        raise DatasetError(f"data source {source!r} is a file; expected a class-per-folder directory")
    return "folder", path.resolve()


def cache_root() -> Path:
    """Where edgetl keeps materialised built-in datasets ($EDGETL_CACHE, default ~/.cache/edgetl)."""
    return Path(os.environ.get("EDGETL_CACHE", Path.home() / ".cache" / "edgetl"))


def materialize_digits() -> Path:
    """Write scikit-learn's digits once as class-per-folder PNGs, so they take the ordinary folder path."""
    from PIL import Image
    from sklearn.datasets import load_digits

    target = cache_root() / "datasets" / "digits"
    if (target / ".complete").exists():
        return target
    digits = load_digits()
    tmp = target.with_name(f".digits.tmp{os.getpid()}")
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        folder = tmp / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(img * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"digit_{i:04d}.png")
    (tmp / ".complete").write_text("1797 images from sklearn.datasets.load_digits\n")
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def download_flowers() -> Path:
    """The flower_photos archive through the Keras download cache (needs the network the first time)."""
    import tf_keras as keras

    cache_dir = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    try:
        path = Path(keras.utils.get_file("flower_photos", origin=FLOWERS_URL, untar=True))
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same actionable message
        raise DatasetError(
            f"tf_flowers: could not download {FLOWERS_URL} into {cache_dir / 'datasets'} ({exc}). "
            f"When offline, use a local class-per-folder copy with --data DIR") from None
    nested = path / "flower_photos"
    return nested if nested.is_dir() else path


def load_splits(recipe, data_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """Scan, check and split the recipe's dataset (`data_dir` overrides `recipe.data.source`)."""
    cfg = recipe.data
    source = str(data_dir) if data_dir is not None else cfg.source
    kind, root = resolve_source(source)
    rng = np.random.default_rng(recipe.seed)
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names = _class_dirs(root / "train")
        train, skipped = scan_class_folders(root / "train", class_names)
        test, skipped_test = scan_class_folders(root / "test", class_names, strict_classes=True)
        skipped += skipped_test
        if (root / "val").is_dir():
            val, skipped_val = scan_class_folders(root / "val", class_names, strict_classes=True)
            skipped += skipped_val
        else:
            train, val = stratified_split(train, cfg.val_split, rng)
    else:
        class_names = _class_dirs(root)
        samples, skipped = scan_class_folders(root, class_names)
        rest, test = stratified_split(samples, cfg.test_split, rng)
        train, val = stratified_split(rest, cfg.val_split, rng)
    heads = [head_labels(h, root, class_names, train + val + test, skipped) for h in recipe.model.heads]
    if cfg.max_per_class:
        train = _cap_per_class(train, cfg.max_per_class, rng)
    _check_usable(root, class_names, train, test)
    for head in heads:
        _check_head_classes(head, train)
    return DatasetSplits(kind, str(root), class_names, train, val, test, skipped, heads)


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DatasetError(f"{folder}: no class folders found. Expected one sub-folder per class "
                           f"(e.g. {folder}/cats/*.jpg, {folder}/dogs/*.jpg), or train/ and test/ sub-folders "
                           f"that each hold class folders")
    if len(names) == 1:
        raise DatasetError(f"{folder}: only one class folder ({names[0]!r}); a classifier needs at least two")
    return names


def scan_class_folders(folder: Path, class_names: list[str], strict_classes: bool = False):
    """List the images under folder/<class>/ (recursively), decoding each once to find bad files."""
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = [c for c in present if c not in class_names]
    if strict_classes and extra:
        raise DatasetError(f"{folder}: class folders {extra} do not exist in the training split "
                           f"(classes: {', '.join(class_names)})")
    candidates, skipped = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue
            if is_image_file(path):
                candidates.append(Sample(str(path), label))
            else:
                skipped.append(Skipped(str(path), "not an image file (expected .jpg .jpeg .png .bmp .gif)"))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        errors = list(pool.map(check_image, [s.path for s in candidates]))
    good = [s for s, err in zip(candidates, errors) if err is None]
    skipped += [Skipped(s.path, err) for s, err in zip(candidates, errors) if err is not None]
    return good, skipped


def check_image(path: str) -> str | None:
    try:
        load_rgb(path)
    except ImageError as exc:
        return exc.reason
    return None


def _check_usable(root: Path, class_names: list[str], train: list[Sample], test: list[Sample]) -> None:
    counts = Counter(s.label for s in train)
    empty = [class_names[i] for i in range(len(class_names)) if counts.get(i, 0) == 0]
    if empty:
        raise DatasetError(f"{root}: class(es) {', '.join(empty)} have no usable training images (after skipping "
                           f"unreadable files). Add images or remove the folder(s)")
    if not test:
        raise DatasetError(f"{root}: the test split is empty. Add a test/ folder or raise data.test_split")


# ---------------------------------------------------------------------------------------------------------
# Multi-task labels


def head_labels(head, root: Path, class_names: list[str], samples: list[Sample],
                skipped: list[Skipped]) -> HeadLabels:
    """The labels of one recipe head (a HeadConfig): the class folders, or its CSV file."""
    if head.csv is None:
        return HeadLabels(head.name, list(class_names), {s.path: s.label for s in samples}, "folder")
    values = read_label_csv(head, root, samples, skipped)
    names = sorted(set(values.values()))
    if len(names) < 2:
        raise DatasetError(f"model.heads '{head.name}': {head.csv} gives every image the label {names[0]!r}; "
                           f"a head needs at least two classes")
    index = {name: i for i, name in enumerate(names)}
    return HeadLabels(head.name, names, {path: index[v] for path, v in values.items()}, head.csv)


def read_label_csv(head, root: Path, samples: list[Sample], skipped: list[Skipped]) -> dict[str, str]:
    """{image path: label} from a head's CSV; every row must name one image and every image needs a row."""
    path = Path(head.csv)
    where = f"model.heads '{head.name}': {path}"
    if not path.is_file():
        raise DatasetError(f"{where}: CSV file not found. Give the head's `csv` as a file with a header row "
                           f"`file,{head.column or head.name}` (relative paths are read from the recipe's folder), "
                           f"or leave `csv` out to take this head's labels from the class folders")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    column = head.column or next((c for c in (head.name, "label") if c in columns), head.name)
    missing = [c for c in ("file", column) if c not in columns]
    if missing:
        raise DatasetError(f"{where}: the header row {columns} has no column {' or '.join(map(repr, missing))}. "
                           f"Start the file with a header such as `file,{column}` (file: a path relative to "
                           f"{root}, or a file name); the label column is the head's `column`, else the one named "
                           f"like the head, else `label`")
    by_rel = {Path(os.path.relpath(s.path, root)).as_posix(): s.path for s in [*samples, *skipped]}
    by_name: dict[str, list[str]] = {}
    for rel, image in by_rel.items():
        by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(image)
    usable = {s.path for s in samples}
    values: dict[str, str] = {}
    row_of: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        key, value = row.get("file", "").replace("\\", "/").removeprefix("./"), row.get(column, "")
        if not key or not value:
            raise DatasetError(f"{where}, row {line}: empty `file` or `{column}` cell; every row needs both")
        found = [by_rel[key]] if key in by_rel else by_name.get(key, []) if "/" not in key else []
        if len(found) > 1:
            raise DatasetError(f"{where}, row {line}: file name {key!r} matches {len(found)} images "
                               f"({', '.join(os.path.relpath(p, root) for p in found[:3])}); write the path "
                               f"relative to {root} instead")
        if not found:
            raise DatasetError(f"{where}, row {line}: {key!r} is not an image under {root} (looked for a path "
                               f"relative to the data root, or a file name). Fix the path or delete the row")
        if found[0] in row_of:
            raise DatasetError(f"{where}, rows {row_of[found[0]]} and {line} both label {key!r}; keep one")
        row_of[found[0]] = line
        if found[0] in usable:  # unreadable images were skipped and need no label
            values[found[0]] = value
    unlabeled = [os.path.relpath(s.path, root) for s in samples if s.path not in values]
    if unlabeled:
        raise DatasetError(f"{where}: {len(unlabeled)} image(s) have no row, e.g. {', '.join(unlabeled[:3])}. Add a "
                           f"row `<file>,<{column}>` for each (file relative to {root}), or remove those images")
    return values


def _check_head_classes(head: HeadLabels, train: list[Sample]) -> None:
    """Every class of a head needs training images, as every class folder does."""
    counts = np.bincount(head.labels(train), minlength=len(head.class_names))
    empty = [name for name, n in zip(head.class_names, counts) if n == 0]
    if empty:
        raise DatasetError(f"model.heads '{head.name}': class(es) {', '.join(empty)} have no training images; "
                           f"label some training images with them, or drop those labels from {head.source}")


def stratified_split(samples: list[Sample], fraction: float, rng: np.random.Generator):
    """Split per class: a seeded `fraction` of each class (at least one when it has two or more) is held out."""
    if fraction <= 0:
        return list(samples), []
    keep, held = [], []
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.path):
        by_class.setdefault(s.label, []).append(s)
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n_held = int(round(len(items) * fraction))
        if len(items) >= 2:
            n_held = min(max(n_held, 1), len(items) - 1)
        else:
            n_held = 0
        held += [items[i] for i in order[:n_held]]
        keep += [items[i] for i in order[n_held:]]
    return keep, held


def _cap_per_class(samples: list[Sample], cap: int, rng: np.random.Generator) -> list[Sample]:
    kept, seen = [], Counter()
    for i in rng.permutation(len(samples)):
        s = samples[i]
        if seen[s.label] < cap:
            kept.append(s)
            seen[s.label] += 1
    return sorted(kept, key=lambda s: s.path)


# ---------------------------------------------------------------------------------------------------------
# Feeding the data


def load_arrays(samples: list[Sample], image_size: int, resize: str = "plain"):
    """Decode samples into (uint8 images (N,S,S,3), int labels): for calibration and validation sets."""
    images = decode_images([s.path for s in samples], image_size, resize)
    return images, np.array([s.label for s in samples], dtype=np.int64)


def make_dataset(samples: list[Sample], image_size: int, resize: str = "plain", batch_size: int = 32,
                 shuffle: bool = False, seed: int = 0, augment=None, cache: str = "memory",
                 cache_dir: str | os.PathLike | None = None, targets: dict[str, np.ndarray] | None = None):
    """tf.data pipeline: parallel Pillow decode -> cache -> shuffle -> batch -> augment -> prefetch.

    Yields (float32 images in 0..255, int32 labels), or (images, {head: int32 labels}) when `targets`
    (per-head labels aligned with `samples`, see DatasetSplits.targets) is given. `augment` is an
    AugmentConfig, used only when given (training batches).
    """
    import tensorflow as tf

    paths = [s.path for s in samples]
    if targets is None:
        labels = np.array([s.label for s in samples], dtype=np.int32)
    else:
        labels = {name: np.asarray(values, dtype=np.int32) for name, values in targets.items()}

    def _decode(path):
        return decode_image(path.decode("utf-8"), image_size, resize)

    def _load(path, label):
        img = tf.numpy_function(_decode, [path], tf.uint8, stateful=False)
        img.set_shape((image_size, image_size, 3))
        return img, label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle and cache == "none":  # shuffle file names, not decoded images: memory stays flat
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache == "memory":
        ds = ds.cache()
    elif cache == "disk":
        folder = Path(cache_dir or cache_root() / "tfdata")
        folder.mkdir(parents=True, exist_ok=True)
        heads = ",".join(targets or ())  # the cache holds the labels too
        key = hashlib.sha256("\n".join(paths).encode() + f"{image_size}{resize}{heads}".encode()).hexdigest()[:16]
        ds = ds.cache(str(folder / f"cache-{key}"))
    if shuffle and cache != "none":  # the disk cache fixes the order, so shuffle after it, in a bounded buffer
        buffer = len(paths) if cache == "memory" else min(len(paths), DISK_SHUFFLE_BUFFER)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None and augment.enabled:
        layers = augmentation_layers(augment, seed)
        ds = ds.map(lambda x, y: (tf.clip_by_value(layers(x, training=True), 0.0, 255.0), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def augmentation_layers(cfg, seed: int = 0):
    """Keras preprocessing layers for the configured augmentations (applied to training batches only)."""
    import tf_keras as keras

    L = keras.layers
    layers = []
    if cfg.flip != "none":
        layers.append(L.RandomFlip(cfg.flip, seed=seed))
    if cfg.rotation > 0:
        layers.append(L.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed + 1))
    if cfg.zoom > 0:
        layers.append(L.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed + 2))
    if cfg.translation > 0:
        layers.append(L.RandomTranslation(cfg.translation, cfg.translation, fill_mode="reflect", seed=seed + 3))
    if cfg.contrast > 0:
        layers.append(L.RandomContrast(cfg.contrast, seed=seed + 4))
    if cfg.brightness > 0:
        layers.append(L.RandomBrightness(cfg.brightness, value_range=(0, 255), seed=seed + 5))
    return keras.Sequential(layers, name="augment")
