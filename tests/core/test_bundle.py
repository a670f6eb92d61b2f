import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from sdb_core.bundle import (
    KEY_BINDING,
    BundleError,
    _legacy_aad,
    export_bundle,
    export_onnx,
    key_aad,
    load_bundle,
    read_bundle_files,
    reseal_bundle,
)
from sdb_core.protect import NastyConfig, SDBConfig, SealError, train_box, wrap_nasty
from sdb_core.protect.key import new_master_key, seal, unseal
from sdb_core.train import TrainConfig

from .conftest import OutsideNet


@pytest.fixture(scope="module")
def box(digits, digits_teacher):
    return train_box(digits_teacher, digits, SDBConfig(train=TrainConfig(epochs=1))).box


@pytest.fixture(scope="module")
def master():
    return new_master_key()


def _export(box, digits, out, master):
    return export_bundle(box, out, name="digits-test", in_shape=digits.in_shape, mean=digits.mean,
                         std=digits.std, labels=digits.labels, master_key=master, metrics={"public_acc": 1.0})


@pytest.mark.parametrize("suffix", ["", ".sdb"])
def test_round_trip_and_onnx_parity(tmp_path, digits, box, master, suffix):
    path = _export(box, digits, tmp_path / f"b{suffix}", master)
    b = load_bundle(path, master)
    assert b.meta["name"] == "digits-test" and b.meta["input"]["shape"] == [1, 8, 8]
    assert b.meta["labels"] == digits.labels and b.has_key
    x = digits.test.tensors[0][:37]
    public = b.public_logits(x.numpy())
    keyed = b.distill_logits(x.numpy())
    assert np.abs(public - box.public_logits(x).numpy()).max() <= 1e-4
    assert np.abs(keyed - box.distill_logits(x).numpy()).max() <= 1e-4
    assert np.abs(public - keyed).max() > 1e-2
    assert np.allclose(b.predict(x.numpy()).sum(1), 1.0, atol=1e-5)
    assert b.meta["public_form"] == box.public_form  # the public answer travels with the network


def test_a_bundle_whose_fields_change_its_answers_says_format_2_and_a_later_format_is_refused(tmp_path, digits, box,
                                                                                               master):
    """Releases before the public form and the keyed scale read an sdb-bundle/1 bundle with them and served other
    answers (the network's probabilities; keyed logits 1/keyed_scale too large) under the same self-check report: a
    bundle that holds such a field says sdb-bundle/2, which they refuse. This release refuses a later format alike."""
    from sdb_core.bundle import ANSWER_FIELDS, FORMAT, FORMAT_2

    path = _export(box, digits, tmp_path / "box", master)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == FORMAT_2 and set(ANSWER_FIELDS) & set(meta)
    plain = export_bundle(OutsideNet(64, digits.num_classes), tmp_path / "plain", name="plain",
                          in_shape=digits.in_shape, mean=digits.mean, std=digits.std, labels=digits.labels)
    assert json.loads((plain / "meta.json").read_text())["format"] == FORMAT  # what every release reads alike
    meta["format"] = "sdb-bundle/3"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format 'sdb-bundle/3' is newer than this release reads"):
        load_bundle(path, master)


def test_a_public_form_that_is_not_one_is_refused(tmp_path, digits, box, master):
    good = box.public_form
    for i, (form, why) in enumerate([({**good, "partners": good["partners"][:9]}, "partners for each class"),
                                     ({**good, "partners": [[0], *good["partners"][1:]]}, "partners of class 0"),
                                     ({**good, "floor": 0.5}, "gap < floor"), ({**good, "gap": "1"}, "gap < floor"),
                                     ([[0.0] * 10] * 10, "partners")]):
        path = _export(box, digits, tmp_path / f"b{i}", master)
        meta = json.loads((path / "meta.json").read_text())
        meta["public_form"] = form
        (path / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=why):
            load_bundle(path)


def test_key_never_in_the_public_graph_or_meta(tmp_path, digits, box, master):
    path = _export(box, digits, tmp_path / "b", master)
    key = box.reveal_key().numpy().astype(np.float32).tobytes()
    for f in path.iterdir():
        assert key not in f.read_bytes(), f.name
    public_only = load_bundle(path)  # no master key: predictions, no keyed path
    assert not public_only.has_key
    with pytest.raises(PermissionError):
        public_only.distill_logits(digits.test.tensors[0][:1].numpy())
    assert "hidden" in repr(load_bundle(path, master))


def test_tampered_files_are_refused(tmp_path, digits, box, master):
    path = _export(box, digits, tmp_path / "b", master)
    model = bytearray((path / "model.onnx").read_bytes())
    model[len(model) // 2] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(model))
    with pytest.raises(BundleError, match="model.onnx was altered"):
        load_bundle(path, master)

    path = _export(box, digits, tmp_path / "c", master)
    meta = json.loads((path / "meta.json").read_text())
    meta["lam"] = 0.9  # hashes intact, but the sealed key is bound to the metadata
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SealError, match="altered"):
        load_bundle(path, master)

    path = _export(box, digits, tmp_path / "d", master)
    (path / "key.sealed").unlink()
    with pytest.raises(BundleError, match="key.sealed is missing"):
        load_bundle(path, master)
    with pytest.raises(SealError, match="wrong master key"):
        load_bundle(_export(box, digits, tmp_path / "e", master), new_master_key())


def test_malformed_bundles(tmp_path):
    with pytest.raises(BundleError, match="no bundle"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "junk.sdb").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="neither"):
        load_bundle(tmp_path / "junk.sdb")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(BundleError, match="neither.*bare ONNX graph is not a bundle.*export_bundle"):
        load_bundle(tmp_path / "model.onnx")
    with zipfile.ZipFile(tmp_path / "empty.sdb", "w") as z:
        z.writestr("meta.json", "{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "empty.sdb")


def test_nasty_and_outside_models_export(tmp_path, digits):
    net = OutsideNet(64, digits.num_classes)
    nasty = wrap_nasty(net, digits, NastyConfig(train=TrainConfig(epochs=1))).box
    path = export_bundle(nasty, tmp_path / "n", name="n", in_shape=digits.in_shape, mean=digits.mean,
                         std=digits.std, labels=digits.labels, master_key=None)
    b = load_bundle(path, new_master_key())
    assert not b.has_key and not (path / "key.sealed").exists()
    x = digits.test.tensors[0][:5]
    assert np.abs(b.public_logits(x.numpy()) - nasty.public_logits(x).numpy()).max() <= 1e-4
    meta = json.loads((path / "meta.json").read_text())
    assert "public_form" not in meta  # a Nasty box answers its network's own outputs
    meta["public_form"] = {"partners": [[(y + 1) % 10] for y in range(10)], "gap": 1.0, "floor": 8.0}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="only an sdb-mode classifier has a public form"):
        load_bundle(path)


def test_plain_module_exports_with_any_output_shape_and_free_spatial_axes(tmp_path):
    # A fully convolutional net (a pose or style model, say): no key, output not a label vector.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    path = export_bundle(net, tmp_path / "p", name="p", in_shape=(3, 16, 16), mean=[0.0] * 3, std=[1.0] * 3,
                         task="pose", dynamic_spatial=True)
    b = load_bundle(path, new_master_key())
    assert b.meta["mode"] == "plain" and b.meta["task"] == "pose" and not b.has_key
    assert b.meta["output"]["shape"] == [2, 16, 16]
    x = torch.rand(3, 3, 24, 20)  # another size than exported: the spatial axes are free
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(b.public_logits(x.numpy()) - want).max() <= 1e-4


def test_unknown_mode_is_refused(tmp_path):
    net = torch.nn.Linear(4, 2)
    path = export_bundle(net, tmp_path / "m", name="m", in_shape=(4,), mean=[0.0], std=[1.0])
    meta = json.loads((path / "meta.json").read_text())
    meta["mode"] = "open-sesame"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown mode"):
        load_bundle(path)


# ---------------------------------------------------------------- key binding (docs/security.md#bundles)
def _rewrite(path, meta=None, **files):
    """Replace files of a bundle directory and recompute meta.json's hashes: what anyone who can
    write the bundle, but has no master key, can do."""
    meta = meta if meta is not None else json.loads((path / "meta.json").read_text())
    for name, data in files.items():
        (path / name.replace("_", ".")).write_bytes(data)
    meta["files"] = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in meta["files"]}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _as_binding_1(path, master):
    """A bundle as this code sealed it before key binding 2: meta.json alone in the associated data."""
    files = read_bundle_files(path)
    meta = json.loads(files["meta.json"])
    key = unseal(files["key.sealed"], master, aad=key_aad(meta, files))
    del meta["key_binding"]
    return _rewrite(path, meta, key_sealed=seal(key, master, aad=_legacy_aad(meta)))


def test_the_sealed_key_is_bound_to_meta_and_every_file(tmp_path, digits, box, master):
    path = _export(box, digits, tmp_path / "b", master)
    files = read_bundle_files(path)
    meta = json.loads(files["meta.json"])
    assert meta["key_binding"] == KEY_BINDING == 2
    aad = key_aad(meta, files)
    assert aad == key_aad(meta, {**files, "key.sealed": b"other", "meta.json": b"{}"})  # neither is bound
    assert aad != key_aad(meta, {**files, "model.onnx": files["model.onnx"] + b"\0"})
    assert aad != key_aad({**meta, "lam": 0.9}, files) != key_aad({**meta, "key_binding": 1}, files)
    assert aad != _legacy_aad(meta)

    # Another network under the old one's meta and key, its hash recomputed: the key stays shut.
    other = export_onnx(OutsideNet(64, digits.num_classes), digits.in_shape)
    _rewrite(path, model_onnx=other)
    with pytest.raises(SealError, match="network it is bound to"):
        load_bundle(path, master)
    assert not load_bundle(path).has_key  # without the master key it is a public model like any other


def test_a_binding_1_bundle_is_refused_with_its_key_until_resealed(tmp_path, digits, box, master):
    path = _as_binding_1(_export(box, digits, tmp_path / "b", master), master)
    with pytest.raises(BundleError, match="key binding 1.*re-wrap the model, or re-seal"):
        load_bundle(path, master)
    assert not load_bundle(path).has_key  # no key asked for: the public path loads as before
    with pytest.raises(SealError):
        reseal_bundle(path, new_master_key())  # only the master key that sealed it re-seals it

    reseal_bundle(path, master)
    b = load_bundle(path, master)
    assert b.meta["key_binding"] == KEY_BINDING and b.has_key
    x = digits.test.tensors[0][:5]
    assert np.abs(b.distill_logits(x.numpy()) - box.distill_logits(x).numpy()).max() <= 1e-4
    with pytest.raises(BundleError, match="already sealed under key binding 2"):
        reseal_bundle(path, master)


@pytest.mark.parametrize("binding", [None, 1, 3, "2", True])
def test_a_binding_2_key_cannot_be_downgraded(tmp_path, digits, box, master, binding):
    # Claiming another binding in meta.json, with or without a swapped network: the key never opens,
    # and re-sealing (an admin's trust in the files) cannot launder it into binding 2 either.
    path = _export(box, digits, tmp_path / "b", master)
    meta = json.loads((path / "meta.json").read_text())
    if binding is None:
        del meta["key_binding"]
    else:
        meta["key_binding"] = binding
    _rewrite(path, meta, model_onnx=export_onnx(OutsideNet(64, digits.num_classes), digits.in_shape))
    with pytest.raises(BundleError, match="key binding"):
        load_bundle(path, master)
    if binding in (None, 1, True):
        with pytest.raises(SealError):
            reseal_bundle(path, master)


def test_a_member_not_listed_in_meta_is_refused(tmp_path, digits, box, master):
    plain = export_bundle(OutsideNet(64, 10), tmp_path / "p", name="p", in_shape=digits.in_shape, mean=digits.mean,
                          std=digits.std, labels=digits.labels)
    keyed = _export(box, digits, tmp_path / "b", master)
    (plain / "key.sealed").write_bytes((keyed / "key.sealed").read_bytes())
    with pytest.raises(BundleError, match="key.sealed is not listed"):
        load_bundle(plain, master)


# ---------------------------------------------------------------- output shape
def _plain(tmp_path, classes=10, labels=10, **kw):
    torch.manual_seed(0)
    return export_bundle(OutsideNet(64, classes), tmp_path / "p", name="p", in_shape=(1, 8, 8), mean=[0.0],
                         std=[1.0], labels=[str(i) for i in range(labels)], **kw)


def test_export_refuses_a_network_that_disagrees_with_its_labels(tmp_path, digits, box, master):
    with pytest.raises(BundleError, match=r"one score per label, \[12\] for 12 labels; meta.json declares \[10\]"):
        _plain(tmp_path, labels=12)
    with pytest.raises(BundleError, match="one score per label"):
        export_bundle(box, tmp_path / "b", name="b", in_shape=digits.in_shape, mean=digits.mean, std=digits.std,
                      labels=digits.labels[:3], master_key=master)
    with pytest.raises(BundleError, match="one heatmap per joint"):
        _plain(tmp_path, labels=3, task="pose")
    # Tasks without a label rule (segmentation-depth: channels of several maps) export as they are.
    assert _plain(tmp_path, labels=3, task="segmentation-depth").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the fixed-axes export below
def test_load_refuses_a_graph_whose_output_disagrees_with_meta(tmp_path):
    path = _plain(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["output"]["shape"] == [10] and "key_binding" not in meta  # keyless: nothing to bind
    good = (path / "model.onnx").read_bytes()

    _rewrite(path, model_onnx=export_onnx(OutsideNet(64, 5), (1, 8, 8)))
    with pytest.raises(BundleError, match=r"outputs \['batch', 5\] but meta.json declares \[batch, 10\] "
                                          r"\(task 'classification', 10 labels\)"):
        load_bundle(path)

    # A graph whose class axis only running it tells (sized by the input's width): the check runs it once.
    class Pixels(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :x.shape[-1] - 3]

    _rewrite(path, model_onnx=export_onnx(Pixels(), (1, 8, 8)))
    with pytest.raises(BundleError, match=r"computes \[1, 5\] for one input but meta.json declares \[1, 10\]"):
        load_bundle(path)

    buf = io.BytesIO()  # exported with every axis fixed
    torch.onnx.export(OutsideNet(64, 10), torch.zeros(2, 1, 8, 8), buf, input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    _rewrite(path, model_onnx=buf.getvalue())
    with pytest.raises(BundleError, match="fixed batch size of 2"):
        load_bundle(path)

    _rewrite(path, {**meta, "labels": [str(i) for i in range(12)]}, model_onnx=good)
    with pytest.raises(BundleError, match="one score per label"):
        load_bundle(path)
    del meta["output"]  # a classifier's output defaults to its labels
    _rewrite(path, meta, model_onnx=good)
    assert load_bundle(path).meta["labels"] == [str(i) for i in range(10)]


class _Traced(torch.nn.Module):
    """A classifier of 8 features whose forward does something tracing cannot record (``how``)."""

    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.how = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3), how

    def forward(self, x):
        return self.how(self, x)


@pytest.mark.parametrize("how, why", [
    (lambda m, x: m.a(x) + torch.zeros(len(x), 3),  # the batch size of the trace (2), baked in
     r"does not compute what the network does .*Tracing records one run"),
    (lambda m, x: m.a(x) + m.b(torch.from_numpy(x.numpy().copy())),  # part of the trace's zeros, baked in
     r"does not compute what the network does .*Tracing records one run"),
    (lambda m, x: m.a(torch.from_numpy(x.numpy().copy())),  # all of it: the graph has no input left
     r"does not read its input 'input'.*x.numpy\(\)"),
])
def test_an_export_that_does_not_compute_what_the_network_does_is_refused(tmp_path, how, why):
    with pytest.raises(BundleError, match=why):
        export_bundle(_Traced(how), tmp_path / "m", name="m", in_shape=(8,), mean=(0.0,), std=(1.0,),
                      labels=["a", "b", "c"])
    assert not (tmp_path / "m").exists()


def test_an_export_that_differs_by_precision_is_not_blamed_on_the_forward_alone(tmp_path):
    """A network that inverts a saturated sigmoid computes otherwise in ONNX Runtime (its Sigmoid answers 0 below
    about -20): the message said the forward branched. It says what differs, and both causes."""
    net = _Traced(lambda m, x: torch.log(torch.sigmoid(40 * m.a(x)) + 1e-30))
    with pytest.raises(BundleError, match=r"ONNX -?[\d.e+]+, PyTorch -?[\d.e+]+ at \[\d+, \d+\]\)\. Tracing records "
                                          r"one run.* Or an operator computes otherwise in ONNX Runtime .*sigmoid"):
        export_bundle(net, tmp_path / "m", name="m", in_shape=(8,), mean=(0.0,), std=(1.0,), labels=["a", "b", "c"])


def test_real_samples_catch_a_branch_on_input_values(tmp_path):
    net = _Traced(lambda m, x: m.a(x) if x.mean() > 0.5 else m.b(x))  # zeros, in the trace, take b
    common = {"name": "m", "in_shape": (8,), "mean": (0.0,), "std": (1.0,), "labels": ["a", "b", "c"]}
    assert export_bundle(net, tmp_path / "random", **common).exists()  # random N(0, 1) inputs stay below 0.5
    with pytest.raises(BundleError, match="a batch of 8"):
        export_bundle(net, tmp_path / "real", samples=torch.rand(8, 8) + 0.5, **common)
    plain = _Traced(lambda m, x: m.a(x))
    assert export_bundle(plain, tmp_path / "fine", samples=torch.rand(8, 8) + 0.5, **common).exists()


class _Tempered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 3)

    def forward(self, x, temperature=1.0):  # as real code has it
        return self.a(x) / temperature


def test_a_forward_with_a_keyword_default_exports_its_input_alone(tmp_path):
    """The exporter made temperature=1.0 a graph input: the export check failed in ONNX Runtime ("Required inputs
    (['onnx::Cast_1']) are missing"), a plain ValueError; the network is now traced with its input alone."""
    net = _Tempered().eval()
    out = export_bundle(net, tmp_path / "m", name="m", in_shape=(8,), mean=(0.0,), std=(1.0,), labels=["a", "b", "c"])
    x = torch.randn(5, 8)
    with torch.no_grad():
        np.testing.assert_allclose(load_bundle(out).network_logits(x.numpy()), net(x).numpy(), rtol=1e-5, atol=1e-6)


def test_an_export_with_inputs_beyond_the_declared_ones_is_a_bundle_error():
    from sdb_core.bundle import _check_export

    net, buf = _Tempered().eval(), io.BytesIO()
    torch.onnx.export(net, (torch.zeros(2, 8),), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    with pytest.raises(BundleError, match=r"takes inputs beyond \['input'\]: \['onnx::.*keyword default"):
        _check_export(net, buf.getvalue(), [("input", (8,))])


def test_exporting_a_module_leaves_it_in_the_modes_it_was_in(tmp_path):
    """An epoch-end export of a network mid-training left it in eval mode for good (its dropout off)."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5),
                              torch.nn.Linear(4, 3)).train()
    net[1].eval()  # a frozen BatchNorm: the modes come back module by module
    modes = [m.training for m in net.modules()]
    export_bundle(net, tmp_path / "m", name="m", in_shape=(8,), mean=(0.0,), std=(1.0,), labels=["a", "b", "c"])
    assert [m.training for m in net.modules()] == modes
    export_onnx(net, (8,))
    assert [m.training for m in net.modules()] == modes


def test_an_exporter_refusal_keeps_its_graph_dump_off_stdout(capfd):
    """Before some refusals the exporter prints its whole IR graph to file descriptor 1 (from C++)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1),
                              torch.nn.InstanceNorm2d(2, track_running_stats=True), torch.nn.Flatten()).eval()
    with pytest.raises(BundleError, match="does not export to ONNX .*instance_norm"):
        export_onnx(net, (1, 4, 4))
    assert "aten::" not in capfd.readouterr().out


def test_export_without_labels_leaves_the_classes_numbered(tmp_path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    for labels in (None, ()):
        path = export_bundle(net, tmp_path / f"n{labels}", name="n", in_shape=(4,), mean=[0.0], std=[1.0],
                             labels=labels)
        assert load_bundle(path).meta["labels"] == []
    with pytest.raises(BundleError, match="labels must be a list of the class names"):
        export_bundle(net, tmp_path / "s", name="n", in_shape=(4,), mean=[0.0], std=[1.0], labels="abc")


def test_a_float32_network_exports_under_a_float64_default(tmp_path):
    """The export's probes were made at torch's default dtype: under ``set_default_dtype(torch.float64)`` a float32
    network was refused as "an operation the exporter cannot express"."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    x = torch.randn(5, 1, 8, 8)
    torch.set_default_dtype(torch.float64)
    try:
        path = export_bundle(net, tmp_path / "p", name="p", in_shape=(1, 8, 8), mean=[0.0], std=[1.0],
                             labels=["a", "b", "c"], samples=x)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        assert np.abs(load_bundle(path).public_logits(x.numpy()) - net(x).numpy()).max() <= 1e-4


def test_a_loaded_bundles_threads_sleep_between_runs_unless_the_caller_says_otherwise(tmp_path, digits, box, master):
    """ONNX Runtime's default spins its threads after each run; a bundle is run beside other work in its process
    (a distill's torch steps between its teacher's calls), which the spinning took the core from."""
    import onnxruntime as ort

    path = _export(box, digits, tmp_path / "b", master)

    def spinning(b) -> dict:
        options = b.session.get_session_options()
        return {pool: options.get_session_config_entry(f"session.{pool}.allow_spinning") for pool in ("intra_op",
                                                                                                      "inter_op")}

    assert spinning(load_bundle(path, master)) == {"intra_op": "0", "inter_op": "0"}
    given = ort.SessionOptions()
    given.intra_op_num_threads = 1
    given.add_session_config_entry("session.intra_op.allow_spinning", "1")
    b = load_bundle(path, master, session_options=given)
    options = b.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
