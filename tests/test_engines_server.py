"""The openai engine against real servers started here (CPU, offline) and a small fake one.

Real: `transformers serve` with the tiny LLaVA and llama.cpp's server with the tiny GGUF, each
compared with its in-process engine under greedy decoding (the answers are equal, token counts
too; llama.cpp's server needs `extra_body: {repeat_penalty: 1.0}` for that, because its default
repeat penalty is 1.1 where the in-process API's is 1.0, and greedy decoding applies it).
Launching: a server the engine starts itself is gone, its port free, after close(), after
SIGTERM to the job (chained with the item cache's flushing handler, in either order of
installation) and after SIGKILL to the job. Failures are one line naming agent, engine and URL.
The fake server (a stdlib HTTP server) checks the request bodies, the requests in flight,
completion order and retries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from servers import OFFLINE, alive, llama_server, start, stop, transformers_serve, wait_gone  # noqa: F401 (fixtures)
from pathgen.errors import ModelError
from pathgen.models.engine import Agent, Request
from pathgen.models.openai_engine import OpenAIEngine
from pathgen.models.server import format_command, free_port, launch_server, port_is_free
from pathgen.store.io import encode_jpeg

BIN = Path(sys.executable).parent
LLAMA_SERVER = "{python} -m llama_cpp.server --model {checkpoint} --host {host} --port {port} --n_ctx 2048"
# Bounded strings and item counts: a random model's constrained answer always closes within max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tissue", "findings"],
          "properties": {"tissue": {"type": "string", "maxLength": 20},
                         "findings": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 16}}}}
PROMPTS = ["This is a histology image from the lung. Describe this image in detail.", "Describe.",
           "This is a histology image from the colon. Describe this image in detail. Please.", "What is it?"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pathgen.demo.tiny_models import build_tiny_gguf, build_tiny_llava

    root = tmp_path_factory.mktemp("models")
    return {"llava": build_tiny_llava(root / "tiny-llava"), "gguf": build_tiny_gguf(root / "tiny-llm.gguf")}


@pytest.fixture(scope="module")
def images():
    return [encode_jpeg(Image.new("RGB", (672, 672), colour), 90)
            for colour in [(200, 90, 160), (90, 40, 140), (240, 200, 220), (150, 60, 120)]]


def llama_settings(gguf: Path, **openai) -> dict:
    return {"engine": "openai", "checkpoint": str(gguf), "temperature": 0.0, "seed": 0,
            "openai": {"response_format": "json_object", "extra_body": {"repeat_penalty": 1.0},
                       "max_retries": 1, "timeout_s": 60, "startup_timeout_s": 120, **openai}}


# --- transformers serve ---------------------------------------------------------------


def test_transformers_serve_answers_images_as_the_in_process_engine_does(models, images, transformers_serve):
    from pathgen.models.transformers_engine import TransformersEngine

    url, name = transformers_serve
    requests = ([Request(p, 24, image=i) for p, i in zip(PROMPTS, images)]
                + [Request(p, 24) for p in PROMPTS[:2]] + [Request(PROMPTS[1], 24, schema=SCHEMA)])
    local = TransformersEngine({"engine": "transformers", "checkpoint": str(models["llava"]), "device": "cpu",
                                "do_sample": False, "batch_size": 4}, "describe")
    expected = local.generate(requests[:-1])
    settings = {"engine": "openai", "checkpoint": str(models["llava"]), "do_sample": False,
                "openai": {"url": url, "model": name, "response_format": "none", "concurrency": 4}}
    with Agent("describe", settings) as agent:
        answers = agent.generate(requests)
        assert agent.can_constrain is False
    # Greedy on both sides, the same chat template, image processor and fp32 weights: the same tokens.
    assert [a.text for a in answers[:-1]] == [a.text for a in expected]
    assert [(a.finish, a.prompt_tokens, a.completion_tokens) for a in answers[:-1]] == \
        [(a.finish, a.prompt_tokens, a.completion_tokens) for a in expected]
    assert all(a.text and not a.constrained for a in answers)  # it cannot constrain: the schema is not sent
    assert answers[0].prompt_tokens > answers[4].prompt_tokens  # the image's tokens count


def test_transformers_serve_names_the_model_it_is_pinned_to(models, transformers_serve):
    url, _ = transformers_serve
    settings = {"engine": "openai", "checkpoint": str(models["llava"]),
                "openai": {"url": url, "model": "some-other-name", "response_format": "none", "max_retries": 0}}
    engine = OpenAIEngine(settings, "describe")
    with pytest.raises(ModelError) as err:
        engine.generate([Request("Describe.", 4)])
    engine.close()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"describe: openai engine at {url} failed: HTTP 400")
    assert "pinned" in message


# --- llama.cpp's server -------------------------------------------------------------------


def test_llama_cpp_server_constrains_and_answers_as_the_in_process_engine_does(models, llama_server):
    from pathgen.models.llama_cpp_engine import LlamaCppEngine

    requests = [Request(p, 48) for p in PROMPTS] + [Request(p, 96, schema=SCHEMA) for p in PROMPTS]
    local = LlamaCppEngine({"engine": "llama_cpp", "checkpoint": str(models["gguf"]), "n_ctx": 2048, "seed": 0,
                            "temperature": 0.0}, "summarize")
    expected = local.generate(requests)
    engine = OpenAIEngine(llama_settings(models["gguf"], url=llama_server, concurrency=4), "summarize")
    assert engine.can_constrain and engine.model == str(models["gguf"])  # asked GET /v1/models
    answers = engine.generate(requests)
    engine.close()
    for answer in answers[4:]:
        assert answer.constrained and answer.finish == "stop"
        jsonschema.validate(json.loads(answer.text), SCHEMA)
    assert not any(a.constrained for a in answers[:4])
    assert [a.record() for a in answers] == [a.record() for a in expected]


# --- launching --------------------------------------------------------------------------------


def test_launched_server_answers_and_is_gone_after_close(models, tmp_path):
    engine = OpenAIEngine(llama_settings(models["gguf"], launch=LLAMA_SERVER), "summarize", log_dir=tmp_path)
    server = engine.server
    assert engine.url == f"http://127.0.0.1:{server.port}/v1" and engine.model == str(models["gguf"])
    answers = engine.generate([Request("Describe lung tissue.", 16), Request("What is it?", 64, schema=SCHEMA)])
    jsonschema.validate(json.loads(answers[1].text), SCHEMA)
    assert answers[0].completion_tokens == 16 and answers[0].finish == "length"
    assert (tmp_path / "summarize-server.log").is_file()
    engine.close()
    assert wait_gone(server.pid, 1) and port_is_free(server.port)
    engine.close()  # again: nothing to do
    with pytest.raises(ModelError, match="closed"):
        engine.generate([Request("x", 1)])


def test_killing_the_launched_server_mid_stream_is_one_line_naming_it(models, tmp_path):
    engine = OpenAIEngine(llama_settings(models["gguf"], launch=LLAMA_SERVER, concurrency=2, max_retries=1),
                          "summarize", log_dir=tmp_path)
    requests = [Request(f"{p} {i}", 64) for i in range(10) for p in PROMPTS]
    seen = []
    with pytest.raises(ModelError) as err:
        for index, _ in engine.stream(requests):
            seen.append(index)
            if len(seen) == 1:
                os.killpg(engine.server.pid, signal.SIGKILL)
    assert 1 <= len(seen) < len(requests)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"summarize: openai engine at {engine.url} failed: "), message
    assert f"the server it launched exited with code -9 (log: {tmp_path / 'summarize-server.log'})" in message
    engine.close()


def test_killing_a_server_it_did_not_launch_is_one_line_naming_the_url(models, tmp_path):
    port = free_port()
    proc = start([sys.executable, "-m", "llama_cpp.server", "--model", str(models["gguf"]), "--port", str(port)],
                 tmp_path / "server.log", port)
    url = f"http://127.0.0.1:{port}/v1"
    engine = OpenAIEngine(llama_settings(models["gguf"], url=url, concurrency=2, max_retries=1), "summarize")
    stream = engine.stream([Request(f"Describe {i}.", 64) for i in range(20)])
    next(stream)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(ModelError) as err:
        list(stream)
    engine.close()
    assert str(err.value) == f"summarize: openai engine at {url} failed: Connection refused"


def test_nothing_listening_fails_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelError) as err:
        OpenAIEngine({"engine": "openai", "checkpoint": "m", "openai": {"url": url, "max_retries": 0}}, "revise")
    assert str(err.value) == f"revise: openai engine at {url} failed: Connection refused"


def test_settings_errors_name_the_key():
    base = {"engine": "openai", "checkpoint": "m"}
    with pytest.raises(ModelError, match=r"revise\.openai needs exactly one of url .* and launch"):
        OpenAIEngine({**base, "openai": {}}, "revise")
    with pytest.raises(ModelError, match=r"revise\.openai has unknown key\(s\) ulr"):
        OpenAIEngine({**base, "openai": {"ulr": "http://x"}}, "revise")
    with pytest.raises(ModelError, match=r"revise\.openai\.response_format is 'grammar'"):
        OpenAIEngine({**base, "openai": {"url": "http://x", "response_format": "grammar"}}, "revise")


def test_launch_templates_quote_values_and_name_unknown_placeholders():
    argv = format_command("{python} -m srv --model {checkpoint} --port {port} --name {model} --host {host}",
                          "models/my model dir", 8123, "pathgen-llava")
    assert argv == [sys.executable, "-m", "srv", "--model", "models/my model dir", "--port", "8123",
                    "--name", "pathgen-llava", "--host", "127.0.0.1"]
    assert format_command("srv --json '{{\"a\": 1}}'", "m", 1, "x") == ["srv", "--json", '{"a": 1}']
    with pytest.raises(ModelError, match=r"unknown placeholder \{gpu\}"):
        format_command("srv --gpu {gpu}", "m", 1, "x")


def test_a_server_that_exits_while_starting_fails_at_once_with_its_log(tmp_path):
    template = "{python} -c \"import sys; print('cannot load the weights'); sys.exit(3)\""
    start_time = time.monotonic()
    with pytest.raises(ModelError) as err:
        launch_server(template, "m", "m", "describe", log_dir=tmp_path, startup_timeout_s=60)
    assert time.monotonic() - start_time < 20
    message = str(err.value)
    assert "\n" not in message and message.startswith("describe: the server launched by ")
    assert f"exited with code 3 before it was ready (log: {tmp_path / 'describe-server.log'}): " \
           "cannot load the weights" in message


# --- a fake OpenAI-compatible server: bodies, requests in flight, order, retries ---------------

FAKE_SERVER = textwrap.dedent('''
    """A fake OpenAI-compatible server: echoes the prompt; directives in the prompt (sleep=S, fail=CODExN)."""
    import json, re, signal, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, marker = int(sys.argv[1]), sys.argv[2]
    lock = threading.Lock()
    state = {"in_flight": 0, "max_in_flight": 0, "bodies": [], "attempts": {}}

    def on_term(signum, frame):
        open(marker, "w").write("SIGTERM")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                                            "owned_by": "me"}]})
            elif self.path == "/stats":
                with lock:
                    self.reply(200, state)
            else:
                self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][-1]["content"]
            prompt = content if isinstance(content, str) else content[-1]["text"]
            with lock:
                state["bodies"].append(body)
                state["attempts"][prompt] = attempt = state["attempts"].get(prompt, 0) + 1
                state["in_flight"] += 1
                state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            try:
                fail = re.search(r"fail=(\\d+)x(\\d+)", prompt)
                if fail and attempt <= int(fail.group(2)):
                    return self.reply(int(fail.group(1)), {"message": f"failing on purpose, attempt {attempt}"})
                sleep = re.search(r"sleep=([0-9.]+)", prompt)
                time.sleep(float(sleep.group(1)) if sleep else 0)
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "length" if "cut" in prompt else "stop",
                                              "message": {"role": "assistant", "content": f"echo  {prompt}\\x07"}}],
                                 "usage": {"prompt_tokens": len(prompt), "completion_tokens": 3,
                                           "total_tokens": len(prompt) + 3}})
            finally:
                with lock:
                    state["in_flight"] -= 1

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


@pytest.fixture(scope="module")
def fake_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fake") / "fake_server.py"
    path.write_text(FAKE_SERVER)
    return path


def fake_template(script: Path, marker: Path) -> str:
    return f"{{python}} {script} {{port}} {marker}"


@pytest.fixture(scope="module")
def fake(fake_script, tmp_path_factory):
    """A running fake server: its URL and a function returning its stats."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("fake-run")
    proc = start([sys.executable, str(fake_script), str(port), str(tmp / "marker")], tmp / "log", port)

    def stats() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as r:
            return json.load(r)

    yield f"http://127.0.0.1:{port}/v1", stats
    stop(proc)


def test_requests_carry_greedy_seed_image_first_and_the_sorted_schema(fake):
    url, stats = fake
    settings = {"engine": "openai", "checkpoint": "m", "do_sample": False, "seed": 7,
                "openai": {"url": url, "response_format": "json_schema", "extra_body": {"top_k": 1}}}
    engine = OpenAIEngine(settings, "revise")
    assert engine.model == "fake-model" and engine.can_constrain
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "string"}}}
    answers = engine.generate([Request("body-image", 8, image=b"\xff\xd8jpeg"), Request("body-schema cut", 5,
                                                                                        schema=schema)])
    engine.close()
    assert [a.text for a in answers] == ["echo body-image", "echo body-schema cut"]  # hygiene applied
    assert [(a.finish, a.constrained, a.completion_tokens) for a in answers] == [("stop", False, 3),
                                                                                 ("length", True, 3)]
    bodies = {b["messages"][0]["content"] if isinstance(b["messages"][0]["content"], str)
              else b["messages"][0]["content"][-1]["text"]: b for b in stats()["bodies"]}
    image, constrained = bodies["body-image"], bodies["body-schema cut"]
    assert image["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9hqcGVn"}},
        {"type": "text", "text": "body-image"}]
    assert (image["temperature"], image["seed"], image["max_tokens"], image["top_k"]) == (0.0, 7, 8, 1)
    assert "response_format" not in image
    assert constrained["messages"][0]["content"] == "body-schema cut"
    assert constrained["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "strict": True, "schema": {"properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                                                     "type": "object"}}}
    assert list(constrained["response_format"]["json_schema"]["schema"]["properties"]) == ["a", "b"]


def test_json_object_and_none_formats(fake):
    url, stats = fake
    for fmt, expected in [("json_object", {"type": "json_object", "schema": SCHEMA}), ("none", None)]:
        engine = OpenAIEngine({"engine": "openai", "checkpoint": "m", "temperature": 0.7,
                               "openai": {"url": url, "model": "fake-model", "response_format": fmt}}, "revise")
        answer = engine.generate([Request(f"fmt-{fmt}", 4, schema=SCHEMA)])[0]
        engine.close()
        body = next(b for b in stats()["bodies"] if b["messages"][0]["content"] == f"fmt-{fmt}")
        assert body.get("response_format") == expected and body["temperature"] == 0.7 and "seed" not in body
        assert answer.constrained is (fmt != "none") and engine.can_constrain is (fmt != "none")


def test_concurrency_requests_in_flight_and_answers_in_completion_order(fake):
    url, stats = fake
    engine = OpenAIEngine({"engine": "openai", "checkpoint": "m", "openai": {"url": url, "concurrency": 4}}, "revise")
    before = stats()["max_in_flight"]
    # Slow first, fast last: with 4 in flight the short ones overtake.
    sleeps = [0.8, 0.6, 0.4, 0.2, 0.05, 0.05, 0.05, 0.05, 0.3, 0.05, 0.05, 0.05]
    requests = [Request(f"order-{i} sleep={s}", 4) for i, s in enumerate(sleeps)]
    start_time = time.monotonic()
    order = [index for index, _ in engine.stream(requests)]
    elapsed = time.monotonic() - start_time
    assert sorted(order) == list(range(len(requests))) and order != sorted(order)
    assert order[0] == 3 and order.index(0) > order.index(4)
    assert stats()["max_in_flight"] == 4 >= before
    assert elapsed < sum(sleeps) * 0.6
    answers = engine.generate(requests[:6])
    assert [a.text for a in answers] == [f"echo {r.prompt}" for r in requests[:6]]  # generate: request order
    engine.close()


def test_transient_errors_are_retried_then_reported_in_one_line(fake):
    url, stats = fake
    settings = {"engine": "openai", "checkpoint": "m", "openai": {"url": url, "model": "fake-model", "max_retries": 2}}
    engine = OpenAIEngine(settings, "revise")
    assert engine.generate([Request("retry fail=503x2", 4)])[0].text == "echo retry fail=503x2"
    assert stats()["attempts"]["retry fail=503x2"] == 3
    with pytest.raises(ModelError) as err:
        engine.generate([Request("retry fail=429x5", 4)])
    assert str(err.value) == (f"revise: openai engine at {url} failed: HTTP 429: failing on purpose, attempt 3")
    with pytest.raises(ModelError) as err:  # not transient: no retry
        engine.generate([Request("retry fail=400x1", 4)])
    assert str(err.value) == f"revise: openai engine at {url} failed: HTTP 400: failing on purpose, attempt 1"
    assert stats()["attempts"]["retry fail=400x1"] == 1
    engine.close()
    timeout = OpenAIEngine({**settings, "openai": {**settings["openai"], "timeout_s": 0.3, "max_retries": 0}},
                           "revise")
    with pytest.raises(ModelError) as err:
        timeout.generate([Request("slow sleep=2", 4)])
    timeout.close()
    assert str(err.value) == f"revise: openai engine at {url} failed: no answer within 0.3 s"


# --- the job's signals -----------------------------------------------------------------------

JOB = textwrap.dedent('''
    import json, sys, time
    from pathgen.models.openai_engine import OpenAIEngine
    from pathgen.store.cache import ItemCache

    order, template, checkpoint, cache_root, log_dir = sys.argv[1:6]
    settings = {"engine": "openai", "checkpoint": checkpoint, "openai": {"launch": template, "model": "m",
                "startup_timeout_s": 120, "response_format": "none"}}
    if order == "cache-first":
        cache = ItemCache(cache_root, "describe", "f" * 64)
    engine = OpenAIEngine(settings, "describe", log_dir=log_dir)
    if order == "server-first":
        cache = ItemCache(cache_root, "describe", "f" * 64)
    cache.put("item", {"text": "kept"})  # buffered: only the SIGTERM handler writes it
    print(json.dumps({"pid": engine.server.pid, "port": engine.server.port}), flush=True)
    time.sleep(120)
''')


def run_job(order: str, template: str, checkpoint: Path, tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = subprocess.Popen([sys.executable, str(script), order, template, str(checkpoint), str(tmp_path / "cache"),
                             str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **OFFLINE))
    line = proc.stdout.readline()
    assert line, finish(proc)[1]
    return proc, json.loads(line)


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    """The job's exit status and stderr, once it has exited."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.parametrize("order", ["cache-first", "server-first"])
def test_sigterm_to_the_job_stops_its_server_and_flushes_its_cache(order, fake_script, tmp_path):
    from pathgen.store.cache import ItemCache

    marker = tmp_path / "marker"
    proc, server = run_job(order, fake_template(fake_script, marker), Path("m"), tmp_path)
    assert alive(server["pid"])
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == -signal.SIGTERM, err  # dies by the signal, as the scheduler expects
    assert wait_gone(server["pid"]) and port_is_free(server["port"])
    assert marker.read_text() == "SIGTERM"  # stopped by the handler, gracefully
    assert ItemCache(tmp_path / "cache", "describe", "f" * 64).get("item") == {"text": "kept"}


def test_sigterm_to_a_job_with_a_real_server_leaves_no_server(models, tmp_path):
    proc, server = run_job("cache-first", LLAMA_SERVER, models["gguf"], tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == -signal.SIGTERM, err
    assert wait_gone(server["pid"]) and port_is_free(server["port"])


def test_sigkill_to_the_job_takes_its_server_too(fake_script, tmp_path):
    marker = tmp_path / "marker"
    proc, server = run_job("cache-first", fake_template(fake_script, marker), Path("m"), tmp_path)
    proc.kill()
    finish(proc)
    assert wait_gone(server["pid"]) and not marker.exists()  # PR_SET_PDEATHSIG: the kernel killed it
