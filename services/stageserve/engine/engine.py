"""The engine: requests in, token events out, one ``step()`` at a time (schedule -> run -> sample).

Roles (see EngineConfig): "both" runs prompts and generation; "prefill" stops each request after its first
token and hands its KV to the request's ``kv_sink`` layer by layer as the forward pass produces it;
"decode" installs KV from elsewhere (``begin_import`` / ``import_kv`` / ``commit_import``) and continues.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from tqdm import trange

from stageserve.core.sampling import SamplingParams
from stageserve.engine.attention import KVSink, TorchAttentionBackend
from stageserve.engine.config import EngineConfig
from stageserve.engine.detokenizer import IncrementalDetokenizer
from stageserve.engine.kv_cache import PagedKVCache
from stageserve.engine.kv_quant import CodePool, PageCloser, SeqCodes
from stageserve.engine.model_runner import ImageEmbeds, ModelRunner
from stageserve.engine.outputs import TokenEvent
from stageserve.engine.sampler import sample
from stageserve.kvcodec.format import PageFormat
from stageserve.models.loader import LoadedModel, load_model
from stageserve.policy.batching.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from stageserve.policy.batching.sequence import Sequence
from stageserve.policy.kvblocks.block_manager import BlockManager


class KVCacheFullError(RuntimeError):
    """No KV blocks are free for an import; the caller should retry later or elsewhere."""


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator
    kv_sink: KVSink | None = None
    exported: int = 0
    page_format: PageFormat | None = None  # quantize-on-append format of this request's cache pages
    closed_upto: int = 0  # start of the open block: pages before it are quantized
    codes: SeqCodes | None = None  # its closed pages in the code store (kv_store="codes")
    installed: set[tuple[int, int]] = field(default_factory=set)  # imported (layer, page start) in the store
    pending: list[int] = field(default_factory=list)  # tokens not yet reported in a TokenEvent
    first_token_time: float | None = None
    images: list[ImageEmbeds] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or load_model(config.model, config.torch_dtype)
        self.model_config = mc = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        head_dims = self.loaded.model.kv_head_dims()  # per layer (K, V) dims: head_dim unless ZeroC-compressed
        num_blocks = config.num_kv_blocks or max(
            1,
            config.kv_cache_memory_bytes
            // PagedKVCache.bytes_per_block(
                mc.num_hidden_layers,
                config.block_size,
                mc.num_key_value_heads,
                mc.head_dim,
                config.torch_dtype,
                head_dims,
            ),
        )
        quantized = config.kv_format != "auto" and config.role != "prefill"
        self.cache = PagedKVCache(
            mc.num_hidden_layers,
            num_blocks,
            config.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
            config.torch_dtype,
            storage_dtype=torch.bfloat16 if quantized else None,
            head_dims=head_dims,
        )
        self.code_pool = self._code_pool(num_blocks, mc.sliding_window) if quantized else None
        self.page_closer = PageCloser(self.cache, self.code_pool)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching and not quantized)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill),
            self.blocks,
        )
        backend = TorchAttentionBackend(self.cache, mc.sliding_window, self.code_pool)
        self.runner = ModelRunner(self.loaded.model, backend)
        self.requests: dict[str, _Request] = {}
        self._imports: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.num_preemptions = 0
        self._rng = torch.Generator().manual_seed(config.seed)

    def _code_pool(self, num_blocks: int, sliding_window: int | None) -> CodePool | None:
        """The code store of kv_store="codes" (code formats, uniform head dims, no sliding window), sized so
        every token slot of the dense cache could sit in a closed page."""
        fmt = self.page_format(self.config.kv_format)
        uniform = isinstance(self.cache.k, torch.Tensor)
        if self.config.kv_store != "codes" or not fmt.has_code_sums or not uniform or sliding_window is not None:
            return None
        pages = num_blocks * self.config.block_size // fmt.page_size + 1
        return CodePool(fmt, self.model_config.num_hidden_layers, pages)

    def _new_codes(self, req: _Request) -> None:
        pool = self.code_pool
        if pool is not None and req.page_format is not None and req.page_format == pool.fmt:
            req.codes = SeqCodes(pool.fmt.page_size)

    def _free_codes(self, req: _Request) -> None:
        if req.codes is not None and self.code_pool is not None:
            self.code_pool.free(req.codes)

    # ---- requests --------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kv_sink: KVSink | None = None,
        arrival_time: float | None = None,
        images: list[ImageEmbeds] | None = None,
    ) -> None:
        """Queues a request. In the prefill role ``kv_sink`` receives its KV, layer by layer. ``images`` replace
        the embeddings of the prompt positions they cover (their KV then travels like any other token's)."""
        req = self._new_request(request_id, prompt_token_ids, params, arrival_time)
        if images:
            self._check_images(images, len(prompt_token_ids))
            req.images = list(images)
            req.seq.image_spans = [(i.start, i.embeds.shape[0], i.key) for i in images]
        req.kv_sink = kv_sink
        if self.config.kv_format != "auto" and self.config.role != "prefill":
            req.page_format = self.page_format(self.config.kv_format)
            self._new_codes(req)
        self.scheduler.add(req.seq)
        self.requests[request_id] = req

    def _new_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None
    ) -> _Request:
        if request_id in self.requests or request_id in self._imports:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        limit = self.model_config.max_position_embeddings
        if len(prompt_token_ids) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {limit} tokens"
            )
        if max(prompt_token_ids) >= self.model_config.vocab_size or min(prompt_token_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            len(prompt_token_ids),
            params,
            arrival_time if arrival_time is not None else time.monotonic(),
        )
        generator = torch.Generator()
        generator.manual_seed(
            params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._rng))
        )
        self._skip_draws(generator, params)
        return _Request(seq, IncrementalDetokenizer(self.tokenizer, params), generator)

    def _skip_draws(self, generator: torch.Generator, params: SamplingParams) -> None:
        """Advances a migrated request's generator past the draws made before (``params.seed_offset`` tokens).

        A draw consumes generator state by vocabulary size only, so dummy draws reproduce it. In a split
        pipeline prefill draws token 1 and decode's generator starts at token 2, so a prefill that resumes after
        g tokens skips g - 1 draws and a decode (or a "both" engine) skips g."""
        if params.greedy or params.seed is None or params.seed_offset <= 0:
            return
        skip = params.seed_offset - 1 if self.config.role == "prefill" else params.seed_offset
        ones = torch.ones(self.model_config.vocab_size)
        for _ in range(skip):
            torch.multinomial(ones, 1, generator=generator)

    def _check_images(self, images: list[ImageEmbeds], prompt_len: int) -> None:
        hidden = self.model_config.hidden_size
        end = 0
        for i, img in enumerate(sorted(images, key=lambda x: x.start)):
            if img.embeds.dim() != 2 or img.embeds.shape[1] != hidden:
                raise ValueError(f"images[{i}]: embeddings must be [n, {hidden}], got {tuple(img.embeds.shape)}")
            if img.start < end or img.end > prompt_len:
                raise ValueError(f"images[{i}]: positions [{img.start}, {img.end}) overlap or leave the prompt")
            end = img.end

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req.seq, "abort")
            self._free_codes(req)
        imported = self._imports.pop(request_id, None)
        if imported is not None:
            self.blocks.free(imported.seq.block_table)
            self._free_codes(imported)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- decode role: KV arrives from a prefill engine ---------------------------------------------
    def page_format(self, name: str) -> PageFormat:
        mc = self.model_config
        return PageFormat(name, mc.num_key_value_heads, mc.head_dim, page_size=self.config.kv_page_size)

    def begin_import(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, kv_format: str | None = None
    ) -> None:
        """Reserves blocks for a prompt whose KV will arrive by ``import_kv``. Pages of ``kv_format`` arrive
        already quantized and are installed as they are; pages decode fills later are quantized once."""
        req = self._new_request(request_id, prompt_token_ids, params, None)
        fmt_name = kv_format or (self.config.kv_format if self.config.kv_format != "auto" else None)
        req.page_format = self.page_format(fmt_name) if fmt_name else None
        self._new_codes(req)
        if req.codes is not None:
            fmt, n = req.page_format, len(prompt_token_ids)
            starts = list(range(fmt.num_sinks, n - fmt.page_size + 1, fmt.page_size)) if n > fmt.num_sinks else []
            if len(starts) > self.code_pool.num_free:
                raise KVCacheFullError(f"no free code pages for {len(starts)} pages")
            req.codes.page_ids, req.codes.starts = self.code_pool.alloc(len(starts)), starts
        if not self.blocks.allocate(req.seq.block_table, len(prompt_token_ids)):
            self._free_codes(req)
            raise KVCacheFullError(f"no free KV blocks for {len(prompt_token_ids)} tokens")
        self._imports[request_id] = req

    def import_kv(
        self,
        request_id: str,
        layer: int,
        start: int,
        k: torch.Tensor,
        v: torch.Tensor,
        page_payload: bytes | None = None,
    ) -> None:
        """Writes K/V [n, Hkv, D] of positions [start, start + n) of one layer into the paged cache.
        ``page_payload``: the exact ``wire.pack`` bytes of a closed page at ``start``; with a code store they
        are installed there as they are (no re-quantization) and decode steps attend on them."""
        req = self._imports[request_id]
        seq = req.seq
        if start < 0 or start + k.shape[0] > seq.num_prompt_tokens:
            raise ValueError(f"KV rows [{start}, {start + k.shape[0]}) outside the prompt of {seq.num_prompt_tokens}")
        self.cache.write(layer, self.cache.slots_for(seq.block_table, start, start + k.shape[0]), k, v)
        if page_payload is not None and req.codes is not None and start in req.codes.starts:
            self.code_pool.store.install_page(layer, req.codes.page_ids[req.codes.starts.index(start)], page_payload)
            req.installed.add((layer, start))

    def commit_import(self, request_id: str, first_token_id: int) -> None:
        """The prompt's KV is complete: continue from the prefill's first token."""
        req = self._imports.pop(request_id)
        seq = req.seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        if req.page_format is not None:
            # Imported pages, the tail included (a closed partial page), are never re-quantized; the pages
            # decode fills start at the prompt's end.
            req.closed_upto = seq.num_prompt_tokens
        if req.codes is not None and len(req.installed) < len(req.codes.starts) * self.model_config.num_hidden_layers:
            self._free_codes(req)  # pages arrived as values only: they stay in the dense cache
        self.blocks.commit_full_blocks(seq.block_table, seq.block_keys, seq.num_computed_tokens)
        self.requests[request_id] = req
        self.scheduler.add_running(seq)
        self._append_token(req, first_token_id, time.monotonic())

    # ---- the step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Runs one scheduling step; returns the streaming deltas it produced."""
        events: list[TokenEvent] = []
        out = self.scheduler.schedule()
        self.num_preemptions += len(out.preempted)
        if out.scheduled:
            sinks = {r: q.kv_sink for r, q in self.requests.items() if q.kv_sink is not None}
            exported = {r: self.requests[r].exported for r in sinks}
            images = {s.seq.request_id: self.requests[s.seq.request_id].images for s in out.scheduled}
            codes = {s.seq.request_id: self.requests[s.seq.request_id].codes for s in out.scheduled}
            logits = self.runner.execute(out.scheduled, sinks, exported, {r: v for r, v in images.items() if v}, codes)
            now = time.monotonic()
            completing = [s.seq for s in out.scheduled if s.completes]
            for s in out.scheduled:
                s.seq.num_computed_tokens += s.num_new_tokens
                req = self.requests[s.seq.request_id]
                req.exported = max(req.exported, s.seq.num_computed_tokens)
                self.blocks.commit_full_blocks(s.seq.block_table, s.seq.block_keys, s.seq.num_computed_tokens)
                self._close_pages(req)
            if completing:
                reqs = [self.requests[s.request_id] for s in completing]
                tokens = sample(
                    logits,
                    [r.seq.params for r in reqs],
                    [r.generator for r in reqs],
                    [self._banned(r.seq) for r in reqs],
                )
                for req, token in zip(reqs, tokens, strict=True):
                    self._append_token(req, token, now)
        for req in list(self.requests.values()):
            if req.pending or req.seq.finish_reason:
                events.append(self._event(req))
        return events

    def _close_pages(self, req: _Request) -> None:
        if req.page_format is None:
            return
        seq = req.seq
        if seq.num_computed_tokens < req.closed_upto:  # preempted and recomputing: its pages are new
            req.closed_upto = 0
            self._free_codes(req)
        req.closed_upto = self.page_closer.close_ready(
            req.page_format, seq.block_table, seq.num_computed_tokens, req.closed_upto, req.codes
        )

    def _banned(self, seq: Sequence) -> list[int]:
        if seq.num_output_tokens >= seq.params.min_tokens:
            return []
        return [*self.model_config.eos_token_ids, *seq.params.stop_token_ids]

    def _append_token(self, req: _Request, token: int, now: float) -> None:
        seq = req.seq
        seq.token_ids.append(token)
        req.pending.append(token)
        req.first_token_time = req.first_token_time or now
        reason = self._finish_reason(req, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _finish_reason(self, req: _Request, token: int) -> str | None:
        seq, p = req.seq, req.seq.params
        is_eos = not p.ignore_eos and token in self.model_config.eos_token_ids
        stop_token = is_eos or token in p.stop_token_ids
        if not stop_token and req.detok.append(token):
            return "stop"
        if stop_token:
            return "stop"
        if self.config.role == "prefill":
            return "prefilled"
        if seq.num_output_tokens >= p.max_tokens:
            return "length"
        return None

    def _event(self, req: _Request) -> TokenEvent:
        seq = req.seq
        finished = seq.finish_reason is not None
        event = TokenEvent(
            request_id=seq.request_id,
            token_ids=req.pending,
            text=req.detok.take_delta(finished),
            finished=finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_prompt_tokens,
        )
        req.pending = []
        if finished:
            del self.requests[seq.request_id]
            self._free_codes(req)
        return event

    # ---- scoring ---------------------------------------------------------------------------------
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probabilities of token_ids[1:] given their prefixes (for perplexity)."""
        return self.runner.score(token_ids)

    @torch.inference_mode()
    def score_by_decode_steps(self, windows: list[list[int]], progress: bool = False) -> list[torch.Tensor]:
        """Like ``score`` but every token is scored by a decode step that attends to the paged cache, pages
        quantized in this engine's ``kv_format`` as they fill: the path a served request takes. All windows
        advance together, one token per step."""
        fmt = self.page_format(self.config.kv_format) if self.config.kv_format != "auto" else None
        seqs = [
            Sequence(f"score-{i}", list(w), len(w), SamplingParams(max_tokens=1), 0.0) for i, w in enumerate(windows)
        ]
        for seq in seqs:
            if not self.blocks.allocate(seq.block_table, len(seq.token_ids)):
                raise ValueError("windows do not fit in the KV cache; use fewer or smaller windows")
        closed = [0] * len(seqs)
        pool = self.code_pool if fmt is not None and fmt == getattr(self.code_pool, "fmt", None) else None
        codes = {seq.request_id: SeqCodes(fmt.page_size) for seq in seqs} if pool is not None else {}
        out: list[list[torch.Tensor]] = [[] for _ in seqs]
        try:
            for t in trange(max(len(w) for w in windows) - 1, desc="decode steps", disable=not progress):
                live = [i for i, w in enumerate(windows) if t < len(w) - 1]
                step = []
                for i in live:
                    seqs[i].num_computed_tokens = t
                    seqs[i].token_ids = windows[i][: t + 1]
                    step.append(ScheduledSeq(seqs[i], 1))
                logprobs = torch.log_softmax(self.runner.execute(step, {}, {}, None, codes), dim=-1)
                for row, i in enumerate(live):
                    out[i].append(logprobs[row, windows[i][t + 1]])
                    if fmt is not None:
                        closed[i] = self.page_closer.close_ready(
                            fmt, seqs[i].block_table, t + 1, closed[i], codes.get(seqs[i].request_id)
                        )
        finally:
            for seq in seqs:
                self.blocks.free(seq.block_table)
            for c in codes.values():
                pool.free(c)
        return [torch.stack(x) for x in out]
