"""The agent steps' own logic: revise operations, the 77-token limit, cached batching, text hygiene,
and real generation with the tiny LLaVA (batch-invariant, so resumed jobs give identical bytes)."""

from __future__ import annotations

import io

import open_clip
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pathgen.steps.revise import apply_ops, parse_ops
from pathgen.steps.summarize import fit_to_limit, summarize_one
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_map
from pathgen.store.io import encode_jpeg
from pathgen.text.hygiene import clean_generated_text
from pathgen.text.tokens import clip_token_counter

DESCRIPTION = "The tissue shows glands. Nuclei are enlarged. Stroma is fibrotic."


def test_parse_ops_accepts_well_formed_lists_only():
    answer = 'Sure: [{"op": "edit", "sentence": "Nuclei are enlarged.", "new": "Nuclei are small."}] done'
    assert parse_ops(answer) == [{"op": "edit", "sentence": "Nuclei are enlarged.", "new": "Nuclei are small."}]
    assert parse_ops("[]") == []
    for bad in ["no json", "[{]", '{"op": "add"}', '[{"op": "move", "sentence": "x"}]',
                '[{"op": "add", "sentence": ""}]', '[{"op": "add", "sentence": "x", "extra": "y"}]',
                '[{"op": "edit", "sentence": "x"}]', '[1, 2]']:
        assert parse_ops(bad) is None, bad


def test_apply_ops_known_answers():
    ops = [{"op": "delete", "sentence": "Stroma is fibrotic."},
           {"op": "edit", "sentence": "Nuclei are enlarged.", "new": "Nuclei are small and round."},
           {"op": "add", "sentence": "Mitoses are rare."}]
    assert apply_ops(DESCRIPTION, ops) == (
        "The tissue shows glands. Nuclei are small and round. Mitoses are rare.", "applied")
    assert apply_ops(DESCRIPTION, []) == (DESCRIPTION, "unchanged")
    assert apply_ops(DESCRIPTION, None) == (DESCRIPTION, "invalid")
    # an operation on a sentence the description lacks invalidates the whole answer
    assert apply_ops(DESCRIPTION, ops[:1] + [{"op": "delete", "sentence": "Not there."}]) == (DESCRIPTION, "invalid")


COUNT = clip_token_counter("ViT-L-14-336")
TOKENIZER = open_clip.get_tokenizer("ViT-L-14-336")
adversarial = st.one_of(
    st.text(min_size=0, max_size=3000),
    st.lists(st.sampled_from(["nuclei", "pleomorphic", "H&E", "3.5", "e.g.", "...", "—", "ünïcödé", "🙂", "x" * 400,
                              ".", "!", "\n", "  "]), max_size=400).map(" ".join),
)


@settings(max_examples=150, deadline=None)
@given(adversarial)
def test_fit_to_limit_always_holds_and_only_cuts(text):
    fitted, cut = fit_to_limit(text, COUNT, 77)
    normal = " ".join(text.split())
    assert COUNT(fitted) <= 77
    assert normal.startswith(fitted)
    assert cut == (fitted != normal)
    ids = TOKENIZER([fitted])[0]
    assert ids[COUNT(fitted) - 1] == TOKENIZER.eot_token_id  # nothing truncated by the trainer


def test_fit_to_limit_prefers_sentence_then_word_boundaries():
    sentence = "Glands are crowded and irregular with enlarged nuclei. "
    fitted, cut = fit_to_limit(sentence * 20, COUNT, 77)
    assert cut and fitted.endswith("nuclei.") and COUNT(fitted) <= 77
    words = " ".join(["pleomorphic"] * 200)
    fitted, cut = fit_to_limit(words, COUNT, 77)
    assert cut and set(fitted.split()) == {"pleomorphic"} and COUNT(fitted + " pleomorphic") > 77


SETTINGS = {"context_length": 77, "prompt": "Summarize in {max_words} words: {description}",
            "stricter_prompt": "Shorter, {max_words} words: {summary}", "max_words": 50, "max_retries": 2}


@settings(max_examples=60, deadline=None)
@given(adversarial, adversarial)
def test_summaries_fit_whatever_the_model_answers(description, answer):
    asked = []

    def ask(prompt):
        asked.append(prompt)
        return answer

    summary, tokens, cut, attempts = summarize_one(description, ask, SETTINGS, COUNT)
    assert tokens == COUNT(summary) <= 77
    assert attempts == len(asked) <= 1 + SETTINGS["max_retries"]


def test_summarize_retries_with_the_stricter_prompt_then_cuts():
    long = "The glands are crowded. " * 40
    asked = []
    summary, tokens, cut, attempts = summarize_one("desc", lambda p: asked.append(p) or long, SETTINGS, COUNT)
    assert attempts == 3 and cut and tokens <= 77 and summary.endswith("crowded.")
    assert asked[0] == "Summarize in 50 words: desc" and asked[1].startswith("Shorter, 25 words: The glands")
    assert summarize_one("desc", lambda p: "Short and fine.", SETTINGS, COUNT) == ("Short and fine.", 6, False, 1)
    # an empty answer falls back to the description itself, cut to fit
    summary, _, cut, _ = summarize_one(long, lambda p: "", SETTINGS, COUNT)
    assert summary.startswith("The glands are crowded.") and cut


def test_clean_generated_text_drops_control_and_replacement_characters():
    assert clean_generated_text('"\ufffd morp\x16 intac\ufffd=\n\n next\u200b word ') == '" morp intac= next word'


def test_cached_map_computes_only_misses(tmp_path):
    calls = []

    def compute(batch):
        calls.append(list(batch))
        return [{"n": i * 10} for i in batch]

    payloads = [f"item {i}".encode() for i in range(10)]
    with ItemCache(tmp_path, "test", "f" * 64, flush_every=3) as cache:
        assert cached_map(cache, payloads[:4], compute, batch_size=3) == [{"n": i * 10} for i in range(4)]
    assert calls == [[0, 1, 2], [3]]
    calls.clear()
    with ItemCache(tmp_path, "test", "f" * 64, flush_every=3) as cache:
        results = cached_map(cache, payloads, compute, batch_size=3)
    assert calls == [[4, 5, 6], [7, 8, 9]]  # indices of the misses only
    assert results[:4] == [{"n": i * 10} for i in range(4)] and cache.stats.hits == 4


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from pathgen.demo.tiny_models import build_tiny_llava
    from pathgen.models.lmm import LlavaAgent

    path = build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")
    return LlavaAgent(path, {"max_new_tokens": 12, "do_sample": False, "device": "cpu", "batch_size": 4}, "describe")


def test_llava_generation_is_batch_invariant(llava):
    images = [encode_jpeg(Image.new("RGB", (672, 672), colour), 90) for colour in
              [(200, 90, 160), (90, 40, 140), (240, 200, 220), (150, 60, 120)]]
    prompts = ["This is a histology image from the lung. Describe this image in detail.",
               "This is a histology image from the breast. Describe this image in detail.",
               "Describe.", "This is a histology image from the colon. Describe this image in detail. Please."]
    together = llava.generate(images, prompts)
    alone = [llava.generate([i], [p])[0] for i, p in zip(images, prompts)]
    assert together == alone
    assert len(together) == 4 and all(isinstance(t, str) for t in together)
    assert llava.generate(images[1:3], prompts[1:3]) == together[1:3]
    Image.open(io.BytesIO(images[0]))  # the inputs are real JPEGs
