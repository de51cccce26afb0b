"""Gateway gRPC front end (hop 1): unpack, call the core, pack token events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from stageserve.serving.common.convert import sampling_from_proto, token_event
from stageserve.serving.common.errors import BadRequest, ModelNotFound, abort
from stageserve.serving.gateway.core import GatewayCore, new_request_id
from stageserve.serving.gateway.http import HttpGenerateRequest, TenantHeaders
from stageserve.serving.gateway.images import grpc_chat_messages
from stageserve.serving.gateway.migration import REQUEST_DEADLINE, REQUEST_MIGRATIONS
from stageserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def tenant_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> TenantHeaders:
    md = {k.lower(): v if isinstance(v, str) else v.decode() for k, v in (metadata or ())}
    try:
        call_index = int(md.get("x-stageserve-call-index", "0"))
    except ValueError:
        raise BadRequest("x-stageserve-call-index: must be an integer", field="x-stageserve-call-index") from None
    return TenantHeaders(
        user=md.get("x-stageserve-user", "anonymous"),
        app=md.get("x-stageserve-app", "default"),
        interaction_id=md.get("x-stageserve-interaction-id") or uuid.uuid4().hex,
        call_index=call_index,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def _request(
        self, request: gateway_pb2.GenerateRequest, tenant: TenantHeaders, kv_format: str | None
    ) -> HttpGenerateRequest:
        if request.model and request.model != self.core.model_name:
            raise ModelNotFound(f"model: {request.model!r} is not served here (serving {self.core.model_name!r})")
        which = request.WhichOneof("input")
        images: list[bytes] = []
        positions: list[int] = []
        if which == "prompt":
            ids = self.core.tokenize_prompt(request.prompt)
        elif which == "chat":
            if any(m.images for m in request.chat.messages):  # each message's images go before its text
                messages, images = grpc_chat_messages(request.chat.messages)
                ids, positions = self.core.tokenize_chat_images(messages, images)
            else:
                ids = self.core.tokenize_chat([{"role": m.role, "content": m.content} for m in request.chat.messages])
        elif which == "prompt_token_ids":
            ids = list(request.prompt_token_ids.ids)
        else:
            raise BadRequest("input: one of prompt, chat or prompt_token_ids is required", field="input")
        params = sampling_from_proto(request.sampling)
        chat = request.chat.messages if which == "chat" else []
        system = [m.content for m in chat if m.role in ("system", "developer")]
        system_tokens = sum(len(self.core.tokenize_prompt(t)) for t in system if t)  # fairness accounting
        rid = request.request_id or new_request_id()
        return HttpGenerateRequest(
            rid,
            ids,
            params,
            tenant,
            kv_format,
            system_tokens=system_tokens,
            images=tuple(images),
            image_positions=tuple(positions),
        )

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenEvent]:
        try:
            metadata = context.invocation_metadata()
            tenant = tenant_from_metadata(metadata)
            md = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
            tenant = self.core.api_keys.authorize(tenant, md, md.get("authorization"))  # per-tenant API keys
            kv_format = dict(metadata or ()).get("x-stageserve-kv-format")
            call = self._request(request, tenant, kv_format if isinstance(kv_format, str) else None)
            await context.send_initial_metadata((("x-stageserve-interaction-id", tenant.interaction_id),))
            remaining = context.time_remaining()
            if remaining is not None:  # the client's deadline bounds every hop
                REQUEST_DEADLINE.set(time.monotonic() + remaining)
            migrations = [0]
            REQUEST_MIGRATIONS.set(migrations)
            async for delta in self.core.generate(call):
                usage = (delta.prompt_tokens, delta.completion_tokens, delta.cached_tokens) if delta.finished else None
                if delta.finished:  # how often this stream moved to other replicas (serving/gateway/migration.py)
                    context.set_trailing_metadata((("x-stageserve-migrations", str(migrations[0])),))
                yield token_event(call.request_id, delta.token_ids, delta.text, delta.finish_reason, usage)
        except Exception as exc:  # every failure leaves through the error table
            await abort(context, exc)

    async def ListModels(self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        return gateway_pb2.ListModelsResponse(
            models=[gateway_pb2.ModelInfo(id=self.core.model_name, max_context=self.core.max_context)]
        )
