"""The Open Inference Protocol's gRPC service, on ``SDB_GRPC_PORT``, in the HTTP server's process and loop.

:func:`start` runs from the app's lifespan (``service/app.py``) on uvicorn's event loop, so every RPC
uses what the HTTP routes use: the app state's model host (one registry, one micro-batcher per
model: a gRPC and an HTTP request can ride in one ONNX Runtime call), keyring, quotas, rate limiters
and metrics. Each RPC calls the functions its HTTP route calls (:mod:`service.oip`); only the
encoding differs (:mod:`service.grpc.codec`).

Authentication is the HTTP routes': the ``authorization`` metadata (``Bearer sdb_…``), the same key
checks, scopes and per-key rate; a call without a key spends its address's rate, as an HTTP request
does (health is never limited). A caller's address is HTTP's too: from a proxy ``SDB_FORWARDED_ALLOW_IPS``
trusts, the client its ``x-forwarded-for`` metadata names (:func:`client_address`).

An error is the call's status: the HTTP status's gRPC code (:data:`CODES`) with the same message;
``retry-after`` goes back as trailing metadata. Anything else is logged and answered INTERNAL without a
word of it. Messages over ``SDB_MAX_PAYLOAD_BYTES`` are refused by gRPC itself (RESOURCE_EXHAUSTED) before
they are read; bytes that are not the RPC's message are INVALID_ARGUMENT (:func:`_handlers` decodes them
here, not in grpcio, which answers UNKNOWN).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from .. import oip
from ..auth import ApiKey
from ..deps import Serving, authenticate, caller_of
from ..errors import INTERNAL, ApiError
from ..forwarded import TrustedProxies, forwarded_client
from ..inference import built
from ..ratelimit import ANONYMOUS_CALLER, client_network

_MISSING = ("SDB_GRPC_PORT needs the grpc extra (grpcio>=1.81.1, protobuf>=6.33.5): pip install -e '.[grpc]' in the "
            "source tree ({})")
try:  # the `grpc` extra: grpcio, and a protobuf runtime the committed stubs load on
    import grpc
    from google.protobuf.message import DecodeError
    from google.protobuf.runtime_version import VersionError
    from grpc import aio
except ImportError as e:
    raise ImportError(_MISSING.format(e)) from e
try:
    from . import codec
    from . import grpc_predict_v2_pb2 as pb
    from . import grpc_predict_v2_pb2_grpc as pb_grpc
except (VersionError, RuntimeError) as e:  # protobuf, or grpcio, older than the stubs
    raise ImportError(_MISSING.format(e)) from e

log = logging.getLogger("sdb.service")

# HTTP status → gRPC status code, as the protocol's servers map them.
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
         429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
SERVICE = "inference.GRPCInferenceService"
STREAM_WINDOW = 16  # requests of one ModelStreamInfer call answered at once; the next wait to be read
# What ServerMetadata advertises: HTTP's less binary_tensor_data (gRPC carries tensors raw by itself).
EXTENSIONS = ("classification", "model_configuration", "statistics")
STOP_GRACE_S = 5.0  # on shutdown, calls in flight get this long to finish
# A status's message travels in the trailers (percent-encoded: up to 3 bytes a byte), which clients refuse past
# 8-16 KiB (RESOURCE_EXHAUSTED, the error lost): messages quote callers' values cut short (service.errors.quoted);
# this bounds whatever else does.
MAX_STATUS_DETAILS = 2048  # bytes of UTF-8


def code_of(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


def status_details(message: str) -> str:
    """``message`` as a status's details: cut at :data:`MAX_STATUS_DETAILS` bytes (then "…"), on a character."""
    data = message.encode(errors="replace")
    if len(data) <= MAX_STATUS_DETAILS:
        return message
    return data[:MAX_STATUS_DETAILS].decode(errors="ignore") + "…"


def peer_host(peer: str) -> str:
    """The host of gRPC's peer string (``ipv4:10.0.0.1:5000``, ``ipv6:%5B::1%5D:5000``): ``10.0.0.1``, ``::1``."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return rest


def client_address(context: aio.ServicerContext, proxies: TrustedProxies) -> str:
    """The client a call is from, as the HTTP routes know it in their per-address limits and batches: its peer, or,
    from a proxy ``proxies`` trusts, the client its ``x-forwarded-for`` metadata names (nginx's ``grpc_set_header``;
    read as HTTP's header, :func:`~service.forwarded.forwarded_client`); an IPv6 client as its /64
    (:func:`~service.ratelimit.client_network`)."""
    metadata = context.invocation_metadata() or ()
    forwarded_for = [v for k, v in metadata if k == "x-forwarded-for" and isinstance(v, str)]
    return client_network(forwarded_client(proxies, peer_host(context.peer()), forwarded_for))


def _authorization(context: aio.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            return v if isinstance(v, str) else None
    return None


class Undecodable:
    """A request whose bytes are not its RPC's message: answered INVALID_ARGUMENT by :meth:`InferenceServicer._run`."""

    def __init__(self, message_type: type):
        self.message_type = message_type


def _decoder(message_type: type) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(message_type)
    return decode


# The service's RPCs and their request/response messages, from the proto (what the generated registration
# lists), registered with our decoder.
_METHODS = pb.DESCRIPTOR.services_by_name[SERVICE.rpartition(".")[2]].methods
_RPCS = {m.name: (getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)) for m in _METHODS}
_STREAMS = {m.name for m in _METHODS if m.client_streaming or m.server_streaming}


def _handlers(servicer: InferenceServicer) -> dict[str, grpc.RpcMethodHandler]:
    handlers = {}
    for name, (request, response) in _RPCS.items():
        options = {"request_deserializer": _decoder(request), "response_serializer": response.SerializeToString}
        if name in _STREAMS:  # its messages are checked one by one (InferenceServicer.ModelStreamInfer)
            handlers[name] = grpc.stream_stream_rpc_method_handler(getattr(servicer, name), **options)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(_checked(getattr(servicer, name), servicer, name),
                                                                 **options)
    return handlers


def _checked(rpc: Callable, servicer: InferenceServicer, name: str) -> Callable:
    async def call(request: Any, context: aio.ServicerContext):
        if isinstance(request, Undecodable):
            return await servicer._run(name, context, "", servicer._refusal(request, context))
        return await rpc(request, context)
    return call


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs over the app's state (``app.state``: settings, host, keyring, metrics, limiters)."""

    def __init__(self, state: Any):
        self.state = state
        self.proxies = TrustedProxies(state.settings.forwarded_allow_ips)  # who may name the client (HTTP's too)

    # ------------------------------------------------------------------ callers
    async def _key(self, context: aio.ServicerContext, address: str) -> ApiKey | None:
        """The caller's key from the ``authorization`` metadata, as HTTP's header (:func:`service.deps.authenticate`):
        None without one, after spending ``address``'s rate as HTTP's middleware does; one sent must be valid."""
        authorization = _authorization(context)
        if authorization is None:
            self._limit_address(address)
            return None
        return await authenticate(self.state, authorization, address)

    async def _limit_unkeyed(self, context: aio.ServicerContext) -> None:
        """On an RPC that needs no key: a call with a valid one spends that key's rate, one without its address's
        (one with junk metadata, or a valid key, went unlimited)."""
        authorization = _authorization(context)
        if authorization is not None:
            try:
                key = await self.state.keyring.key_of(authorization)
            except ApiError:
                key = None
            if key is not None:  # a valid key spends its own rate, as on the RPCs that check it
                self.state.key_limiter.check(key.id, "this key")
                return
        self._limit_address(client_address(context, self.proxies))

    def _limit_address(self, address: str) -> None:
        """A call without a key spends its address's rate, as the HTTP middleware charges it."""
        limiter = self.state.address_limiter
        wait = limiter.take(address)
        if wait:
            raise limiter.refusal(wait, ANONYMOUS_CALLER)

    async def _caller(self, context: aio.ServicerContext) -> Serving:
        s = self.state
        address = client_address(context, self.proxies)  # once a call: its metadata read, the proxies' rule applied
        key = await self._key(context, address)
        return Serving(s.settings, s.host, s.keyring, s.metrics, key, caller_of(key, address))

    # ------------------------------------------------------------------ one call
    async def _answer(self, method: str, context: aio.ServicerContext, model: str,
                      answer: Callable[[], Awaitable[Any]]) -> tuple[Any, ApiError | None]:
        """``answer()`` or the error it is refused with, and the request in the metrics as HTTP's are."""
        start, status, error = time.perf_counter(), 200, None
        try:
            return await answer(), None
        except ApiError as e:
            status, error = e.status, e
        except Exception:
            log.exception("unhandled error on gRPC %s", method)
            status, error = 500, ApiError(*INTERNAL)
        finally:
            host = self.state.host
            self.state.metrics.observe_request(f"/{SERVICE}/{method}", "GRPC",
                                               model if model and host is not None and model in host else "",
                                               status, time.perf_counter() - start, error.code if error else "")
        return None, error

    async def _run(self, method: str, context: aio.ServicerContext, model: str,
                   answer: Callable[[], Awaitable[Any]]) -> Any:
        """``answer()``, its error as the call's status (with ``retry-after`` as trailing metadata)."""
        response, error = await self._answer(method, context, model, answer)
        if error is None:
            return response
        retry = (error.headers or {}).get("Retry-After")
        await context.abort(code_of(error.status), status_details(error.message),
                            (("retry-after", retry),) if retry else ())

    def _refusal(self, request: Undecodable, context: aio.ServicerContext) -> Callable[[], Awaitable[Any]]:
        async def refuse():
            await self._limit_unkeyed(context)  # as any call without a key: its address's rate
            raise ApiError(400, "malformed_body", f"the request is not a {request.message_type.DESCRIPTOR.name} "
                                                  "protobuf message")
        return refuse

    # ------------------------------------------------------------------ the RPCs
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext):
        async def answer():
            return pb.ServerLiveResponse(live=True)
        return await self._run("ServerLive", context, "", answer)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext):
        async def answer():
            return pb.ServerReadyResponse(ready=bool(getattr(self.state, "ready", False)))
        return await self._run("ServerReady", context, "", answer)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext):
        async def answer():
            await self._limit_unkeyed(context)  # as GET /v2: no key needed
            return codec.server_metadata_response(oip.server_metadata(extensions=EXTENSIONS))
        return await self._run("ServerMetadata", context, "", answer)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext):
        async def answer():
            caller = await self._caller(context)
            try:
                await oip.served_model(caller, request.name, request.version or None)
            except ApiError as e:
                if e.status != 404:
                    raise
                return pb.ModelReadyResponse(ready=False)  # as tritonclient reads HTTP's 404: not ready
            return pb.ModelReadyResponse(ready=True)
        return await self._run("ModelReady", context, request.name, answer)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext):
        async def answer():
            caller = await self._caller(context)
            model = await oip.served_model(caller, request.name, request.version or None)
            return codec.metadata_response(oip.model_metadata(caller.host, model))
        return await self._run("ModelMetadata", context, request.name, answer)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext):
        async def answer():  # behind the metadata's access check, as GET /v2/models/{name}/config
            caller = await self._caller(context)
            model = await oip.served_model(caller, request.name, request.version or None)
            return codec.config_response(oip.model_config(caller.host, model, caller.settings.max_request_samples))
        return await self._run("ModelConfig", context, request.name, answer)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext):
        async def answer():  # the access checks of GET /v2/models[/{name}[/versions/{v}]]/stats
            caller = await self._caller(context)
            return codec.statistics_response(await oip.model_statistics(caller, request.name, request.version))
        return await self._run("ModelStatistics", context, request.name, answer)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext):
        async def answer():  # as POST /v2/repository/index (one repository: its name is not read)
            index = oip.repository_index(await self._caller(context), request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in index])
        return await self._run("RepositoryIndex", context, "", answer)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext):
        return await self._run("ModelInfer", context, request.model_name, self._inferring(request, context))

    def _inferring(self, request: pb.ModelInferRequest,
                   context: aio.ServicerContext) -> Callable[[], Awaitable[pb.ModelInferResponse]]:
        async def answer():
            caller = await self._caller(context)
            # predict access before the lookup (as HTTP's infer): a caller who may not predict probes no name
            model = await oip.served_model(caller, request.model_name, request.model_version or None)
            inputs = codec.request_inputs(request, caller.settings.max_request_samples)
            outputs = await oip.infer(caller, model, inputs, *codec.requested_outputs(request))
            # a large answer's message is built off the loop, which every HTTP caller shares
            return await built(oip.answer_size(outputs), codec.infer_response, model.name, model.version, request.id,
                               outputs)
        return answer

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest | Undecodable],
                               context: aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request as ModelInfer would answer it, up to :data:`STREAM_WINDOW` of them at once (so that they
        ride in the model's batches), answered in the order sent. A refusal is that answer's ``error_message``
        and the stream goes on; the key is the stream's metadata, checked, rated and charged per request."""
        slots, answers = asyncio.Semaphore(STREAM_WINDOW), asyncio.Queue()

        async def one(request: pb.ModelInferRequest | Undecodable) -> pb.ModelStreamInferResponse:
            if isinstance(request, Undecodable):
                _, error = await self._answer("ModelStreamInfer", context, "", self._refusal(request, context))
                return pb.ModelStreamInferResponse(error_message=error.message)
            response, error = await self._answer("ModelStreamInfer", context, request.model_name,
                                                 self._inferring(request, context))
            if error is None:
                return pb.ModelStreamInferResponse(infer_response=response)
            return pb.ModelStreamInferResponse(error_message=error.message, infer_response=pb.ModelInferResponse(
                model_name=request.model_name, id=request.id))

        async def read() -> None:  # waits for a slot: a client that sends faster waits for its answers
            try:
                async for request in requests:
                    await slots.acquire()
                    answers.put_nowait(asyncio.ensure_future(one(request)))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                response = await answer
                slots.release()
                yield response
            reader.result()  # the requests' end, or why they stopped coming
        finally:
            reader.cancel()
            while not answers.empty():
                if (pending := answers.get_nowait()) is not None:
                    pending.cancel()


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _cannot_listen(address: str) -> str:
    return (f"gRPC cannot listen on {address} (SDB_GRPC_HOST / SDB_GRPC_PORT): in use or not an address of this "
            "machine")


def check_address(host: str, port: int) -> None:
    """ValueError when ``host:port`` cannot be listened on now: ``sdb serve`` says so before it starts,
    rather than as the lifespan's failure (:func:`start` checks again when it binds)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        raise ValueError(f"{_cannot_listen(listen_address(host, port))} ({e.strerror or e})") from None


async def start(state: Any) -> aio.Server:
    """The gRPC server on ``settings.grpc_host`` (default ``host``) and ``grpc_port``, started on the
    running loop; RuntimeError with the address when it cannot listen there."""
    settings = state.settings
    address = listen_address(settings.grpc_host or settings.host, settings.grpc_port)
    server = aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_payload_bytes),
        ("grpc.so_reuseport", 0),  # a port already taken is an error, not a second listener on it
    ])
    handlers = _handlers(InferenceServicer(state))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise RuntimeError(_cannot_listen(address))
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
