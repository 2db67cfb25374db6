"""The agent steps' own logic: revise operations and their schema, the 77-token limit, cached answers,
text hygiene, and real generation with the tiny LLaVA (batch-invariant, so resumed jobs give identical
bytes; schema-constrained through xgrammar)."""

from __future__ import annotations

import io

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import jsonschema

from pathgen.errors import ModelError
from pathgen.models.engine import Agent, Answer, Request
from pathgen.steps.revise import apply_ops, ops_schema, parse_ops
from pathgen.steps.summarize import fit_to_limit, summarize_one
from pathgen.store.cache import ItemCache
from pathgen.store.cached import cached_answers
from pathgen.store.io import encode_jpeg
from pathgen.text.hygiene import clean_generated_text
from pathgen.text.tokens import clip_token_counter

DESCRIPTION = "The tissue shows glands. Nuclei are enlarged. Stroma is fibrotic."


def test_parse_ops_accepts_well_formed_lists_only():
    answer = 'Sure: [{"op": "edit", "sentence": "Nuclei are enlarged.", "new": "Nuclei are small."}] done'
    assert parse_ops(answer) == [{"op": "edit", "sentence": "Nuclei are enlarged.", "new": "Nuclei are small."}]
    assert parse_ops("[]") == []
    assert parse_ops('[{"op": "add", "sentence": "  a \\n b "}]') == [{"op": "add", "sentence": "a b"}]
    for bad in ["no json", "[{]", '{"op": "add"}', '[{"op": "move", "sentence": "x"}]', '[{"op": "add", "sentence": 1}]',
                '[{"op": "add", "sentence": "x", "extra": "y"}]',
                '[{"op": "edit", "sentence": "x"}]', '[1, 2]']:
        assert parse_ops(bad) is None, bad


def test_apply_ops_known_answers():
    ops = [{"op": "delete", "sentence": "Stroma is fibrotic."},
           {"op": "edit", "sentence": "Nuclei are enlarged.", "new": "Nuclei are small and round."},
           {"op": "add", "sentence": "Mitoses are rare."}]
    assert apply_ops(DESCRIPTION, ops) == (
        "The tissue shows glands. Nuclei are small and round. Mitoses are rare.", "applied", ops)
    assert apply_ops(DESCRIPTION, []) == (DESCRIPTION, "unchanged", [])
    assert apply_ops(DESCRIPTION, None) == (DESCRIPTION, "invalid", [])
    # an operation on a sentence the description lacks invalidates the whole answer
    assert apply_ops(DESCRIPTION, ops[:1] + [{"op": "delete", "sentence": "Not there."}]) == (DESCRIPTION, "invalid", [])
    # a second operation on a sentence already deleted or edited, a blank add or edit: no effect
    again = [ops[0], {"op": "edit", "sentence": "Stroma is fibrotic.", "new": "Stroma is loose."},
             {"op": "add", "sentence": ""}, {"op": "edit", "sentence": "Nuclei are enlarged.", "new": ""}]
    assert apply_ops(DESCRIPTION, again) == ("The tissue shows glands. Nuclei are enlarged.", "applied", ops[:1])
    assert apply_ops(DESCRIPTION, again[2:]) == (DESCRIPTION, "unchanged", [])


def answers_under(schema: dict) -> st.SearchStrategy:
    """Answers that the schema of `ops_schema` admits (its enum, const, bounds), drawn directly."""
    choices = schema["items"]["anyOf"]

    def op(choice):
        props = choice["properties"]
        fields = {}
        for name, spec in props.items():
            if "const" in spec:
                fields[name] = st.just(spec["const"])
            elif "enum" in spec:
                fields[name] = st.sampled_from(spec["enum"])
            else:
                fields[name] = st.text(min_size=spec["minLength"], max_size=spec["maxLength"])
        return st.fixed_dictionaries(fields)

    return st.lists(st.one_of([op(c) for c in choices]), max_size=schema["maxItems"])


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from([DESCRIPTION, "One sentence only.", "Twice. Twice. Then other.", ""]))
def test_every_answer_the_schema_admits_applies(data, description):
    schema = ops_schema(description, max_ops=4, max_sentence_chars=40)
    answer = data.draw(answers_under(schema))
    jsonschema.validate(answer, schema)  # the drawn answer is one the constrained decoder may produce
    import json as _json

    text, status, applied = apply_ops(description, parse_ops(_json.dumps(answer)))
    assert status in ("applied", "unchanged")
    assert (status == "applied") == (text != description or bool(applied))


def test_ops_schema_rejects_what_would_not_apply():
    schema = ops_schema(DESCRIPTION, max_ops=2, max_sentence_chars=20)
    ok = [{"op": "delete", "sentence": "Stroma is fibrotic."}, {"op": "add", "sentence": "Mitoses are rare."}]
    jsonschema.validate(ok, schema)
    for bad in ([{"op": "delete", "sentence": "Not in the description."}],
                [{"op": "add", "sentence": "x" * 21}],
                ok + [{"op": "add", "sentence": "a third"}],
                [{"op": "edit", "sentence": "Stroma is fibrotic."}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert [c["properties"]["op"]["const"] for c in ops_schema("", 2, 20)["items"]["anyOf"]] == ["add"]


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


class OutOfOrderAgent:
    """An engine stand-in that answers in reverse order (as a server keeping many requests in flight
    may) and records what it was asked: checks the cache's bookkeeping, not generation."""

    def __init__(self):
        self.asked: list[list[str]] = []

    def stream(self, requests):
        self.asked.append([r.prompt for r in requests])
        for index in reversed(range(len(requests))):
            yield index, Answer(requests[index].prompt.upper(), "stop", 1, 1)


def test_cached_answers_asks_only_for_misses_and_keeps_order(tmp_path):
    agent = OutOfOrderAgent()
    prompts = [f"item {i}" for i in range(10)]
    payloads = [p.encode() for p in prompts]
    with ItemCache(tmp_path, "test", "f" * 64, flush_every=3) as cache:
        first = cached_answers(cache, payloads[:4], lambda i: Request(prompts[i], 8), agent)
    assert [r["text"] for r in first] == [p.upper() for p in prompts[:4]]
    assert agent.asked == [prompts[:4]]
    with ItemCache(tmp_path, "test", "f" * 64, flush_every=3) as cache:
        results = cached_answers(cache, payloads, lambda i: Request(prompts[i], 8), agent)
    assert agent.asked[1] == prompts[4:]  # the misses only
    assert [r["text"] for r in results] == [p.upper() for p in prompts] and cache.stats.hits == 4
    assert Answer.from_record(results[0]) == Answer("ITEM 0", "stop", 1, 1)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from pathgen.demo.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="module")
def llava(llava_dir):
    settings = {"engine": "transformers", "checkpoint": str(llava_dir), "max_new_tokens": 12, "do_sample": False,
                "device": "cpu", "batch_size": 4}
    return Agent("describe", settings)


IMAGES = [encode_jpeg(Image.new("RGB", (672, 672), colour), 90) for colour in
          [(200, 90, 160), (90, 40, 140), (240, 200, 220), (150, 60, 120)]]


def test_llava_generation_is_batch_invariant(llava):
    prompts = ["This is a histology image from the lung. Describe this image in detail.",
               "This is a histology image from the breast. Describe this image in detail.",
               "Describe.", "This is a histology image from the colon. Describe this image in detail. Please."]
    requests = [Request(p, 12, image=i) for i, p in zip(IMAGES, prompts)]
    together = llava.generate(requests)
    alone = [llava.generate([r])[0] for r in requests]
    assert together == alone
    assert len(together) == 4 and all(isinstance(a.text, str) for a in together)
    assert llava.generate(requests[1:3]) == together[1:3]
    # finish reasons and counts are the engine's own: a cut answer used every token it was allowed
    assert all((a.finish == "length") == (a.completion_tokens == 12) for a in together)
    assert all(a.prompt_tokens > 144 for a in together)  # the tiny tower: (336 / 28)² = 144 image tokens + text
    Image.open(io.BytesIO(IMAGES[0]))  # the inputs are real JPEGs


def test_llava_answers_follow_each_requests_schema(llava):
    import json as _json

    descriptions = [DESCRIPTION, "Glands are crowded. Nuclei are hyperchromatic.", "One sentence.", DESCRIPTION]
    schemas = [ops_schema(d, max_ops=3, max_sentence_chars=40) for d in descriptions]
    requests = [Request("Revise: " + d, 400, image=i, schema=s) for d, i, s in zip(descriptions, IMAGES, schemas)]
    answers = llava.generate(requests)
    assert all(a.constrained for a in answers)
    for answer, schema, description in zip(answers, schemas, descriptions):
        assert answer.finish == "stop", answer  # the grammar ended it well inside the limit
        jsonschema.validate(_json.loads(answer.text), schema)
        assert apply_ops(description, parse_ops(answer.text))[1] in ("applied", "unchanged")
    unconstrained = llava.generate([Request("Revise: " + DESCRIPTION, 12, image=IMAGES[0])])[0]
    assert not unconstrained.constrained


def test_llava_runs_in_float64_on_the_cpu_unless_told(llava, llava_dir):
    from pathgen.models.transformers_engine import TransformersEngine, model_dtype

    llava.generate([Request("Describe.", 2, image=IMAGES[0])])  # loads the engine
    assert {p.dtype for p in llava._engine.model.parameters()} == {torch.float64}
    assert model_dtype("auto", torch.device("cpu")) == torch.float64
    assert model_dtype("auto", torch.device("cuda")) == torch.float16
    settings = {"engine": "transformers", "checkpoint": str(llava_dir), "max_new_tokens": 4, "do_sample": False,
                "device": "cpu", "batch_size": 2}
    f32 = TransformersEngine({**settings, "dtype": "float32"}, "describe")
    assert {p.dtype for p in f32.model.parameters()} == {torch.float32}
    with pytest.raises(ModelError, match="dtype 'fp8'"):
        TransformersEngine({**settings, "dtype": "fp8"}, "describe")
    # the dtype decides answers, so it is part of the agent's fingerprint; the device is not
    assert Agent("describe", {**settings, "dtype": "float32"}).fingerprint != Agent("describe", settings).fingerprint
    assert Agent("describe", {**settings, "device": "auto"}).fingerprint == Agent("describe", settings).fingerprint
