"""Models past ONNX's 2 GiB protobuf limit keep their weights in "external data" (model.onnx.data beside the
graph), which a bundle does not hold. The refusal said to "save it without external data", which cannot be done
past 2 GiB, and a meta.json that lists model.onnx.data said "model.onnx.data is missing" with the file there.
Both now say what is not supported (docs/deploy.md, "Model size")."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from sdb_core.bundle import BundleError, _sha256, export_bundle, load_bundle


def _external_data_bundle(tmp_path, *, listed: bool):
    """A plain bundle whose graph was saved with its weights in model.onnx.data, as ONNX saves one past 2 GiB."""
    out = export_bundle(torch.nn.Linear(64, 10), tmp_path / f"ext-{listed}", name="ext", in_shape=(64,),
                        mean=(0.0,), std=(1.0,), labels=[f"c{i}" for i in range(10)])
    onnx.save_model(onnx.load(out / "model.onnx"), out / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    meta = json.loads((out / "meta.json").read_text())
    meta["files"]["model.onnx"] = _sha256((out / "model.onnx").read_bytes())
    if listed:
        meta["files"]["model.onnx.data"] = _sha256((out / "model.onnx.data").read_bytes())
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_a_graph_with_external_data_is_refused_as_past_the_2_gib_limit(tmp_path):
    with pytest.raises(BundleError) as e:
        load_bundle(_external_data_bundle(tmp_path, listed=False))
    said = str(e.value)
    assert "external data" in said and "2 GiB protobuf limit are not supported" in said, said


def test_a_meta_listing_the_external_data_says_it_is_not_a_bundle_file(tmp_path):
    bundle = _external_data_bundle(tmp_path, listed=True)
    assert (bundle / "model.onnx.data").is_file()
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    said = str(e.value)
    assert "meta.json lists 'model.onnx.data', which is not a bundle file" in said, said
    assert "is missing" not in said and "2 GiB protobuf limit, are not supported" in said, said
