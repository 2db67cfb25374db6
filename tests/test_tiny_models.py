"""Tests for pathgen.tiny_models: deterministic builds, offline loading, generation through the real APIs."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathgen.tiny_models import (
    TINY_LLAVA_IMAGE_SIZE,
    TINY_LLAVA_PATCH_SIZE,
    build_tiny_gguf,
    build_tiny_llava,
    build_tiny_models,
)

PARTS_SCHEMA = {
    "type": "object",
    "properties": {"parts": {"type": "array", "items": {"type": "string"}}},
    "required": ["parts"],
}
# Prompts of different lengths, so a batch needs padding.
PROMPTS = [
    "This is a histopathology image from colon, describe this image in detail.",
    "Describe.",
    "This is a histopathology image from lung, describe the nuclei, the stroma and the glands in detail.",
]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Seed 0 built twice into separate dirs, seed 1 once (do not modify)."""
    return {
        name: build_tiny_models(tmp_path_factory.mktemp(name), seed=seed)
        for name, seed in [("a", 0), ("b", 0), ("other", 1)]
    }


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode on, and any network connection an error: loading must be local only."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import

    def no_network(self, *args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def llava(built):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = built["a"]["llava"]
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def test_layout(built):
    paths = built["a"]
    root = paths["clip"].parents[1]
    assert paths["clip"] == root / "tiny-clip" / "open_clip_model.pt"
    assert paths["llava"] == root / "tiny-llava"
    assert paths["llm"] == root / "tiny-llm" / "tiny-llm.gguf"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja", "generation_config.json"]:
        assert (paths["llava"] / name).is_file(), name
    for file in paths["clip"].parents[1].rglob("*"):
        assert not file.name.startswith("."), f"temporary left behind: {file}"
        if file.is_file():
            assert file.stat().st_size < 20 * 2**20, file


def test_same_seed_same_bytes(built):
    a, b = built["a"]["clip"].parents[1], built["b"]["clip"].parents[1]
    assert tree_bytes(a) == tree_bytes(b)


@pytest.mark.parametrize("key, weights", [("clip", ""), ("llava", "model.safetensors"), ("llm", "")])
def test_other_seed_other_bytes(built, key, weights):
    assert (built["a"][key] / weights).read_bytes() != (built["other"][key] / weights).read_bytes()


def test_rebuild_keeps_mtimes(tmp_path):
    models = build_tiny_models(tmp_path, seed=0)
    files = [p for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    for file in files:
        os.utime(file, ns=(1_000_000_000, 1_000_000_000))  # so a rewrite is visible at any clock resolution
    assert build_tiny_models(tmp_path, seed=0) == models
    assert [p.stat().st_mtime_ns for p in files] == [1_000_000_000] * len(files)
    assert [p for p in sorted(tmp_path.rglob("*")) if p.is_file()] == files
    build_tiny_gguf(models["llm"], seed=1)
    assert models["llm"].stat().st_mtime_ns != 1_000_000_000


def test_rebuild_repairs_a_damaged_file(tmp_path, built):
    shutil.copytree(built["a"]["llava"], tmp_path / "tiny-llava")
    (tmp_path / "tiny-llava" / "config.json").write_text("{}")
    build_tiny_llava(tmp_path / "tiny-llava", seed=0)
    assert tree_bytes(tmp_path / "tiny-llava") == tree_bytes(built["a"]["llava"])


# --- LLaVA -------------------------------------------------------------------


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (400, 520, 3), dtype=np.uint8)),  # resized and cropped
        Image.new("RGB", (336, 336), (225, 140, 200)),  # eosin pink
        Image.new("RGB", (300, 300), (60, 40, 130)),  # hematoxylin purple
    ]


def llava_inputs(processor, imgs: list[Image.Image], prompts: list[str] = PROMPTS):
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
        )
        for prompt in prompts
    ]
    return processor(images=imgs, text=texts, return_tensors="pt", padding=True)


def test_llava_loads_offline(built, offline):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(built["a"]["llava"])
    processor = AutoProcessor.from_pretrained(built["a"]["llava"])
    assert isinstance(processor, LlavaProcessor)
    assert processor.tokenizer.padding_side == "left"
    config = model.config
    assert config.vision_config.image_size == TINY_LLAVA_IMAGE_SIZE
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert (config.vision_feature_select_strategy, config.vision_feature_layer) == ("default", -2)
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_llava_chat_template(llava):
    _, processor = llava
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == "USER: <image>\nDescribe. ASSISTANT:"


def test_processor_expands_image_token(llava):
    model, processor = llava
    inputs = llava_inputs(processor, images())
    n_patches = (TINY_LLAVA_IMAGE_SIZE // TINY_LLAVA_PATCH_SIZE) ** 2  # CLS dropped by the "default" strategy
    counts = (inputs["input_ids"] == model.config.image_token_index).sum(dim=1)
    assert counts.tolist() == [n_patches] * 3 == [model.config.image_seq_length] * 3
    assert inputs["pixel_values"].shape == (3, 3, TINY_LLAVA_IMAGE_SIZE, TINY_LLAVA_IMAGE_SIZE)
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][:, 0] == 0).any()  # left padded
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    assert sum(f.reshape(-1, model.config.text_config.hidden_size).shape[0] for f in features) == 3 * n_patches


def test_llava_batched_greedy_generate_is_deterministic(llava, offline):
    model, processor = llava
    inputs = llava_inputs(processor, images())
    texts = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        assert new.shape[1] <= 16
        texts.append(processor.batch_decode(new, skip_special_tokens=True))
    assert texts[0] == texts[1]
    assert len(texts[0]) == 3 and all(isinstance(t, str) and t.strip() for t in texts[0])
    same_prompt = llava_inputs(processor, images(), [PROMPTS[0]] * 3)
    with torch.no_grad():
        out = model.generate(**same_prompt, max_new_tokens=16, do_sample=False)
    by_image = processor.batch_decode(out[:, same_prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(set(by_image)) > 1, "different images should steer the random model differently"
    # Left padding: the shortest prompt's text does not depend on what it is batched with.
    alone = llava_inputs(processor, images()[1:2], PROMPTS[1:2])
    with torch.no_grad():
        out = model.generate(**alone, max_new_tokens=16, do_sample=False)
    assert processor.batch_decode(out[:, alone["input_ids"].shape[1]:], skip_special_tokens=True)[0] == texts[0][1]
