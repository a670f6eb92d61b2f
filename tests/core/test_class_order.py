"""A model and the owner's data set meet by their class names: numbers are names too.

An image folder of classes "0" … "11" reads them as text ("0", "1", "10", "11", "2", ...); a model wrapped on an
``.npz`` without labels numbers them 0 … 11. Taken as they were, the teacher answered the wrong class for 10 of the 12
(16.7 % top-1 on the folder, 81.9 % on the ``.npz``), and distill and audit succeeded on scrambled labels.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sdb_core.bundle import export_bundle
from sdb_core.data import load_dataset

CLASSES, PER_CLASS, SIDE = 12, 20, 8


@pytest.fixture(scope="module")
def numbered_sets(tmp_path_factory):
    """The same images of 12 classes twice: an ``.npz`` without labels (classes numbered 0 … 11) and an image folder
    of class folders "0" … "11"; and the folder's name as a data set."""
    root = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, (CLASSES, SIDE, SIDE))
    y = np.repeat(np.arange(CLASSES), PER_CLASS)
    x = np.clip(base[y] + rng.normal(0, 20, (len(y), SIDE, SIDE)), 0, 255).astype(np.uint8)
    np.savez(root / "numbered.npz", x=x, y=y)
    for i, (image, c) in enumerate(zip(x, y)):
        (root / "folder" / str(c)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(root / "folder" / str(c) / f"{i}.png")
    folder = f"imagefolder:{root / 'folder'}"
    return load_dataset(f"npz:{root / 'numbered.npz'}"), load_dataset(folder, image_size=SIDE), folder


def nearest_mean(data) -> nn.Module:
    """A classifier of ``data``'s classes in its order: the nearest class mean of its training inputs."""
    x, y = data.train.tensors
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(data.num_classes)])
    linear = nn.Linear(means.shape[1], data.num_classes)
    with torch.no_grad():  # argmax of x·m − |m|²/2 is the nearest mean m
        linear.weight.copy_(means)
        linear.bias.copy_(-means.pow(2).sum(1) / 2)
    return nn.Sequential(nn.Flatten(), linear).eval()


def test_a_numbered_teacher_answers_an_image_folders_numbered_classes_by_name(numbered_sets, tmp_path):
    from sdb_core.protect.attacks import public_api
    from sdb_core.tasks import ModelRef
    from sdb_core.tasks.audit import load_target
    from sdb_core.tasks.distill import bundle_teacher

    npz, folder, _ = numbered_sets
    assert npz.labels == [str(c) for c in range(CLASSES)]
    assert folder.labels[:4] == ["0", "1", "10", "11"]  # as text: the premise
    bundle = export_bundle(nearest_mean(npz), tmp_path / "numbered", name="numbered", in_shape=npz.in_shape,
                           mean=npz.mean, std=npz.std, labels=npz.labels)
    x, y = folder.train.tensors
    top = bundle_teacher(bundle, None, False, npz)(npz.train.tensors[0]).argmax(1)
    assert (top == npz.train.tensors[1]).float().mean() > 0.95  # the teacher itself
    top = bundle_teacher(bundle, None, False, folder)(x).argmax(1)  # what distill's job is taught by
    assert (top == y).float().mean() > 0.95
    top = public_api(load_target(ModelRef(bundle=str(bundle)), folder))(x).argmax(1)  # what audit scores
    assert (top == y).float().mean() > 0.95


def test_a_teacher_of_the_classes_in_another_order_is_refused_before_any_training(numbered_sets, tmp_path):
    # A teacher trained on the classes in numeric order, given with the image folder read in text order, scored 16.7 %
    # (chance 8.3 %: it passed the "learned" bar), and its box taught every student the wrong class.
    from sdb_core.bundle import export_onnx
    from sdb_core.progress import Hooks
    from sdb_core.tasks.wrap import WrapTask, _require_learned, run

    npz, folder, folder_name = numbered_sets
    teacher = tmp_path / "numeric.onnx"
    teacher.write_bytes(export_onnx(nearest_mean(npz), npz.in_shape))
    phases = []
    task = WrapTask.from_options(folder_name, None, teacher=str(teacher), epochs=1)
    with pytest.raises(ValueError, match=r"the teacher's classes seem to be in another order than the data set's "
                                         r"\('0', '1', '10', '11', '2', \.\.\.\): it scores 16\.7%.*100\.0% with the set's "
                                         r"classes read from its outputs as '10' \(class 2\) -> output 10, "
                                         r"'11' \(class 3\) -> output 11, '2' \(class 4\) -> output 2, .*"
                                         r"class folders named to sort so"):
        run(task, tmp_path / "box", Hooks(phase=lambda name: phases.append(name)), master_key=b"k" * 32)
    assert phases == [] and not (tmp_path / "box").exists()  # before any epoch, nothing written
    _require_learned(nearest_mean(npz), npz)  # in its own order the same teacher passes
    _require_learned(nearest_mean(folder), folder)


def test_the_teacher_checks_message_quotes_each_class_name(numbered_sets):
    # Names joined with ", " could not be told apart where a name holds a comma ("tench, Tinca tinca").
    from dataclasses import replace

    from sdb_core.tasks.wrap import _require_learned

    npz, _, _ = numbered_sets
    named = replace(npz, labels=["tench, Tinca tinca", "goldfish", *npz.labels[2:]])
    at_chance = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, CLASSES))
    nn.init.zeros_(at_chance[1].weight)
    with torch.no_grad():
        at_chance[1].bias.copy_(torch.arange(CLASSES, dtype=torch.float))  # always the last class
    with pytest.raises(ValueError, match=r"its classes in the data set's order \('tench, Tinca tinca', 'goldfish', "
                                         r"'2', '3', '4', \.\.\.\)"):
        _require_learned(at_chance.eval(), named)
