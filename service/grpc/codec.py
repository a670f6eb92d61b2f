"""The protocol's gRPC messages to :class:`service.oip.Tensor` objects and back; no gRPC here, only protobuf.

An input tensor comes as ``raw_input_contents`` (what tritonclient sends: the same bytes as the HTTP
binary extension, read by :func:`service.oip_binary.from_raw`) or as the typed ``contents`` fields;
never both in one request. Outputs always go back raw, in ``raw_output_contents``, as Triton answers.
Every way a message can be wrong is an :class:`~service.errors.ApiError` (400 malformed, 422 a value
the model cannot take), raised before any model time is spent.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import oip
from ..errors import bad_request, invalid
from ..oip_binary import from_raw, to_raw
from . import grpc_predict_v2_pb2 as pb

# The typed field of InferTensorContents that carries each datatype, and the dtype it decodes to.
# FP16 and BF16 have none: the protocol sends them raw only.
CONTENTS = {"BOOL": ("bool_contents", np.bool_), "INT8": ("int_contents", np.int32),
            "INT16": ("int_contents", np.int32), "INT32": ("int_contents", np.int32),
            "INT64": ("int64_contents", np.int64), "UINT8": ("uint_contents", np.uint32),
            "UINT16": ("uint_contents", np.uint32), "UINT32": ("uint_contents", np.uint32),
            "UINT64": ("uint64_contents", np.uint64), "FP32": ("fp32_contents", np.float32),
            "FP64": ("fp64_contents", np.float64), "BYTES": ("bytes_contents", object)}
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def _typed(t: pb.ModelInferRequest.InferInputTensor, shape: list[int], what: str) -> np.ndarray:
    field = CONTENTS.get(t.datatype)
    if field is None:
        raise bad_request(f"{what}: {t.datatype} data travels in raw_input_contents only", "malformed_body")
    values = getattr(t.contents, field[0])
    if len(values) != math.prod(shape):
        raise invalid(f"{what}.contents has {len(values)} {t.datatype} values; shape {shape} needs "
                      f"{math.prod(shape)}", "invalid_shape")
    if field[1] is object:
        return np.array(list(values) or [], dtype=object).reshape(shape)
    return np.array(values, dtype=field[1]).reshape(shape)


def request_inputs(request: pb.ModelInferRequest, max_samples: int) -> list[oip.Tensor]:
    """The request's input tensors, decoded; a count other than one, a datatype the server does not take, or a
    BYTES tensor of more than ``max_samples`` elements, is refused unread (422)."""
    if len(request.inputs) != 1:
        raise oip.not_one_input()
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries; it needs one per input "
                          f"({len(request.inputs)})", "malformed_body")
    tensors = []
    for i, t in enumerate(request.inputs):
        what = f"inputs[{i}]"
        if any(p in t.parameters for p in _SHARED_MEMORY):
            raise bad_request(f"{what}: shared memory is not served; send the data in the request",
                              "malformed_body")
        if t.datatype not in oip.INPUT_DATATYPES:
            raise oip.unsupported_datatype(t.datatype)
        shape = oip.tensor_shape(list(t.shape))
        oip.check_samples(t.datatype, shape, max_samples)
        if raw:
            if t.HasField("contents"):
                raise bad_request(f"{what} has contents, and the request raw_input_contents: send one or the "
                                  "other", "malformed_body")
            data = from_raw(t.datatype, shape, memoryview(raw[i]), f"raw_input_contents[{i}]")
        else:
            data = _typed(t, shape, what)
        tensors.append(oip.Tensor(t.name, t.datatype, shape, data))
    return tensors


def requested_outputs(request: pb.ModelInferRequest) -> tuple[list[str] | None, dict[str, Any]]:
    """The output names asked for (None: the server's default), and the classification extension's class_count
    of those that ask one (an ``int64_param``, as tritonclient sends it; checked by
    :func:`service.oip.classification_counts`)."""
    oip.check_output_count(len(request.outputs))
    classification: dict[str, Any] = {}
    for i, o in enumerate(request.outputs):
        if "classification" in o.parameters:
            p = o.parameters["classification"]
            kind = p.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):
                raise invalid(f"outputs[{i}].parameters.classification must be an int64_param, got {kind}",
                              "invalid_request")
            classification[o.name] = getattr(p, kind)
    return [o.name for o in request.outputs] or None, classification


def infer_response(model_name: str, model_version: str, request_id: str,
                   outputs: list[oip.Tensor]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for t in outputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(to_raw(t.datatype, t.data))
    return response


def metadata_response(metadata: dict) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
        inputs=[tensor(**t) for t in metadata["inputs"]], outputs=[tensor(**t) for t in metadata["outputs"]])


def config_response(config: dict) -> pb.ModelConfigResponse:
    """:func:`service.oip.model_config`'s dict (``config.pbtxt`` as JSON) as Triton's message."""
    def tensors(kind: type, specs: list[dict]) -> list:
        return [kind(name=t["name"], data_type=pb.DataType.Value(t["data_type"]), dims=t["dims"]) for t in specs]

    return pb.ModelConfigResponse(config=pb.ModelConfig(
        name=config["name"], platform=config["platform"], backend=config["backend"],
        max_batch_size=config["max_batch_size"], input=tensors(pb.ModelInput, config["input"]),
        output=tensors(pb.ModelOutput, config["output"])))


def statistics_response(stats: dict) -> pb.ModelStatisticsResponse:
    """:func:`service.oip.model_statistics`'s dict (Triton's HTTP JSON) as Triton's message: the same fields."""
    def durations(kind: type, figures: dict) -> Any:
        return kind(**{k: pb.StatisticDuration(**v) if isinstance(v, dict) else v for k, v in figures.items()})

    return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
        name=m["name"], version=m["version"], last_inference=m["last_inference"],
        inference_count=m["inference_count"], execution_count=m["execution_count"],
        inference_stats=durations(pb.InferStatistics, m["inference_stats"]),
        batch_stats=[durations(pb.InferBatchStatistics, b) for b in m["batch_stats"]]) for m in stats["model_stats"]])


def server_metadata_response(metadata: dict) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=metadata["name"], version=metadata["version"],
                                     extensions=metadata["extensions"])
