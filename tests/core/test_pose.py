"""Pose data and metrics: the synthetic COCO set, the loader's flips and weights, decoding, PCK and OKS AP."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdb_core.data.pose import (
    FLIP_PAIRS,
    KEYPOINTS,
    NUM_JOINTS,
    flip_index,
    load_coco_keypoints,
    make_synthetic_coco,
)
from sdb_core.distill.okdhp import heatmap_mse
from sdb_core.distill.pose_metrics import decode_heatmaps, evaluate_heatmaps, oks_ap, pck


@pytest.fixture(scope="session")
def pose_root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("pose") / "syn", n_train=60, n_test=60, seed=3)


@pytest.fixture(scope="session")
def pose(pose_root):
    return load_coco_keypoints(pose_root, input_size=64)


def test_generator_writes_coco_that_pycocotools_loads(pose_root):
    from pycocotools.coco import COCO

    coco = COCO(str(pose_root / "annotations" / "person_keypoints_test.json"))
    assert len(coco.getImgIds()) == 60
    cat = coco.loadCats(coco.getCatIds(catNms=["person"]))[0]
    assert cat["keypoints"] == KEYPOINTS and len(cat["skeleton"]) == 19
    anns = coco.loadAnns(coco.getAnnIds())
    vis = np.concatenate([np.array(a["keypoints"]).reshape(-1, 3)[:, 2] for a in anns])
    assert set(vis.tolist()) <= {0, 1, 2}
    assert (vis == 1).any() and (vis == 0).any(), "occluded (v=1) and out-of-frame (v=0) joints both occur"
    for a in anns:
        kp = np.array(a["keypoints"]).reshape(-1, 3)
        assert a["num_keypoints"] == int((kp[:, 2] > 0).sum())
        assert (kp[kp[:, 2] == 0, :2] == 0).all()  # unlabelled joints carry no coordinates, as in COCO
        img = coco.loadImgs(a["image_id"])[0]
        assert (pose_root / "images" / "test" / img["file_name"]).is_file()
    # Regenerating with the same parameters reuses the files; other parameters are a different set.
    stamp = json.loads((pose_root / "synthetic.json").read_text())
    assert stamp["seed"] == 3 and make_synthetic_coco(pose_root, n_train=60, n_test=60, seed=3) == pose_root


def test_decoding_ground_truth_heatmaps_recovers_the_annotations(pose):
    test = pose.test
    hm = np.stack([test.target(test.joints[i], test.weights[i]) for i in range(len(test))])
    m = evaluate_heatmaps(hm, test, pose.test_ann_file)
    assert m["pck"] >= 99.0 and m["ap"] >= 95.0, m
    # ...and the metrics do fall when the keypoints are wrong: they can fail.
    pts, scores = decode_heatmaps(hm, test.stride)
    side = test.meta.bboxes[:, 2:].max(1)[:, None, None]
    off = test.to_image(pts) + side * np.array([0.2, -0.2])  # 0.28 of the box away
    assert pck(off, test.meta.joints, test.meta.visibility, test.meta.bboxes) < 0.05
    assert oks_ap(off, scores, test, pose.test_ann_file) < 0.5


def test_decode_moves_a_quarter_pixel_towards_the_higher_neighbour():
    hm = np.zeros((1, 2, 8, 8), dtype=np.float32)
    hm[0, 0, 3, 5], hm[0, 0, 3, 6], hm[0, 0, 2, 5] = 1.0, 0.5, 0.2  # right and upper neighbours higher
    hm[0, 1, 4, 0] = 1.0  # on the border: no shift on x
    pts, scores = decode_heatmaps(hm, stride=4)
    # (5.25 + 0.5) * 4 - 0.5 = 22.5 and (2.75 + 0.5) * 4 - 0.5 = 12.5
    np.testing.assert_allclose(pts[0, 0], [22.5, 12.5])
    np.testing.assert_allclose(pts[0, 1], [1.5, 17.5])
    np.testing.assert_allclose(scores[0], [1.0, 1.0])


def test_flip_mirrors_the_crop_and_swaps_left_and_right(pose):
    train = pose.train
    i = int(np.flatnonzero((train.weights[:, 9] > 0) & (train.weights[:, 10] > 0))[0])  # both wrists labelled
    x, y, w = train.item(i)
    xf, yf, wf = train.item(i, flip=True)
    torch.testing.assert_close(xf, x.flip(-1))
    for a, b in FLIP_PAIRS:  # left joint a of the flipped crop is the mirrored right joint b
        torch.testing.assert_close(yf[a], y[b].flip(-1), atol=1e-5, rtol=0)
        assert wf[a] == w[b] and wf[b] == w[a]
    torch.testing.assert_close(yf[0], y[0].flip(-1), atol=1e-5, rtol=0)  # the nose stays the nose
    assert flip_index()[KEYPOINTS.index("left_wrist")] == KEYPOINTS.index("right_wrist")
    # Random flips happen in training mode only.
    torch.manual_seed(0)
    assert any(not torch.equal(train[i][0], x) for _ in range(10))
    assert all(torch.equal(pose.test[0][0], pose.test.item(0)[0]) for _ in range(5))


def test_visibility_weights_zero_out_unlabelled_joints(pose):
    train = pose.train
    unl = train.meta.visibility == 0
    assert unl.any()
    assert (train.weights[unl] == 0).all() and (train.weights[train.meta.visibility == 2] > 0).mean() > 0.95
    i, j = map(int, np.argwhere(unl)[0])
    x, y, w = train.item(i)
    assert w[j] == 0 and y[j].abs().sum() == 0 and y[w > 0].amax(dim=(1, 2)).min() > 0.5
    # A wrong prediction on the unlabelled joint costs nothing; on a labelled one it does.
    pred = y.clone()[None]
    base = heatmap_mse(pred, y[None], w[None])
    pred[0, j] += 1.0
    assert heatmap_mse(pred, y[None], w[None]) == base
    k = int(torch.nonzero(w > 0)[0])
    pred[0, k] += 1.0
    assert heatmap_mse(pred, y[None], w[None]) > base
    assert y.shape == (NUM_JOINTS, 16, 16) and x.shape == (3, 64, 64)
