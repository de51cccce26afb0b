"""stageserve.client: the Python SDK for the stageserve gateway's gRPC API.

Usage::

    from stageserve.client import Client

    with Client("127.0.0.1:50051", user="alice", app="notes") as client:
        out = client.generate("The capital of France is", max_tokens=8)
        print(out.text, out.usage.completion_tokens, out.interaction_id)

        stream = client.chat([{"role": "user", "content": "Hi!"}], stream=True, interaction_id=out.interaction_id)
        for event in stream:
            print(event.text, end="")

    async with AsyncClient() as client:  # same API, awaited; streams are async iterators
        out = await client.generate([1, 2, 3], max_tokens=4)

Every call sends ``timeout`` as its gRPC deadline. Calls that fail with UNAVAILABLE before any token arrived
are retried ``max_retries`` times with exponential backoff and jitter (RESOURCE_EXHAUSTED too, honouring
retry-after, with ``retry_on_overload=True``). Failures raise a typed StageServeError subclass.
"""

from stageserve.client._client import AsyncClient, AsyncStream, Client, Stream
from stageserve.client._common import (
    AuthenticationError,
    Completion,
    DeadlineExceeded,
    InvalidRequest,
    KVTransferError,
    ModelInfo,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    StageServeError,
    StreamEvent,
    Unavailable,
    Usage,
    map_error,
)

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "InvalidRequest",
    "KVTransferError",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "PermissionDenied",
    "StageServeError",
    "Stream",
    "StreamEvent",
    "Unavailable",
    "Usage",
    "map_error",
]
