"""Vision tower, preprocessing, image-token estimate, embedding injection and HF LLaVA loading."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from stageserve.core.sampling import SamplingParams
from stageserve.engine import EngineConfig, LLMEngine
from stageserve.engine.attention import NoCacheAttention
from stageserve.engine.model_runner import ImageEmbeds
from stageserve.engine.multimodal import MultimodalLLM
from stageserve.models.multimodal import (
    ImageError,
    ImageLimits,
    MultimodalConfig,
    build_vision_tower,
    embedding_key,
    encode_images,
    estimate_image_tokens,
    multimodal_config,
    preprocess,
    probe_image,
)
from stageserve.models.vision import VisionConfig, VisionTower


def image(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(arr).save(out, fmt)
    return out.getvalue()


MM = MultimodalConfig(
    VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    image_token_id=16,
)


@pytest.mark.parametrize("size", [(1, 1), (32, 32), (33, 10), (64, 64), (65, 20), (300, 7), (20, 500), (999, 999)])
def test_estimate_equals_encoded_rows(size):
    tower = VisionTower.seeded(MM.vision, 48)
    data = image(*size)
    (rows,) = encode_images(tower, [data], MM)
    assert rows.shape == (estimate_image_tokens(*size, MM), 48)
    assert preprocess(data, MM).shape[1:] == (3, 32, 32)


def test_tiles_are_thumbnail_then_grid_and_normalised():
    pixels = preprocess(image(64, 32, 1), MM)  # a 2x1 grid: thumbnail + 2 tiles
    assert pixels.shape == (3, 3, 32, 32)
    white = io.BytesIO()
    Image.new("RGB", (10, 10), (255, 255, 255)).save(white, "PNG")
    one = preprocess(white.getvalue(), MM)
    expected = (1 - torch.tensor(MM.vision.image_mean)) / torch.tensor(MM.vision.image_std)
    assert torch.allclose(one[0, :, 0, 0], expected, atol=1e-5)


def test_seeded_tower_is_deterministic_and_batching_does_not_change_rows():
    a, b, c = (
        VisionTower.seeded(MM.vision, 48, 0),
        VisionTower.seeded(MM.vision, 48, 0),
        VisionTower.seeded(MM.vision, 48, 1),
    )
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.projector.linear_1.weight, c.projector.linear_1.weight)
    images = [image(20, 20, i) for i in range(3)] + [image(70, 40, 9)]
    together = encode_images(a, images, MM)
    alone = [encode_images(a, [d], MM)[0] for d in images]
    assert all(torch.equal(x, y) for x, y in zip(together, alone, strict=True))
    assert embedding_key(together[0]) != embedding_key(together[1])


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty"),
        (b"GIF89a-not-really", "cannot decode"),
        (image(8, 8, fmt="TIFF"), "unsupported image format TIFF"),
        (image(600, 2), "each side must be"),
    ],
)
def test_bad_images_raise_image_error(data, needle):
    with pytest.raises(ImageError, match=needle):
        probe_image(data, ImageLimits(max_side=512))


def test_truncated_image_fails_in_preprocess_not_probe():
    data = image(40, 40, 3)
    cut = data[: len(data) // 2]
    probe_image(cut, MM.limits)  # the header is fine
    with pytest.raises(ImageError, match="cannot decode"):
        preprocess(cut, MM)


def test_engine_injection_equals_full_forward_and_prefix_keys_differ_per_image(loaded):
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, block_size=16, max_num_batched_tokens=40), loaded)
    model = MultimodalLLM.from_engine(engine, multimodal_config(None, loaded.tokenizer))
    messages = [{"role": "user", "content": "Hi", "images": [image(30, 30, 5)]}]
    ids, starts, images = model.prompt(messages)
    (emb,) = model.encode(images)
    # Reference: one no-cache forward with the embeddings put in place, greedy first token.
    with torch.inference_mode():
        x = loaded.model.embed_tokens(torch.tensor(ids)).clone()
        x[starts[0] : starts[0] + emb.shape[0]] = emb
        hidden = loaded.model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention(None), x)
        first = int(loaded.model.logits(hidden[-1:]).argmax())
    params = SamplingParams(max_tokens=1)
    assert model.chat(messages, params) == [first]  # chunked prefill (40-token chunks) through the paged cache
    # Same positions, another image: the image blocks must not come from the prefix cache.
    other_ids, other_starts, other_images = model.prompt(
        [{"role": "user", "content": "Hi", "images": [image(30, 30, 6)]}]
    )
    assert (other_ids, other_starts) == (ids, starts)
    spans = [ImageEmbeds(other_starts[0], e, embedding_key(e)) for e in model.encode(other_images)]
    engine.add_request("b", other_ids, params, images=spans)
    cached = None
    while engine.has_unfinished_requests():
        for event in engine.step():
            cached = event.num_cached_tokens if event.finished else cached
    assert cached is not None and cached <= starts[0]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory, loaded):
    transformers = pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
        ),
        text_config=LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        image_token_index=16,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(path, safe_serialization=True)
    loaded.tokenizer.save_pretrained(path)
    assert transformers
    return hf, str(path)


def test_llava_directory_loads_and_matches_transformers(tiny_llava):
    from stageserve.models.loader import load_model

    hf, path = tiny_llava
    ours = load_model(path)
    mm = multimodal_config(path, ours.tokenizer)
    assert (mm.image_token_id, mm.vision.tokens_per_tile, mm.vision.feature_layer) == (16, 16, -2)
    tower = build_vision_tower(path, mm, ours.config)
    pixels = preprocess(image(30, 20, 2), mm)
    with torch.inference_mode():
        ref = hf.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        ref = torch.cat(list(ref)) if isinstance(ref, tuple | list) else ref.reshape(-1, 64)
        got = tower(pixels).reshape(-1, 64)
        assert torch.allclose(got, ref.reshape(-1, 64), atol=1e-5)
        # The whole model: image tokens in the prompt, next-token logits from HF vs our engine's forward.
        ids = [1, 2, *[16] * 16, 5, 7]
        hf_logits = hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
        x = ours.model.embed_tokens(torch.tensor(ids)).clone()
        x[2:18] = got
        hidden = ours.model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention(None), x)
        assert torch.allclose(ours.model.logits(hidden[-1:])[0], hf_logits, atol=1e-4)
