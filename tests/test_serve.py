"Serving's promises, checked with the official `openai` client against a real server: output = chapter 12's generate, requests batched, bad requests, the command (the engine itself: test_batching.py)."
import copy
import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import httpx
import openai
import pytest
import torch

from tinyllama.batching import chat_prompt_ids
from tinyllama.checkpoint import save_checkpoint
from tinyllama.generate import generate, generate_tokens
from tinyllama.model import Llama, ModelArgs
from tinyllama.recipe import TRAIN_PRESETS
from tinyllama.serve import create_app, main, running_server
from tinyllama.tokenizer import CharTokenizer

from conftest import CONVERSATION, PROMPTS  # shared with the other serving tests; conftest gives chat_model


@pytest.fixture(scope="module")
def server(chat_model):
    "The app on a free port of 127.0.0.1, batching up to 8 within 50 ms; stopped after the module."
    model, tokenizer = chat_model
    app = create_app(copy.deepcopy(model), tokenizer, "tinyllama", max_batch_size=8, batch_window=0.05)  # its thread owns its model
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, body) -> tuple[int, dict]:
    "POST raw bytes or a JSON value; (status, JSON answer), errors included."
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def reference_reply(model, tokenizer, messages, max_tokens: int) -> tuple[str, str]:
    "Chapter 12's greedy tokens after the conversation's ids, up to EOS: (text, finish_reason)."
    row = torch.cat(list(generate_tokens(model, [chat_prompt_ids(tokenizer, messages)], max_tokens,
                                         eos_id=tokenizer.eos_id))).tolist()
    if tokenizer.eos_id in row:
        return tokenizer.decode(row[:row.index(tokenizer.eos_id)]), "stop"
    return tokenizer.decode(row), "length"


def as_messages(turns):
    return [{"role": role, "content": text} for role, text in turns]


# ---------------------------------------------------------------- the API, with the openai client

def test_models_lists_the_model_served(client):
    assert [m.id for m in client.models.list().data] == ["tinyllama"]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completions_equal_generate(client, chat_model, stream):
    model, tokenizer = chat_model
    for prompt in PROMPTS:
        expected = generate(model, tokenizer, prompt, max_new_tokens=40, temperature=0)
        reply = client.completions.create(model="tinyllama", prompt=prompt, max_tokens=40, temperature=0, stream=stream,
                                          **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish, usage = [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage
            assert len(chunks) > 10
        else:
            text, finish, usage = reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
        assert text == expected.text and len(expected.ids) > 10
        assert finish == {"eos": "stop"}.get(expected.stop_reason, "length")
        assert usage.prompt_tokens == len(expected.prompt_ids) and usage.completion_tokens == len(expected.ids) + (finish == "stop")


def test_sampled_completion_with_a_seed_equals_generate(client, chat_model):
    model, tokenizer = chat_model
    for seed in (0, 1):
        reply = client.completions.create(model="tinyllama", prompt=PROMPTS[2], max_tokens=40, temperature=0.9,
                                          top_p=0.8, seed=seed)
        assert reply.choices[0].text == generate(model, tokenizer, PROMPTS[2], 40, temperature=0.9, top_p=0.8, seed=seed).text
    texts = {client.completions.create(model="tinyllama", prompt=PROMPTS[2], max_tokens=40, temperature=1.0,
                                       seed=seed).choices[0].text for seed in range(3)}
    assert len(texts) == 3


@pytest.mark.parametrize("turns", [1, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_reply_is_generate_after_chapter_12s_format(client, chat_model, turns, stream):
    model, tokenizer = chat_model
    expected, finish = reference_reply(model, tokenizer, CONVERSATION[:turns], 50)
    reply = client.chat.completions.create(model="tinyllama", messages=as_messages(CONVERSATION[:turns]), max_tokens=50,
                                           temperature=0, stream=stream)
    if stream:
        chunks = list(reply)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == finish
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    else:
        assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == finish
        assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert len(expected) > 20


def test_max_completion_tokens_is_max_tokens(client):
    reply = client.chat.completions.create(model="tinyllama", messages=as_messages(CONVERSATION[:1]),
                                           max_completion_tokens=7, temperature=0)
    assert reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client, chat_model, stream):
    model, tokenizer = chat_model
    full = generate(model, tokenizer, PROMPTS[0], max_new_tokens=60, temperature=0).text
    stop = full[20:23]
    reply = client.completions.create(model="tinyllama", prompt=PROMPTS[0], max_tokens=60, temperature=0, stop=[stop, "zzzz"],
                                      stream=stream)
    chunks = list(reply) if stream else [reply]
    assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_requests_that_arrive_together_are_decoded_together(chat_model):
    model, tokenizer = chat_model
    app = create_app(copy.deepcopy(model), tokenizer, max_batch_size=8, batch_window=0.3)  # a wide window: a busy CI machine
    prompts = [f"{name}:\n" for name in ("KING", "QUEEN", "ROMEO", "JULIET", "NURSE", "FRIAR")]
    results = [None] * len(prompts)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        def ask(i):
            results[i] = client.completions.create(model="tinyllama", prompt=prompts[i], max_tokens=30, temperature=0)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = app.state.serving.batcher.stats["batch_sizes"]
    assert max(sizes) > 1 and sum(size * n for size, n in sizes.items()) == len(prompts), sizes  # sent at once, batched
    for prompt, reply in zip(prompts, results):
        assert reply.choices[0].text == generate(model, tokenizer, prompt, max_new_tokens=30, temperature=0).text


# ---------------------------------------------------------------- bad requests

GOOD = {"model": "tinyllama", "prompt": "ROMEO:", "max_tokens": 5}
BAD_REQUESTS = {  # name: (path, body, status, words the message must contain)
    "malformed JSON": ("/v1/completions", b'{"model": "tinyllama", "prompt": ', 400, "not valid JSON"),
    "a JSON list": ("/v1/completions", [1, 2], 400, "JSON object"),
    "missing prompt": ("/v1/completions", {"model": "tinyllama"}, 400, "prompt: Field required"),
    "missing model": ("/v1/completions", {"prompt": "O"}, 400, "model: Field required"),
    "missing messages": ("/v1/chat/completions", {"model": "tinyllama"}, 400, "messages: Field required"),
    "prompt longer than the context": ("/v1/completions", {**GOOD, "prompt": "Now is the winter of our discontent " * 60},
                                       400, "context is 256 tokens"),
    "negative max_tokens": ("/v1/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    "zero max_tokens": ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    "huge max_tokens": ("/v1/completions", {**GOOD, "max_tokens": 10**9}, 400, "max_tokens=1000000000 does not fit"),
    "unknown model": ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    "top_p above 1": ("/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    "top_p of 0": ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    "negative temperature": ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    "five stop strings": ("/v1/completions", {**GOOD, "stop": list("abcde")}, 400, "stop"),
    "two choices": ("/v1/completions", {**GOOD, "n": 2}, 400, "n:"),
    "unsupported field": ("/v1/completions", {**GOOD, "logprobs": 5}, 400, "logprobs"),
    "a system message": ("/v1/chat/completions", {"model": "tinyllama", "messages": [{"role": "system", "content": "Hi"}]},
                         400, "system"),
    "a chat that ends with the assistant": ("/v1/chat/completions", {"model": "tinyllama", "messages": as_messages(CONVERSATION[:2])},
                                            400, "end with user"),
    "a chat too long for the context": ("/v1/chat/completions", {"model": "tinyllama", "messages": as_messages(
        [("user", "Now is the winter of our discontent " * 60)])}, 400, "context"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, name):
    path, body, status, words = BAD_REQUESTS[name]
    got, answer = post(server[0] + path, body)
    assert got == status, (got, answer)
    assert set(answer["error"]) == {"message", "type", "param", "code"} and words in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert post(server[0] + "/v1/completions", GOOD)[0] == 200


def test_unknown_routes_get_json_errors(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server[0] + "/v1/embeddings", timeout=30)
    assert e.value.code == 404 and "error" in json.load(e.value)


def test_the_openai_client_raises_the_matching_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="O", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tinyllama", prompt="O", max_tokens=3, top_p=1.5)
    assert client.completions.create(model="tinyllama", prompt="O", max_tokens=3).usage.completion_tokens == 3


def wait_for_cancellation(app, before: int) -> int:
    stats = app.state.serving.batcher.stats
    deadline = time.monotonic() + 20
    while stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    return stats["cancelled"]


def test_a_client_that_leaves_mid_stream_cancels_its_job(server):
    url, app = server
    stats = app.state.serving.batcher.stats
    cancelled, tokens = stats["cancelled"], stats["tokens"]
    with httpx.Client(timeout=30) as raw:
        with raw.stream("POST", f"{url}/v1/completions", json={**GOOD, "max_tokens": 240, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert next(r.iter_lines()).startswith("data: {")
    assert wait_for_cancellation(app, cancelled) == cancelled + 1
    assert stats["tokens"] - tokens < 240  # it left the batch early
    assert post(url + "/v1/completions", GOOD)[0] == 200


def test_a_client_that_leaves_before_a_plain_reply_cancels_its_job(server):
    url, app = server
    cancelled = app.state.serving.batcher.stats["cancelled"]
    body = json.dumps({**GOOD, "max_tokens": 240}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.05)  # long enough for the job to start
    assert wait_for_cancellation(app, cancelled) == cancelled + 1
    assert post(url + "/v1/completions", GOOD)[0] == 200


def test_chat_on_a_model_without_chat_markers_is_a_clear_400():
    tokenizer = CharTokenizer("abc ROMEO:\n")
    model = Llama(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.vocab_size, multiple_of=16,
                            max_seq_len=32)).eval()
    with running_server(create_app(model, tokenizer)) as url:
        status, answer = post(url + "/v1/chat/completions", {"model": "tinyllama", "messages": as_messages(CONVERSATION[:1])})
        assert status == 400 and "no chat markers" in answer["error"]["message"]
        status, answer = post(url + "/v1/completions", {"model": "tinyllama", "prompt": "xyz"})  # x, y, z never seen
        assert status == 400 and answer["error"]["param"] == "prompt"
        assert post(url + "/v1/completions", {"model": "tinyllama", "prompt": "ROMEO:", "max_tokens": 4})[0] == 200


def test_running_server_stops_what_it_started(chat_model):
    with running_server(create_app(*chat_model)) as url:
        assert post(url + "/v1/completions", GOOD)[0] == 200
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/v1/models", timeout=5)


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def checkpoint(chat_model, tmp_path_factory):
    model, tokenizer = chat_model
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], tokenizer="bpe", model=model.args)
    return save_checkpoint(tmp_path_factory.mktemp("run") / "best", model, cfg, {"step": 0}, tokenizer)


def test_help_says_where_it_listens(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "127.0.0.1" in text and "0.0.0.0" in text and "authentication" in text


@pytest.mark.parametrize("argv,words", [
    (["--checkpoint", "no/such/run"], "--checkpoint no/such/run: no checkpoint there"),
    (["--checkpoint", "CHECKPOINT", "--max-batch-size", "0"], "--max-batch-size 0 must be >= 1"),
    (["--checkpoint", "CHECKPOINT", "--host", "no.such.host.invalid"], "no.such.host.invalid"),
    (["--checkpoint", "CHECKPOINT", "--port", "PORT IN USE"], "cannot listen on 127.0.0.1"),
])
def test_command_errors_are_one_line_not_tracebacks(checkpoint, capsys, argv, words):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        argv = [{"CHECKPOINT": str(checkpoint), "PORT IN USE": str(busy.getsockname()[1])}.get(a, a) for a in argv]
        with pytest.raises(SystemExit) as e:
            main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err, err


def test_command_serves_a_checkpoint_and_stops(checkpoint, chat_model):
    "tinyllama-serve in its own process: the chat reply equals generate's on the saved weights; terminate() stops it."
    command = [sys.executable, "-c", "from tinyllama.serve import main; main()", "--checkpoint", str(checkpoint.parent),
               "--port", "0", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {checkpoint} as 'tinyllama'"), line
        url = line.split("API ")[1].strip()
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tinyllama", messages=as_messages(CONVERSATION), max_tokens=30,
                                               temperature=0)
        assert reply.choices[0].message.content == reference_reply(*chat_model, CONVERSATION, 30)[0]
    finally:
        process.terminate()
        assert process.wait(30) is not None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/models", timeout=5)
