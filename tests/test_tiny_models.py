"""Tests for pathgen.demo.tiny_models: deterministic builds, offline loading, generation through the real APIs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathgen.demo.tiny_models import (
    TINY_LLAVA_IMAGE_SIZE,
    TINY_LLAVA_PATCH_SIZE,
    build_tiny_gguf,
    build_tiny_llava,
    build_tiny_models,
    tiny_llava_tokenizer,
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
    """All tiny models with seed 0 ("a") and seed 1 ("other") (do not modify)."""
    return {name: build_tiny_models(tmp_path_factory.mktemp(name), seed=seed) for name, seed in [("a", 0), ("other", 1)]}


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
                 "processor_config.json", "preprocessor_config.json", "chat_template.jinja", "generation_config.json"]:
        assert (paths["llava"] / name).is_file(), name
    for file in paths["clip"].parents[1].rglob("*"):
        assert not file.name.startswith("."), f"temporary left behind: {file}"
        if file.is_file():
            assert file.stat().st_size < 20 * 2**20, file


def test_rebuild_same_bytes_same_mtimes(built, tmp_path):
    # Write-if-changed: a rebuild that produced different bytes would rewrite (and re-date) a file.
    source = built["a"]["clip"].parents[1]
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    files = [p for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    old = 1_000_000_000  # so a rewrite is visible at any clock resolution
    for file in files:
        os.utime(file, ns=(old, old))
    paths = build_tiny_models(tmp_path, seed=0)
    assert {key: path.relative_to(tmp_path) for key, path in paths.items()} == {
        key: path.relative_to(source) for key, path in built["a"].items()
    }
    assert tree_bytes(tmp_path) == tree_bytes(source)
    assert [p.stat().st_mtime_ns for p in files] == [old] * len(files)
    build_tiny_gguf(paths["llm"], seed=1)
    assert paths["llm"].stat().st_mtime_ns != old


def test_fresh_build_in_another_process_same_bytes(built, tmp_path):
    # Tokenizer training runs in Rust with per-process hash seeds: rebuild from scratch elsewhere.
    code = (
        "import sys; from pathgen.demo.tiny_models import build_tiny_gguf, build_tiny_llava; "
        "build_tiny_llava(sys.argv[1] + '/tiny-llava'); build_tiny_gguf(sys.argv[1] + '/tiny-llm/tiny-llm.gguf')"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=300)
    assert tree_bytes(tmp_path / "tiny-llava") == tree_bytes(built["a"]["llava"])
    assert (tmp_path / "tiny-llm" / "tiny-llm.gguf").read_bytes() == built["a"]["llm"].read_bytes()


@pytest.mark.parametrize("key, weights", [("clip", ""), ("llava", "model.safetensors"), ("llm", "")])
def test_other_seed_other_bytes(built, key, weights):
    assert (built["a"][key] / weights).read_bytes() != (built["other"][key] / weights).read_bytes()


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


def test_tokenizer():
    tokenizer = tiny_llava_tokenizer(padding_side="right")
    assert tokenizer.padding_side == "right"
    assert [tokenizer.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", "<pad>", "<image>"]] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = tokenizer("USER: <image>\nnuclei and stroma")["input_ids"]
    assert ids[0] == 1 and ids.count(4) == 1  # <s> first; <image> is one token
    assert 1000 <= len(tokenizer) <= 2048
    assert len(tokenizer(" eosinophilic pleomorphism", add_special_tokens=False)["input_ids"]) == 2  # word pieces


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


# --- GGUF through llama.cpp ----------------------------------------------------------

# Bounded strings and arrays: the longest JSON the grammar admits (~830 characters) fits
# in max_tokens (every piece of the tiny vocabulary is at least one character), so the
# grammar itself forces the closing brackets even for random weights.
BOUNDED_PARTS_SCHEMA = {
    "type": "object",
    "properties": {"parts": {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 4}},
    "required": ["parts"],
}
JSON_MAX_TOKENS = 1024
REPORTS = [
    "Invasive ductal carcinoma, grade 2, with lymphocytes infiltrating the stroma. No necrosis is seen.",
    "Colonic mucosa with adenocarcinoma forming irregular glands; dirty necrosis; margins free.",
    "Clear cell renal cell carcinoma with a delicate vascular network and focal hemorrhage.",
]


def load_llm(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, seed=0, verbose=False)


def split_messages(report: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Split the pathology report into short parts. Answer in JSON."},
        {"role": "user", "content": report},
    ]


def test_gguf_loads_and_chats(built):
    llm = load_llm(built["a"]["llm"])
    assert llm.n_vocab() == 3 + 256 + 768 and llm.n_ctx() == 2048
    assert llm.metadata["general.architecture"] == "llama"
    assert len(llm.tokenize(b"nuclei pleomorphism", add_bos=False)) == 2  # pathology word pieces
    assert llm.detokenize(llm.tokenize("café µm".encode(), add_bos=False)) == " café µm".encode()  # byte fallback
    long_prompt = " ".join(REPORTS * 12)  # a few hundred tokens
    assert 300 < len(llm.tokenize(long_prompt.encode())) < 2048 - 64
    out = llm.create_chat_completion(split_messages(long_prompt), temperature=0, max_tokens=32)
    text = out["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    again = llm.create_chat_completion(split_messages(long_prompt), temperature=0, max_tokens=32)
    assert again["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("how", ["response_format", "grammar"])
def test_gguf_json_constrained_is_valid_and_deterministic(built, how):
    jsonschema = pytest.importorskip("jsonschema")
    runs = []
    for _ in range(2):  # two loads
        llm = load_llm(built["a"]["llm"])
        if how == "grammar":
            from llama_cpp import LlamaGrammar

            constraint = {"grammar": LlamaGrammar.from_json_schema(json.dumps(BOUNDED_PARTS_SCHEMA), verbose=False)}
        else:
            constraint = {"response_format": {"type": "json_object", "schema": BOUNDED_PARTS_SCHEMA}}
        answers = []
        for report in REPORTS:
            out = llm.create_chat_completion(
                split_messages(report), temperature=0, max_tokens=JSON_MAX_TOKENS, **constraint
            )
            assert out["choices"][0]["finish_reason"] == "stop"
            answer = json.loads(out["choices"][0]["message"]["content"])
            jsonschema.validate(answer, BOUNDED_PARTS_SCHEMA)
            jsonschema.validate(answer, PARTS_SCHEMA)
            answers.append(answer)
        runs.append(answers)
        del llm
    assert runs[0] == runs[1]
    assert any(answer["parts"] for answer in runs[0]), "the random model should write some parts"


def test_gguf_other_seed_other_text(built):
    texts = []
    for key in ("a", "other"):
        llm = load_llm(built[key]["llm"])
        out = llm.create_chat_completion(split_messages(REPORTS[0]), temperature=0, max_tokens=16)
        texts.append(out["choices"][0]["message"]["content"])
    assert texts[0] != texts[1]
