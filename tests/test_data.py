"""Datasets: every image format and corruption case, layouts, splits, the tf.data pipeline."""
import io

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from edgetl.data import DatasetError, Sample, load_splits, make_dataset, stratified_split
from edgetl.edge.images import ImageError, decode_image, load_rgb
from edgetl.recipe import recipe_from_dict


def recipe_for(path, **data):
    return recipe_from_dict({"data": {"source": str(path), **data}})


def test_formats_and_modes_become_8bit_rgb(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    cases = {
        "a.jpg": Image.fromarray(rgb),
        "b.bmp": Image.fromarray(rgb),
        "c_gray.png": Image.fromarray(np.full((10, 12), 128, np.uint8), "L"),
        "d_rgba.png": Image.fromarray(np.dstack([rgb, np.full((10, 12), 255, np.uint8)]), "RGBA"),
        "e_cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "f_palette.png": Image.fromarray(rgb).convert("P"),
        "g_16bit.png": Image.fromarray(np.full((10, 12), 65535, np.uint16)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
    for name in cases:
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (12, 10), name
    assert np.asarray(load_rgb(tmp_path / "g_16bit.png")).max() == 255
    assert np.asarray(load_rgb(tmp_path / "c_gray.png"))[0, 0].tolist() == [128, 128, 128]
    assert abs(int(np.asarray(load_rgb(tmp_path / "e_cmyk.jpg"))[5, 5, 0]) - 200) < 12


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "x.gif", save_all=True, append_images=frames[1:])
    assert decode_image(tmp_path / "x.gif", 8)[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(tmp_path / "o.jpg")
    assert out.size == (10, 20)  # portrait after applying the tag
    arr = np.asarray(out)
    assert arr[2, 5].mean() > 200 and arr[17, 5].mean() < 50  # white half is now on top


def test_resize_modes(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # white strip at the left edge
    Image.fromarray(img).save(tmp_path / "w.png")
    plain = decode_image(tmp_path / "w.png", 16, "plain")
    crop = decode_image(tmp_path / "w.png", 16, "center_crop")
    assert plain.shape == crop.shape == (16, 16, 3)
    assert plain[:, 0].mean() > 200 and crop[:, 0].mean() < 50  # centre crop cuts the strip away


def test_truncated_and_non_images_raise(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[:200])
    (tmp_path / "n.png").write_text("not an image")
    for name in ("t.jpg", "n.png"):
        with pytest.raises(ImageError) as err:
            load_rgb(tmp_path / name)
        assert name in str(err.value)


def test_bad_files_are_skipped_and_listed(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=6)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "green" / "notes.txt").write_text("hello")
    (root / "blue" / ".DS_Store").write_bytes(b"\0")
    splits = load_splits(recipe_for(root))
    reasons = {p.split("/")[-1]: r for p, r in ((s.path, s.reason) for s in splits.skipped)}
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert "not an image" in reasons["notes.txt"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 18


def test_empty_class_single_class_and_empty_dir_are_errors(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4)
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty have no usable training images"):
        load_splits(recipe_for(root))
    one = make_image_folder(tmp_path / "one", per_class=4, classes={"red": (255, 0, 0)})
    with pytest.raises(DatasetError, match="only one class folder"):
        load_splits(recipe_for(one))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="no class folders found"):
        load_splits(recipe_for(tmp_path / "nothing"))
    with pytest.raises(DatasetError, match="no such folder"):
        load_splits(recipe_for(tmp_path / "missing"))


def test_split_is_deterministic_and_stratified(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20)
    a = load_splits(recipe_for(root, test_split=0.25, val_split=0.2))
    b = load_splits(recipe_for(root, test_split=0.25, val_split=0.2))
    assert a.test == b.test and a.train == b.train and a.val == b.val
    assert [sum(s.label == c for s in a.test) for c in range(3)] == [5, 5, 5]
    all_paths = [s.path for s in a.train + a.val + a.test]
    assert len(all_paths) == len(set(all_paths)) == 60
    other = load_splits(recipe_from_dict({"seed": 1, "data": {"source": str(root), "test_split": 0.25}}))
    assert other.test != a.test
    assert a.fingerprint() == b.fingerprint() and a.fingerprint()["files_sha256"] != other.fingerprint()["files_sha256"]


def test_stratified_split_keeps_one_of_each_when_possible():
    samples = [Sample(f"{i}", 0) for i in range(3)] + [Sample("x", 1)]
    keep, held = stratified_split(samples, 0.1, np.random.default_rng(0))
    assert len([s for s in held if s.label == 0]) == 1 and all(s.label == 0 for s in held)
    assert Sample("x", 1) in keep


def test_train_test_layout_and_val_folder(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=8)
    make_image_folder(tmp_path / "d" / "test", per_class=3, seed=1)
    splits = load_splits(recipe_for(tmp_path / "d", val_split=0.25))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 9)
    make_image_folder(tmp_path / "d" / "val", per_class=2, seed=2)
    splits = load_splits(recipe_for(tmp_path / "d"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 9)
    make_image_folder(tmp_path / "d" / "test", per_class=1, classes={"purple": (128, 0, 128)})
    with pytest.raises(DatasetError, match="purple"):
        load_splits(recipe_for(tmp_path / "d"))


def test_pipeline_yields_raw_pixels_and_augments_only_when_asked(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, size=24)
    splits = load_splits(recipe_for(root, test_split=0.25, val_split=0.0))
    ds = make_dataset(splits.train, 24, batch_size=4)
    x, y = next(iter(ds))
    assert x.shape == (4, 24, 24, 3) and x.dtype.name == "float32" and y.dtype.name == "int32"
    expected = decode_image(splits.train[0].path, 24).astype(np.float32)
    np.testing.assert_array_equal(x[0].numpy(), expected)
    aug = recipe_from_dict({"augment": {"flip": "horizontal", "rotation": 0.2, "brightness": 0.3}}).augment
    xa, _ = next(iter(make_dataset(splits.train, 24, batch_size=4, augment=aug, seed=3)))
    assert not np.allclose(xa.numpy(), x.numpy())
    assert xa.numpy().min() >= 0 and xa.numpy().max() <= 255
    xs, _ = next(iter(make_dataset(splits.train, 24, batch_size=4, shuffle=True, seed=1)))
    assert sorted(xs.numpy().sum(axis=(1, 2, 3))) != sorted(x.numpy().sum(axis=(1, 2, 3))) or len(splits.train) == 4


def test_digits_builtin_is_real_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path))
    splits = load_splits(recipe_from_dict({"data": {"source": "digits"}}))
    assert splits.class_names == [str(i) for i in range(10)]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    img = decode_image(splits.test[0].path, 32)
    assert img.shape == (32, 32, 3) and img.max() > 100
