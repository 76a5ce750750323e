import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flain_cli.auxdata import AuxSet, export_aux, load_aux, patched_copies
from flain_cli.datasets import DATASETS
from flain_cli.errors import AuxError, ConfigError

from .conftest import invoke, make_images, write_aux_folder

SHAPE = (1, 28, 28)
NAMES = list(DATASETS.get("fmnist").classes)


def test_folder_with_class_indices(tmp_path):
    aux = load_aux(write_aux_folder(tmp_path / "aux"), SHAPE, 10)
    images, labels = make_images(50, 2)
    assert aux.images.shape == (50, 1, 28, 28) and aux.resized == 0
    assert sorted(aux.labels.tolist()) == sorted(labels.tolist())
    # every image decoded exactly (PNG is lossless)
    order = sorted(range(50), key=lambda i: (str(labels[i]), str(i)))
    assert torch.equal(aux.images[0, 0], torch.from_numpy(images[order[0]]))


def test_folder_with_class_names_rgb_and_other_sizes_is_converted(tmp_path):
    root = write_aux_folder(tmp_path / "aux", names=[n.replace("/", "-") for n in NAMES], size=32, mode="RGB")
    names = [n.replace("/", "-") for n in NAMES]
    aux = load_aux(root, SHAPE, 10, names)
    assert aux.images.shape == (50, 1, 28, 28) and aux.resized == 50
    assert torch.bincount(aux.labels).tolist() == [5] * 10
    assert load_aux(root, (3, 32, 32), 10, names).images.shape == (50, 3, 32, 32)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_tensor_files(tmp_path, suffix):
    images, labels = make_images(20, 0)
    path = tmp_path / f"aux{suffix}"
    arrays = {"images": images, "labels": labels.astype(np.int64)}
    np.savez(path, **arrays) if suffix == ".npz" else save_file(arrays, str(path))
    aux = load_aux(path, SHAPE, 10)
    assert torch.equal(aux.images[:, 0], torch.from_numpy(images)) and aux.labels.tolist() == labels.tolist()
    rgb = np.repeat(images[..., None], 3, axis=3)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=labels)
    assert torch.equal(load_aux(tmp_path / "rgb.npz", SHAPE, 10).images[:, 0], torch.from_numpy(images))


def test_bad_aux_sets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuxError, match="no class subfolders"):
        load_aux(tmp_path / "empty", SHAPE, 10)
    (tmp_path / "noimg" / "3").mkdir(parents=True)
    with pytest.raises(AuxError, match="no PNG/JPEG images"):
        load_aux(tmp_path / "noimg", SHAPE, 10)
    root = write_aux_folder(tmp_path / "broken")
    (root / "3" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AuxError, match="cannot read aux image .*bad.png"):
        load_aux(root, SHAPE, 10)
    with pytest.raises(AuxError, match="has label 5, but the model has classes 0..4"):
        load_aux(write_aux_folder(tmp_path / "many"), SHAPE, 5)
    (tmp_path / "named" / "Sweater").mkdir(parents=True)
    with pytest.raises(AuxError, match="neither a class index nor a class name"):
        load_aux(tmp_path / "named", SHAPE, 10, NAMES)
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 28, 28, 2), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(AuxError, match="2 channels"):
        load_aux(tmp_path / "two.npz", SHAPE, 10)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(AuxError, match="must be uint8"):
        load_aux(tmp_path / "float.npz", SHAPE, 10)
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(AuxError, match="needs arrays 'images' and 'labels'"):
        load_aux(tmp_path / "nolabels.npz", SHAPE, 10)
    with pytest.raises(AuxError, match="does not exist"):
        load_aux(tmp_path / "missing", SHAPE, 10)


def test_export_is_balanced_seeded_and_loadable(tmp_path, fmnist_dir):
    manifest = export_aux("fmnist", 3, tmp_path / "aux", data_dir=fmnist_dir, seed=4)
    again = export_aux("fmnist", 3, tmp_path / "aux2", data_dir=fmnist_dir, seed=4)
    assert manifest["indices"] == again["indices"] and manifest["count"] == 30
    aux = load_aux(tmp_path / "aux", SHAPE, 10, NAMES)
    assert torch.bincount(aux.labels).tolist() == [3] * 10
    with pytest.raises(ConfigError, match="already exists"):
        export_aux("fmnist", 3, tmp_path / "aux", data_dir=fmnist_dir)
    export_aux("fmnist", 2, tmp_path / "aux", data_dir=fmnist_dir, overwrite=True)
    assert len(load_aux(tmp_path / "aux", SHAPE, 10)) == 20
    with pytest.raises(ConfigError, match="only 20 images of class"):
        export_aux("fmnist", 25, tmp_path / "aux3", data_dir=fmnist_dir)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "aux"))) == ["aux", "aux2"]


def test_npz_export_can_exclude_an_earlier_export(tmp_path, fmnist_dir):
    from flain_cli.auxdata import exported_indices
    aux = export_aux("fmnist", 5, tmp_path / "aux", data_dir=fmnist_dir)
    test = export_aux("fmnist", 10, tmp_path / "test.npz", data_dir=fmnist_dir, fmt="npz",
                      exclude=exported_indices(tmp_path / "aux"))
    assert not set(aux["indices"]) & set(test["indices"])
    assert exported_indices(tmp_path / "test.npz") == test["indices"]
    loaded = load_aux(tmp_path / "test.npz", SHAPE, 10)
    assert len(loaded) == 100 and torch.bincount(loaded.labels).tolist() == [10] * 10
    with pytest.raises(ConfigError, match="only 15 images of class"):  # 20 per class, 5 excluded
        export_aux("fmnist", 16, tmp_path / "t2.npz", data_dir=fmnist_dir, fmt="npz",
                   exclude=exported_indices(tmp_path / "aux"))
    with pytest.raises(ConfigError, match="is not a `flain aux export` output"):
        exported_indices(tmp_path)


def test_npz_export_without_the_suffix_still_writes_a_readable_npz(tmp_path, fmnist_dir):
    sets = tmp_path / "sets"
    res = invoke("aux", "export", "--per-class", "2", "--format", "npz", "--out", sets / "subset",
                 "--data-dir", fmnist_dir, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["out"] == str(sets / "subset.npz")
    assert [p.name for p in sets.iterdir()] == ["subset.npz"]
    assert len(load_aux(sets / "subset.npz", SHAPE, 10)) == 20


def test_holdout_split_is_stratified_seeded_and_disjoint(tmp_path):
    aux = load_aux(write_aux_folder(tmp_path / "aux", per_class=6), SHAPE, 10)
    rest, held = aux.split(0.5, seed=3)
    assert len(rest) == len(held) == 30
    assert torch.bincount(held.labels).tolist() == [3] * 10 == torch.bincount(rest.labels).tolist()
    again = aux.split(0.5, seed=3)[1]
    assert torch.equal(again.images, held.images)
    assert not torch.equal(aux.split(0.5, seed=4)[1].images, held.images)
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="^holdout must be between 0 and 1"):
            aux.split(bad)


def test_translations_move_the_images_by_every_offset_with_a_black_border():
    images = torch.arange(1, 2 * 1 * 4 * 5 + 1, dtype=torch.uint8).view(2, 1, 4, 5)
    aux = AuxSet(images, torch.tensor([0, 1]), "t")
    moved = list(aux.translations(1))
    assert len(moved) == 9 and torch.equal(moved[4], images)  # (dy, dx) = (0, 0) in the middle
    first, last = moved[0], moved[-1]  # moved down-right and up-left by one pixel
    assert torch.equal(first[..., 1:, 1:], images[..., :-1, :-1])
    assert first[..., 0, :].eq(0).all() and first[..., :, 0].eq(0).all()
    assert torch.equal(last[..., :-1, :-1], images[..., 1:, 1:])
    assert last[..., -1, :].eq(0).all() and last[..., :, -1].eq(0).all()
    assert [len(list(aux.translations(s))) for s in (0, 2)] == [1, 25]
    for bad in (-1, 4):
        with pytest.raises(ConfigError, match=r"^shifts must be from 0 to 3 pixels for 5x4 images"):
            list(aux.translations(bad))


def test_patched_copies_hold_one_white_square_each():
    images = torch.randint(0, 200, (5, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = patched_copies(images, 3)
    assert out.shape == (15, 3, 12, 10) and out.dtype == torch.uint8
    assert torch.equal(out, patched_copies(images, 3))  # seeded: the same copies every time
    assert not torch.equal(out, patched_copies(images, 3, seed=1))
    for i, copy in enumerate(out):
        changed = (copy != images[i % 5]).any(dim=0)  # pixels below 200 became 255: the whole square
        assert bool((copy[:, changed] == 255).all()) and torch.equal(changed, (copy == 255).all(dim=0))
        rows, cols = changed.nonzero(as_tuple=True)
        side = int(rows.max() - rows.min() + 1)
        assert 2 <= side <= 6 and int(cols.max() - cols.min() + 1) == side and int(changed.sum()) == side * side
    assert not torch.equal(out[:5], out[5:10])  # each copy draws its own squares
    assert patched_copies(images, 0).shape == (0, 3, 12, 10)
