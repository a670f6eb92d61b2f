"""The synthetic scene generator: labels are exact and consistent with depth and occlusion."""
from __future__ import annotations

import numpy as np
import pytest

from sdb_core.data.scenes import BACKGROUND_DEPTH, SHAPES, edge_map, make_scenes, shape_mask


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(60, size=48, num_classes=4, seed=3)


def test_shapes_dtypes_and_ranges(scenes):
    n, size = 60, 48
    assert scenes.images.shape == (n, 3, size, size) and scenes.images.dtype == np.float32
    assert scenes.seg.shape == (n, size, size) and scenes.seg.dtype == np.int64
    assert scenes.depth.shape == (n, size, size) and scenes.depth.dtype == np.float32
    assert 0.0 <= scenes.images.min() and scenes.images.max() <= 1.0
    assert set(np.unique(scenes.seg)) <= set(range(5)) and len(np.unique(scenes.seg)) == 5
    assert scenes.class_names == SHAPES[:4] and scenes.counts.shape == (n, 4)


def test_background_is_farthest_and_only_background_is_there(scenes):
    bg = scenes.seg == 0
    assert np.all(scenes.depth[bg] == BACKGROUND_DEPTH)
    assert np.all(scenes.depth[~bg] < BACKGROUND_DEPTH)


def test_every_pixel_is_the_nearest_covering_shape():
    """Redraw every recorded shape and label each pixel by the nearest shape covering it.

    This is the painter's result recomputed by an independent rule (minimum depth over the
    covering shapes, in no particular order), so it checks that drawing far to near makes
    the labels and the depth map agree with occlusion.
    """
    n, size = 40, 48
    s = make_scenes(n, size=size, num_classes=5, seed=11)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    overlaps = 0
    for i in range(n):
        best_depth = np.full((size, size), BACKGROUND_DEPTH, np.float32)
        best_class = np.zeros((size, size), np.int64)
        covered = np.zeros((size, size), np.int64)
        order = np.random.default_rng(i).permutation(s.shape_class.shape[1])  # any order works
        for j in order:
            cls = int(s.shape_class[i, j])
            if cls == 0:
                continue
            cy, cx, r, angle = s.shape_geom[i, j]
            mask = shape_mask(SHAPES[cls - 1], yy, xx, cy, cx, r, angle)
            covered += mask
            nearer = mask & (s.shape_depth[i, j] < best_depth)
            best_depth[nearer] = s.shape_depth[i, j]
            best_class[nearer] = cls
        np.testing.assert_array_equal(s.seg[i], best_class)
        np.testing.assert_array_equal(s.depth[i], best_depth)
        overlaps += int((covered > 1).sum())
    assert overlaps > 500  # the set really has occlusions for the rule to decide
    assert s.counts.sum() == (s.shape_class > 0).sum()
    assert np.array_equal(s.visible, np.stack([(s.seg == c).any(axis=(1, 2)) for c in range(1, 6)], 1))


def test_deterministic_and_seeded():
    a, b, c = make_scenes(5, seed=1), make_scenes(5, seed=1), make_scenes(5, seed=2)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.seg, b.seg)
    assert not np.array_equal(a.images, c.images)


def test_bad_arguments_are_refused():
    for kwargs in ({"n": -1}, {"n": 2, "size": 8}, {"n": 2, "num_classes": 0}, {"n": 2, "num_classes": 7}):
        n = kwargs.pop("n")
        with pytest.raises(ValueError):
            make_scenes(n, **kwargs)


def test_edge_map_marks_class_boundaries():
    seg = np.zeros((6, 6), np.int64)
    seg[2:4, 2:4] = 1
    e = edge_map(seg)
    assert e[2, 2] == 1 and e[1, 2] == 1 and e[0, 0] == 0 and e.sum() == 4 + 8
