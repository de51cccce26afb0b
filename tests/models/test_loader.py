"""Loading from GGUF and HF directories, every supported architecture against transformers, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stageserve.engine.attention import NoCacheAttention
from stageserve.models import ModelLoadError, load_model

IDS = [1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 1233, 2050, 2436]


def _logits(loaded, ids=IDS):
    with torch.inference_mode():
        model = loaded.model
        return model.logits(
            model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention(loaded.config.sliding_window))
        )


def _hf_logits(hf, ids=IDS):
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def test_hf_directory_with_safetensors_loads_the_same_model(tmp_path, loaded, hf_model):
    from safetensors.torch import save_file

    # The GGUF-backed reference cannot save_pretrained itself; write the same HF layout directly.
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded.tokenizer.save_pretrained(tmp_path)
    from_dir = load_model(str(tmp_path))
    assert from_dir.config.num_hidden_layers == loaded.config.num_hidden_layers
    assert (_logits(from_dir) - _hf_logits(hf_model)).abs().max().item() <= 1e-3
    assert from_dir.tokenizer.encode("hello world") == loaded.tokenizer.encode("hello world")


ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
        },
    ),
    "llama2": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_architectures_match_transformers(tmp_path, loaded, arch):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    base = {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    config = getattr(transformers, config_cls)(**(base | extra))
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a dropped term would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    if arch == "qwen2":
        assert ours.config.attention_bias
    ids = IDS * 2  # 24 tokens: longer than Mistral's window of 8
    assert (_logits(ours, ids) - _hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_missing_path_is_one_clear_line():
    with pytest.raises(ModelLoadError, match="does not exist: /nope/model.gguf"):
        load_model("/nope/model.gguf")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable GGUF file"):
        load_model(str(bad))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_cli_reports_load_errors_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "stageserve.cli", "generate", "hi", "--model", "/nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "stageserve: error: model path does not exist: /nope"
