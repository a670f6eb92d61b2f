"""Dataset zips as other tools and sites lay them out: Kaggle's split folders (refused, naming the folder to give,
not read as two classes) and Windows PowerShell 5.1's ``\\`` separators (read as folders, still checked for ``..``
and absolute paths), uploaded to ``POST /v1/files`` and loaded as a job loads them."""
from __future__ import annotations

import pytest

from sdb_core.data import load_dataset
from service.files import dataset_name

from .test_files_api import api_key, assert_refused, png, upload, zip_of

pytestmark = pytest.mark.anyio


def kaggle_cats_and_dogs() -> bytes:
    """Kaggle's "cat and dog" set: training_set/training_set/{cats,dogs}, test_set/test_set/{cats,dogs}."""
    return zip_of({f"{split}/{split}/{cls}/{cls[:-1]}.{i}.png": png(mode="RGB") for split in ("training_set", "test_set")
                   for cls in ("cats", "dogs") for i in range(3)})


async def test_kaggle_split_folders_are_refused_naming_the_folder_to_give(svc):
    """It was kept as the classes ['test_set', 'training_set'] (every image of a split one class), and a wrap
    shipped a box with those labels."""
    h = svc.auth(svc.key(("jobs",)))
    await assert_refused(svc, h, kaggle_cats_and_dogs(), "dataset", "invalid_dataset",
                         ["catdog.zip: class folder test_set/ holds no images of its own",
                          "test_set/test_set/cats/", "folder of classes or a split", "(test_set/test_set/)",
                          "train/<class>/<images>"], "catdog.zip")


async def test_class_images_in_one_sub_folder_or_beside_others_are_still_one_class(svc):
    h = svc.auth(svc.key(("jobs",)))
    members = {**{f"pets/cats/images/{i}.png": png() for i in range(3)},
               **{f"pets/dogs/{d}{i}.png": png() for d in ("", "indoor/", "outdoor/") for i in range(2)}}
    r = await upload(svc, h, zip_of(members), "dataset", "pets.zip")
    assert r.status_code == 201 and r.json()["info"]["classes"] == ["cats", "dogs"], r.text
    assert r.json()["info"]["images"] == 9


async def test_powershell_backslash_names_are_folders(svc):
    """Compress-Archive (PowerShell 5.1) writes 'cat\\0.png': refused as 'an unusable name'."""
    token = svc.key(("jobs",))
    h = svc.auth(token)
    members = {f"pets\\{c}\\{i}.png": png() for c in ("cat", "dog") for i in range(3)}
    r = await upload(svc, h, zip_of(members), "dataset", "windows.zip")
    assert r.status_code == 201 and r.json()["info"]["classes"] == ["cat", "dog"], r.text
    data = load_dataset(dataset_name(svc.app.state.store, svc.settings, api_key(svc, token), r.json()["id"]),
                        image_size=8)
    assert data.labels == ["cat", "dog"] and len(data.train) + len(data.test) == 6


@pytest.mark.parametrize("name,words", [
    ("..\\x.png", [".."]),
    ("cat\\..\\..\\x.png", [".."]),
    ("\\x.png", ["absolute"]),
    ("C:\\x.png", ["absolute"]),
], ids=["dotdot", "dotdot-nested", "rooted", "drive-letter"])
async def test_backslash_names_that_leave_the_folder_are_refused(svc, name, words):
    h = svc.auth(svc.key(("jobs",)))
    members = {**{f"{c}\\{i}.png": png() for c in ("cat", "dog") for i in range(3)}, name: png()}
    await assert_refused(svc, h, zip_of(members), "dataset", "invalid_dataset", words, "w.zip")
