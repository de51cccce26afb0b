"""The one error table: domain exceptions -> gRPC status codes and HTTP status codes.

Servicers raise these (or let engine/validation errors be mapped by ``classify``); the gRPC and HTTP layers
turn them into ``INVALID_ARGUMENT``/400 (naming the field), ``RESOURCE_EXHAUSTED``/429 with retry-after,
``NOT_FOUND``/404, ``UNAVAILABLE``/503, ``UNAUTHENTICATED``/401, ``PERMISSION_DENIED``/403.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from stageserve.core.sampling import InvalidRequestError


class StageServeError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    error_type = "internal_error"

    def __init__(self, message: str, field: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


class BadRequest(StageServeError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    error_type = "invalid_request_error"


class Overloaded(StageServeError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "rate_limit_error"


class ModelNotFound(StageServeError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "model_not_found"


class Unavailable(StageServeError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "unavailable"


class Unauthenticated(StageServeError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    error_type = "authentication_error"


class PermissionDenied(StageServeError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    error_type = "permission_denied"


class Timeout(StageServeError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    error_type = "timeout"


class DataLoss(StageServeError):
    grpc_code = grpc.StatusCode.DATA_LOSS
    http_status = 502
    error_type = "kv_transfer_failed"


_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
}


def classify(exc: BaseException) -> StageServeError:
    """Maps any exception raised while serving a request onto the table."""
    if isinstance(exc, StageServeError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return BadRequest(str(exc), field=exc.field)
    if isinstance(exc, ValueError):
        return BadRequest(str(exc))
    if isinstance(exc, grpc.aio.AioRpcError):
        cls = _FROM_GRPC.get(exc.code(), StageServeError)
        return cls(exc.details() or exc.code().name)
    return StageServeError(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class GrpcAbort:
    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str], ...]


def to_grpc(exc: BaseException) -> GrpcAbort:
    err = classify(exc)
    trailing: tuple[tuple[str, str], ...] = ()
    if err.retry_after_s is not None:
        trailing = (("retry-after", f"{err.retry_after_s:.3f}"),)
    return GrpcAbort(err.grpc_code, err.message, trailing)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the RPC with the mapped status (raises, as grpc.aio's abort does)."""
    mapped = to_grpc(exc)
    if mapped.trailing:
        context.set_trailing_metadata(mapped.trailing)
    await context.abort(mapped.code, mapped.details)
