"""Decode migration by token replay: a request whose decode (or prefill) replica dies goes on elsewhere.

When an attempt fails with a stage-failure status (UNAVAILABLE, DATA_LOSS, INTERNAL/UNKNOWN) the gateway
re-dispatches it to healthy replicas, one of two ways:

* exact (greedy or seeded requests with at most ``gateway.migration_exact_max_tokens`` tokens streamed): the
  request runs again from its prompt and the gateway swallows the tokens the client already has, checking
  each one. The KV of the generated tokens is computed by decode steps as before, so the stream is
  token-identical to an uninterrupted one. A mismatch (a nondeterministic replica) falls back to replay.
* replay (otherwise): a prefill runs prompt + the g tokens generated so far and a decode continues for
  ``max_tokens - g`` more (``min_tokens`` likewise; ``seed_offset = g`` resumes a seeded generator). Fast,
  but the replayed tokens' KV crosses the wire in the negotiated (lossy) format, so a greedy stream may
  differ from an uninterrupted one after a near-tie.

Either way the client sees one stream, no duplicated and no missing tokens, and usage counts the original
prompt and every generated token. Migrations per request are bounded by ``gateway.max_migrations``. A prefill
death before any token is the same path (a retry): decode's ``Generate`` is cancelled, which frees the
partial KV it had reserved and installed. An encoder death (Encode fails, or prefill's FetchEmbeddings from the
dead replica fails) is a retry too: every attempt runs Encode again on a healthy encoder (old handles are never
re-used), and an image request's retry waits for one (``has_encoder``).

``MigrationStats`` is the counter hook the metrics exporter reads (``GatewayCore.migrator.stats``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from stageserve.serving.common.errors import DataLoss, StageServeError, Timeout, Unavailable
from stageserve.serving.gateway.http import GenerateDelta, HttpGenerateRequest

log = logging.getLogger("stageserve.gateway.migration")

# Monotonic deadline (time.monotonic()) of the request being served: set from the client's gRPC deadline by the
# front end, else from gateway.request_timeout_s. Every hop's gRPC timeout is the time left until it.
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)
# The front end's per-request migration counter (a one-item list), reported to the client as trailing metadata.
REQUEST_MIGRATIONS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("migrations", default=None)
_MIGRATABLE = (Unavailable, DataLoss)


class _Diverged(Exception):
    """A deterministic re-run produced a token other than one the client already has."""


@dataclass
class _Sent:
    """What the client has received so far."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""

    def add(self, tokens: list[int], text: str) -> None:
        self.tokens += tokens
        self.text += text


@dataclass
class MigrationStats:
    """Counters for the metrics exporter: requests migrated, migrations done, requests that ran out of them."""

    migrations: int = 0
    migrated_requests: int = 0
    exhausted: int = 0


def attempt_timeout(default_s: float) -> float:
    """The gRPC timeout for a hop: the time left until the request's deadline (at least 1 ms)."""
    deadline = REQUEST_DEADLINE.get()
    if deadline is None:
        return default_s
    return max(0.001, min(default_s, deadline - time.monotonic()))


def is_migratable(exc: BaseException) -> bool:
    """A stage failed (died, connection lost, KV transfer failed); a bad request or overload is not retried."""
    return isinstance(exc, (*_MIGRATABLE, _Diverged)) or type(exc) is StageServeError


def replay_request(request: HttpGenerateRequest, generated: list[int], attempt: int) -> HttpGenerateRequest:
    """The request that continues ``request`` after ``generated`` tokens, under a fresh per-attempt id."""
    g = len(generated)
    p = request.params
    params = dataclasses.replace(
        p,
        max_tokens=p.max_tokens - g,
        min_tokens=max(0, p.min_tokens - g),
        seed_offset=p.seed_offset + g,
    )
    return dataclasses.replace(
        request,
        request_id=f"{request.request_id}.m{attempt}",
        prompt_token_ids=[*request.prompt_token_ids, *generated],
        params=params,
    )


Attempt = Callable[[HttpGenerateRequest], AsyncIterator[GenerateDelta]]


@dataclass
class Migrator:
    """Runs a request's attempts, re-dispatching after stage failures (see the module docstring)."""

    max_migrations: int
    wait_s: float  # how long to wait for a healthy replica after a failure
    refresh: Callable[[], Awaitable[None]]  # re-reads replica health (dead replicas drop out of routing)
    has_capacity: Callable[[], bool]  # some prefill and some decode replica is healthy
    timeout_s: float = 600.0  # the request's deadline when the client set none
    exact_max_tokens: int = 1024  # greedy/seeded requests with at most this many tokens sent are re-run exactly
    detokenize: Callable[[list[int]], str] | None = None
    has_encoder: Callable[[], bool] = lambda: True  # some encoder replica is healthy (awaited for image requests)
    stats: MigrationStats = dataclasses.field(default_factory=MigrationStats)

    async def run(self, request: HttpGenerateRequest, attempt: Attempt) -> AsyncIterator[GenerateDelta]:
        # An async generator may be closed from another task's context, where ContextVar.reset(token) raises;
        # restoring the previous value works from any context.
        previous = REQUEST_DEADLINE.get()
        REQUEST_DEADLINE.set(previous or time.monotonic() + self.timeout_s)
        sent = _Sent()
        current, migrations, exact = request, 0, False
        try:
            while True:
                try:
                    relay = self._exact(request, current, sent, attempt) if exact else self._replay(
                        request, current, sent, attempt
                    )
                    async for out in relay:
                        yield out
                    return
                except (StageServeError, _Diverged) as exc:
                    if not is_migratable(exc) or migrations >= self.max_migrations:
                        if is_migratable(exc):
                            self.stats.exhausted += 1
                        raise
                    migrations += 1
                    self._count(migrations)
                    trace.get_current_span().add_event(  # marked on the request's gateway span
                        "stageserve.migration",
                        {"attempt": migrations, "tokens_sent": len(sent.tokens), "error": type(exc).__name__},
                    )
                    log.warning(
                        "request %s: attempt failed (%s: %s) after %d tokens; migrating (%d/%d)",
                        request.request_id, type(exc).__name__, exc, len(sent.tokens), migrations,
                        self.max_migrations,
                    )
                    exact = self._can_regenerate(request, sent) and not isinstance(exc, _Diverged)
                await self._await_capacity(request.request_id, bool(request.images))
                if exact:
                    current = dataclasses.replace(request, request_id=f"{request.request_id}.m{migrations}")
                else:
                    current = replay_request(request, sent.tokens, migrations)
        finally:
            REQUEST_DEADLINE.set(previous)

    def _can_regenerate(self, request: HttpGenerateRequest, sent: _Sent) -> bool:
        deterministic = request.params.greedy or request.params.seed is not None
        return bool(sent.tokens) and deterministic and len(sent.tokens) <= self.exact_max_tokens

    async def _replay(
        self, request: HttpGenerateRequest, current: HttpGenerateRequest, sent: _Sent, attempt: Attempt
    ) -> AsyncIterator[GenerateDelta]:
        """Relays an attempt that continues after ``sent.tokens`` (first attempt or prompt+generated replay)."""
        base = len(sent.tokens)
        held = self._held_back(sent) if base else ""
        async for delta in attempt(current):
            out = _rebase(delta, request, base, held)
            held = ""
            sent.add(out.token_ids, out.text)
            yield out

    async def _exact(
        self, request: HttpGenerateRequest, current: HttpGenerateRequest, sent: _Sent, attempt: Attempt
    ) -> AsyncIterator[GenerateDelta]:
        """Relays a from-scratch re-run of a deterministic request, swallowing what the client already has."""
        tokens: list[int] = []
        text = ""
        async for delta in attempt(current):
            tokens += delta.token_ids
            text += delta.text
            n = min(len(tokens), len(sent.tokens))
            if tokens[:n] != sent.tokens[:n] or (delta.finished and len(tokens) < len(sent.tokens)):
                raise _Diverged(f"re-run diverged from the streamed tokens at or before token {n}")
            new_tokens = tokens[len(sent.tokens) :]
            new_text = text[len(sent.text) :] if text.startswith(sent.text) else ""
            if not (new_tokens or new_text or delta.finished):
                continue
            out = dataclasses.replace(delta, token_ids=new_tokens, text=new_text)
            sent.add(new_tokens, new_text)
            yield out

    def _count(self, migrations: int) -> None:
        self.stats.migrations += 1
        cell = REQUEST_MIGRATIONS.get()
        if cell is not None:
            cell[0] = migrations
        if migrations == 1:
            self.stats.migrated_requests += 1

    def _held_back(self, sent: _Sent) -> str:
        """Text of tokens already streamed that the dead decode had not emitted yet (held back at a boundary)."""
        if self.detokenize is None or not sent.tokens:
            return ""
        full = self.detokenize(sent.tokens)
        return full[len(sent.text) :] if full.startswith(sent.text) else ""

    async def _await_capacity(self, request_id: str, images: bool = False) -> None:
        """Waits for healthy prefill and decode replicas (and an encoder: the retry re-encodes the images)."""
        deadline = min(time.monotonic() + self.wait_s, REQUEST_DEADLINE.get() or float("inf"))
        while True:
            await self.refresh()
            if self.has_capacity() and (not images or self.has_encoder()):
                return
            if time.monotonic() >= deadline:
                raise Timeout(f"request {request_id}: no healthy prefill/decode/encoder replica to migrate to")
            await asyncio.sleep(0.2)


def _rebase(delta: GenerateDelta, request: HttpGenerateRequest, base: int, held: str) -> GenerateDelta:
    """Counts usage against the original request (prompt and every generated token)."""
    return dataclasses.replace(
        delta,
        text=held + delta.text,
        prompt_tokens=len(request.prompt_token_ids),
        completion_tokens=delta.completion_tokens + base if delta.finished else delta.completion_tokens,
    )


def core_hook(core: Any) -> Migrator:
    """The Migrator for a GatewayCore (its replica sets, config and tokenizer)."""

    async def refresh() -> None:  # encoders too: a request whose encoder died re-encodes on another replica
        encoders = getattr(core, "encoders", None)
        extra = [encoders.refresh()] if encoders is not None and encoders.stubs else []
        await asyncio.gather(core.prefill.refresh(), core.decode.refresh(), *extra)

    def has_capacity() -> bool:
        healthy = [any(x.healthy for x in rs.loads.values()) for rs in (core.prefill, core.decode)]
        return all(healthy)

    def detokenize(ids: list[int]) -> str:
        return str(core.tokenizer.decode(ids, skip_special_tokens=True))

    def has_encoder() -> bool:
        encoders = getattr(core, "encoders", None)
        return encoders is None or bool(encoders.replicas.healthy())

    gw = core.config.gateway
    return Migrator(
        gw.max_migrations, gw.migration_wait_s, refresh, has_capacity, gw.request_timeout_s,
        gw.migration_exact_max_tokens, detokenize, has_encoder,
    )
