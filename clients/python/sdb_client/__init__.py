"""Python SDK for SDB, the Safe Distillation Box service.

    from sdb_client import Client
    with Client("http://127.0.0.1:8000", api_key="sdb_...") as c:   # or SDB_URL / SDB_API_KEY
        c.models()
        c.predict("mnist-demo", x, top_k=3)
        c.distill_logits("mnist-demo", x)       # a key with the distill scope
        c.files.upload("teacher.safetensors", "weights")   # jobs or deploy scope: name its id in a job
        c.deploy_model("box.sdb")               # deploy scope: serve a bundle as its next version

``AsyncClient`` has the same methods as coroutines; ``RemoteTeacher`` makes the keyed path
a teacher for knowledge distillation. Tensors travel as ``.npy`` (``application/x-npy``) by default,
as JSON with ``encoding="json"``. Dependencies: httpx and numpy (torch optional).
"""
from ._base import (
                    DEFAULT_BATCH_SIZE,
                    DEFAULT_MAX_RETRIES,
                    DEFAULT_TIMEOUT,
                    Distilled,
                    JobLogs,
                    Page,
                    __version__,
                    retry_delay,
)
from ._exceptions import (
                    APIConnectionError,
                    APITimeoutError,
                    AuthError,
                    BadRequest,
                    ConfigurationError,
                    ModelChanged,
                    NotFound,
                    PayloadTooLarge,
                    PermissionDenied,
                    QuotaError,
                    SDBError,
                    ServerError,
)
from .async_client import AsyncClient
from .client import Client
from .teacher import RemoteTeacher

__all__ = [
                    "DEFAULT_BATCH_SIZE",
                    "DEFAULT_MAX_RETRIES",
                    "DEFAULT_TIMEOUT",
                    "APIConnectionError",
                    "APITimeoutError",
                    "AsyncClient",
                    "AuthError",
                    "BadRequest",
                    "Client",
                    "ConfigurationError",
                    "Distilled",
                    "JobLogs",
                    "ModelChanged",
                    "NotFound",
                    "Page",
                    "PayloadTooLarge",
                    "PermissionDenied",
                    "QuotaError",
                    "RemoteTeacher",
                    "SDBError",
                    "ServerError",
                    "__version__",
                    "retry_delay",
]
