"""Tiny offline models with the real architectures, built deterministically from a seed.

The same bytes on every x86-64 CPU: random weights come from integer draws
(pathgen.demo.portable_init), the CLIP's calibration runs in float64, and the
GGUF's weights come from numpy's generator.

They stand in for the released checkpoints (PathGen-CLIP-L_init, ...) so the
whole pipeline runs on a laptop and in CI through the same loading code.
Outputs are meaningless; shapes, file formats and code paths are real.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch

from pathgen.demo.calibration import whiten_image_features
from pathgen.demo.portable_init import redraw_parameters
from pathgen.demo.slides import texture_patches
from pathgen.store.io import write_bytes
from pathgen.store.seeds import derive_seed

if TYPE_CHECKING:  # transformers, tokenizers and gguf are imported where used: slow imports
    import numpy as np
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

TINY_CLIP_NAME = "pathgen-tiny-clip"
TINY_CLIP_CALIBRATION_PER_CLASS = 40  # 240 patches for a 64-d covariance
TINY_CLIP_SHRINKAGE = 0.5  # partial whitening: near-duplicates still exist, as with a trained CLIP
# A ViT and text transformer of the ViT-L-14-336 family, shrunk: same 336 px
# input, quick GELU, 77-token context and CLIP BPE vocabulary.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 336, "layers": 2, "width": 64, "head_width": 32, "patch_size": 28, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


def _write_if_changed(data: bytes, path: Path) -> None:
    # Unchanged bytes keep their mtime, so Snakemake and DVC see no change.
    if path.is_file() and path.read_bytes() == data:
        return
    write_bytes(data, path)


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `pathgen-tiny-clip.json` (the open_clip config) and `open_clip_model.pt` for the tiny CLIP; return the checkpoint path."""
    out_dir = Path(out_dir)
    config_path = out_dir / f"{TINY_CLIP_NAME}.json"
    _write_if_changed((json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True) + "\n").encode(), config_path)
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    root_logger = logging.getLogger()
    level, root_logger.level = root_logger.level, logging.ERROR  # random init is the point here
    try:
        model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None, force_quick_gelu=True).eval()
    finally:
        root_logger.setLevel(level)
    redraw_parameters(model, derive_seed(seed, "tiny-clip"))  # the same bits on every CPU
    # Spread the random features like a trained CLIP's, on synthetic patches the demo slides never contain.
    calibration = [image for _, image in texture_patches(TINY_CLIP_CALIBRATION_PER_CLASS, seed=derive_seed(seed, "calibration"))]
    preprocess = open_clip.image_transform(TINY_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False)
    whiten_image_features(model, preprocess, calibration, TINY_CLIP_SHRINKAGE)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    checkpoint = out_dir / "open_clip_model.pt"
    _write_if_changed(buf.getvalue(), checkpoint)
    note = ("Tiny random-weight open_clip model (architecture of ViT-L-14-336, shrunk), built offline by "
            f"`pathgen models tiny` with seed {seed}; image features calibrated on synthetic H&E patches "
            "(pathgen/demo/calibration.py). Not a trained model.\n")
    _write_if_changed(note.encode(), out_dir / "README.txt")
    return checkpoint


# --- tiny LLaVA (describe / revise agents) -----------------------------------

TINY_LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TINY_LLAVA_IMAGE_SIZE = 336  # PathGen-CLIP-L input
TINY_LLAVA_PATCH_SIZE = 28  # 12 x 12 = 144 patches + CLS
TINY_LLAVA_VOCAB_SIZE = 1024
TINY_LLAVA_BLOCK_SCALE = 10.0
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# LLaVA-1.5 conversation format: "USER: <image>\n{prompt} ASSISTANT:". Content may be a
# string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ (message['content'] if message['content'] is string else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Training text for the tiny tokenizer: H&E description vocabulary, the revise agent's
# JSON operations and the summaries' style, so pieces are pathology words, not letters.
PATHOLOGY_CORPUS = """\
USER: This is a histopathology image from the lung, describe this image in detail. ASSISTANT:
USER: Revise the description of this colon image. Answer with JSON operations add, delete or edit. ASSISTANT:
USER: Summarize the description in fewer than 77 tokens. ASSISTANT:
The image shows a hematoxylin and eosin stained section of lung parenchyma with alveolar spaces lined by flattened pneumocytes.
Scattered alveolar macrophages with abundant eosinophilic cytoplasm and brown pigment fill some alveoli.
The glands are lined by a single layer of columnar epithelial cells with basally located round to oval nuclei, fairly uniform in size and shape.
The overall morphology is consistent with benign prostatic tissue with corpora amylacea in the lumina.
Sheets of malignant cells with marked nuclear pleomorphism, vesicular chromatin and prominent nucleoli infiltrate the desmoplastic stroma.
Numerous mitoses, including atypical mitotic figures, are present, and there are foci of necrosis with karyorrhectic debris.
A dense infiltrate of small mature lymphocytes and plasma cells surrounds the tumor nests at the invasive front.
The stroma is fibrous and hyalinized, with thin-walled blood vessels, extravasated red blood cells and scattered fibroblasts.
Cribriform and solid architecture is seen, with back-to-back glands lacking intervening stroma.
The tumor cells are polygonal with clear to eosinophilic cytoplasm, distinct cell borders and hyperchromatic nuclei.
Keratin pearls and intercellular bridges indicate squamous differentiation in this invasive squamous cell carcinoma.
Colonic mucosa shows crypts with goblet cells, a lamina propria with mixed inflammatory cells and an intact muscularis mucosae.
Adenocarcinoma forms irregular, angulated glands with luminal dirty necrosis and elongated, stratified, pencil-shaped nuclei.
Renal cortex contains glomeruli with patent capillary loops and tubules lined by cuboidal cells with granular cytoplasm.
Clear cell renal cell carcinoma shows nests of cells with optically clear cytoplasm separated by a delicate vascular network.
Hepatocytes are arranged in cords and plates around central veins, with portal tracts containing bile ducts, arteries and veins.
Breast tissue shows terminal duct lobular units with a double layer of luminal epithelial and myoepithelial cells.
Invasive ductal carcinoma infiltrates adipose tissue as cords, trabeculae and single cells with moderate atypia.
Lymph node shows preserved architecture with reactive germinal centers, tingible body macrophages and a mantle zone.
The epidermis shows hyperkeratosis, parakeratosis and acanthosis; the dermis contains a perivascular lymphocytic infiltrate.
Melanoma cells with abundant melanin pigment, large nucleoli and frequent mitoses form nests at the dermal epidermal junction.
Smooth muscle bundles, nerves, ganglion cells and loose connective tissue are present in the wall.
Edema, congestion, hemorrhage, fibrin, neutrophils and eosinophils indicate acute inflammation with ulceration.
Granulomas composed of epithelioid histiocytes and multinucleated giant cells are surrounded by a rim of lymphocytes.
Calcifications, mucin pools, cholesterol clefts and foamy macrophages are focally identified.
Cellularity is high, the nuclear to cytoplasmic ratio is increased and the chromatin is coarse and irregular.
Low power view shows a well circumscribed lesion; high power view shows spindle cells in fascicles with a storiform pattern.
Papillary fronds with fibrovascular cores are lined by cells with nuclear grooves, pseudoinclusions and overlapping ground glass nuclei.
The tissue appears pink and purple, with basophilic nuclei and eosinophilic collagen fibers in the background.
There is no evidence of lymphovascular invasion, perineural invasion or tumor at the margin in this patch.
Findings: moderately differentiated adenocarcinoma, grade 2, with tumor budding and a peritumoral lymphoid reaction.
Summary: poorly differentiated carcinoma with necrosis, high mitotic activity and marked pleomorphism.
{"op": "add", "text": "Scattered lymphocytes are present in the stroma.", "target": ""}
{"op": "delete", "text": "", "target": "Numerous mitoses are seen."}
{"op": "edit", "text": "The nuclei are round and uniform.", "target": "The nuclei are pleomorphic."}
{"operations": [{"op": "edit", "text": "eosinophilic cytoplasm", "target": "basophilic cytoplasm"}, {"op": "add", "text": "necrosis", "target": ""}]}
{"parts": ["Invasive carcinoma with glandular differentiation.", "Lymphocytes infiltrate the stroma."]}
{"prompts": ["enlarged nuclei", "lymphocyte infiltration", "gland formation", "tumor necrosis"]}
[] {} [{}] "" : , ; . ( ) - / 0 1 2 3 4 5 6 7 8 9 10 20 50 100 % true false null
"""


def _train_tokenizer(vocab_size: int = TINY_LLAVA_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on `PATHOLOGY_CORPUS` with the LLaVA special tokens at ids 0-4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level: every string encodes (no <unk> in practice), like Llama's byte fallback.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=TINY_LLAVA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(PATHOLOGY_CORPUS.splitlines(), trainer=trainer)
    # Llama-style: prepend <s>, as LLaVA-1.5's tokenizer does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def tiny_llava_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """The tiny LLaVA tokenizer as a `PreTrainedTokenizerFast` (left padding: batched generation)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side=padding_side,
        model_max_length=2048,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _copy_tree_if_changed(src: Path, dest: Path) -> None:
    # save_pretrained writes everything afresh; copying file by file keeps unchanged mtimes.
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        _write_if_changed(file.read_bytes(), dest / file.relative_to(src))


def build_tiny_llava(out_dir: str | Path, seed: int = 0, padding_side: str = "left") -> Path:
    """Write a tiny random `LlavaForConditionalGeneration` with tokenizer and processor in Hugging Face format; return `out_dir`."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    tokenizer = tiny_llava_tokenizer(padding_side)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in TINY_LLAVA_SPECIAL_TOKENS}
    num_patches = (TINY_LLAVA_IMAGE_SIZE // TINY_LLAVA_PATCH_SIZE) ** 2
    vision = CLIPVisionConfig(
        image_size=TINY_LLAVA_IMAGE_SIZE, patch_size=TINY_LLAVA_PATCH_SIZE, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=ids["<image>"], image_seq_length=num_patches,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    config.pad_token_id = ids["<pad>"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    redraw_parameters(model, derive_seed(seed, "tiny-llava"))  # the same bits on every CPU
    with torch.no_grad():
        # At init scale (std 0.02) the blocks barely touch the residual stream, so the next
        # token depends on the last token only and greedy text cycles with period 2-3.
        # Stronger blocks make it depend on the whole context (and the image): varied text.
        for name, param in model.model.language_model.named_parameters():
            if name.startswith("layers.") and name.endswith("proj.weight"):
                param.mul_(TINY_LLAVA_BLOCK_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], do_sample=False,
    )
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": TINY_LLAVA_IMAGE_SIZE}, resample=3,
        do_center_crop=True, crop_size={"height": TINY_LLAVA_IMAGE_SIZE, "width": TINY_LLAVA_IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    # num_additional_image_tokens=1: the CLS token, which the "default" strategy then drops,
    # so the processor writes exactly one <image> per patch feature the model produces.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 1 MB file needs no "Writing model shards" bar
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            # transformers 5 nests the image processor in processor_config.json; the standalone
            # file is what released LLaVA checkpoints (and other readers) carry too.
            image_processor.save_pretrained(tmp)
            note = ("Tiny random-weight LLaVA (CLIP ViT 336/28 vision tower, Llama text model), "
                    f"built offline by `pathgen models tiny` with seed {seed}. Not a trained model.\n")
            Path(tmp, "README.txt").write_text(note)
            _copy_tree_if_changed(Path(tmp), out_dir)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    return out_dir


# --- tiny GGUF LLM (summarize, report cleaning, attribute prompts) ----------------

TINY_LLM_DIMS = {"n_embd": 64, "n_ff": 128, "n_layer": 2, "n_head": 4, "n_head_kv": 4, "n_ctx": 4096}
TINY_LLM_PIECES = 768  # SentencePiece word pieces on top of the 3 specials and 256 bytes
# Llama-2 chat format (the paper's summarize agent is a fine-tuned Llama-2).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _sentencepiece_vocab(n_pieces: int = TINY_LLM_PIECES) -> tuple[list[str], list[float], list[int]]:
    """A Llama-style SentencePiece vocabulary: tokens, scores and types, ids 0-2 = <unk>, <s>, </s>."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # BPE over "▁"-prefixed words; llama.cpp's SPM tokenizer merges the best-scoring
    # adjacent pair whose concatenation is a piece, so score = -(merge rank) and a vocab
    # closed under its merges reproduces the BPE segmentation. Unknown chars fall back to bytes.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=1, show_progress=False)
    corpus = PATHOLOGY_CORPUS + "[INST] <<SYS>>\n<</SYS>>\n [/INST]\n"
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    pieces = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    for rank, (piece, _) in enumerate(pieces):
        tokens.append(piece)
        scores.append(-float(rank))
        types.append(gguf.TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


def _tiny_llm_tensors(n_vocab: int, seed: int) -> dict[str, np.ndarray]:
    # Shapes as numpy (rows = outputs), which GGUF stores reversed, as llama.cpp expects.
    import numpy as np

    d = TINY_LLM_DIMS
    rng = np.random.default_rng(seed)
    head_dim = d["n_embd"] // d["n_head"]

    def dense(n_out: int, n_in: int) -> np.ndarray:
        # 1/sqrt(fan_in): blocks then move the residual stream as much as the embedding
        # does, so greedy text depends on the context, not only on the last token.
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    tensors = {"token_embd.weight": rng.standard_normal((n_vocab, d["n_embd"])).astype(np.float32)}
    for i in range(d["n_layer"]):
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(d["n_embd"], dtype=np.float32),
            f"blk.{i}.attn_q.weight": dense(d["n_embd"], d["n_embd"]),
            f"blk.{i}.attn_k.weight": dense(d["n_head_kv"] * head_dim, d["n_embd"]),
            f"blk.{i}.attn_v.weight": dense(d["n_head_kv"] * head_dim, d["n_embd"]),
            f"blk.{i}.attn_output.weight": dense(d["n_embd"], d["n_embd"]),
            f"blk.{i}.ffn_norm.weight": np.ones(d["n_embd"], dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": dense(d["n_ff"], d["n_embd"]),
            f"blk.{i}.ffn_up.weight": dense(d["n_ff"], d["n_embd"]),
            f"blk.{i}.ffn_down.weight": dense(d["n_embd"], d["n_ff"]),
        }
    tensors["output_norm.weight"] = np.ones(d["n_embd"], dtype=np.float32)
    output = dense(n_vocab, d["n_embd"])
    # Zero logits for <unk>, <s> and the 256 byte tokens: some word piece almost always scores
    # higher, so greedy text is made of pieces, never raw control bytes or broken UTF-8
    # (llama-cpp-python's JSON-schema grammar lets control characters into strings).
    output[[0, 1, *range(3, 3 + 256)]] = 0.0  # ids as in `_sentencepiece_vocab`; </s> (2) stays reachable
    tensors["output.weight"] = output
    return tensors


def build_tiny_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random llama-architecture GGUF with a SentencePiece vocabulary and a Llama-2 chat template; return `path`."""
    import gguf

    path = Path(path)
    d = TINY_LLM_DIMS
    tokens, scores, types = _sentencepiece_vocab()
    # GGUFWriter writes to a file: write it elsewhere, then compare and move the bytes into place.
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / path.name
        writer = gguf.GGUFWriter(tmp_file, "llama")
        writer.add_name("pathgen-tiny-llm")
        writer.add_description(f"Tiny random-weight llama model built offline by `pathgen models tiny` with seed {seed}. Not a trained model.")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(d["n_ctx"])
        writer.add_embedding_length(d["n_embd"])
        writer.add_feed_forward_length(d["n_ff"])
        writer.add_block_count(d["n_layer"])
        writer.add_head_count(d["n_head"])
        writer.add_head_count_kv(d["n_head_kv"])
        writer.add_rope_dimension_count(d["n_embd"] // d["n_head"])
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(LLAMA2_CHAT_TEMPLATE)
        for name, array in _tiny_llm_tensors(len(tokens), seed).items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _write_if_changed(tmp_file.read_bytes(), path)
    return path


def build_tiny_models(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build all tiny models under `models_dir`; return {"clip": checkpoint, "llava": directory, "llm": GGUF file}."""
    models_dir = Path(models_dir)
    return {
        "clip": build_tiny_clip(models_dir / "tiny-clip", seed=seed),
        "llava": build_tiny_llava(models_dir / "tiny-llava", seed=seed),
        "llm": build_tiny_gguf(models_dir / "tiny-llm" / "tiny-llm.gguf", seed=seed),
    }
