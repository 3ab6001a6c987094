"""The chat page of `tinyllama-serve` (GET /), as a reader uses it: headless Chromium types two messages.

Independent of TINYLLAMA_SITE: it serves its own app (uvicorn on a thread, a free port of 127.0.0.1), with appendix H's
`random_chat_model`. Set TINYLLAMA_CHAT_SCREENSHOT=path.png to keep a screenshot of the page after the second reply.
"""
import copy
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from tinyllama.generate import generate_tokens
from tinyllama.batching import chat_prompt_ids, random_chat_model
from tinyllama.serve import create_app, running_server

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the networking flags Chromium keeps calling home, which a closed network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def served():
    model, tokenizer = random_chat_model(seed=0, max_seq_len=512)  # room for two turns of random bytes, which re-encode longer
    with running_server(create_app(copy.deepcopy(model), tokenizer, "tinyllama")) as url:  # the server's own copy
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def reference_reply(model, tokenizer, messages) -> str:
    "Chapter 12's greedy tokens after the conversation in chapter 17's format, up to EOS."
    row = torch.cat(list(generate_tokens(model, [chat_prompt_ids(tokenizer, messages)], MAX_TOKENS,
                                         eos_id=tokenizer.eos_id))).tolist()
    return tokenizer.decode(row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row)


# Every text the newest reply bubble shows, as it grows.
WATCH_REPLIES = """() => {
  window.replyTexts = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('.assistant');
    if (replies.length) window.replyTexts.push([replies.length, replies[replies.length - 1].textContent]);
  }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
}"""


def test_two_turns_stream_in_and_the_second_carries_the_first(served, browser):
    url, model, tokenizer = served
    tab = browser.new_page()
    bodies, outside, failed, streams = [], [], [], []
    tab.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    tab.on("request", lambda r: None if urlparse(r.url).hostname == "127.0.0.1" else outside.append(r.url))
    tab.on("requestfailed", lambda r: failed.append(r.url))
    tab.on("response", lambda r: streams.append(r.headers.get("content-type", "")) if r.url.endswith("/completions") else None)
    tab.goto(url + "/", wait_until="networkidle")
    assert tab.title() == "tinyllama chat" and tab.text_content("#model") == "tinyllama"

    tab.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    assert tab.text_content("#temperature-value") == "0"
    tab.fill("#max-tokens", str(MAX_TOKENS))
    tab.evaluate(WATCH_REPLIES)
    messages = ["Reply as JULIET to:\nROMEO:\nLady, by yonder blessed moon I swear", "Who answers?"]
    for turn, text in enumerate(messages, start=1):
        tab.fill("#input", text)
        tab.press("#input", "Enter")  # Enter sends
        tab.wait_for_function(f"() => document.getElementById('form').dataset.busy === 'false' "
                              f"&& document.querySelectorAll('.assistant').length === {turn}", timeout=60_000)
    assert tab.query_selector(".error") is None, tab.text_content(".error")
    if os.environ.get("TINYLLAMA_CHAT_SCREENSHOT"):
        tab.screenshot(path=os.environ["TINYLLAMA_CHAT_SCREENSHOT"], full_page=True)
    shown_users = tab.eval_on_selector_all(".user", "els => els.map(e => e.textContent)")
    shown_replies = tab.eval_on_selector_all(".assistant", "els => els.map(e => e.textContent)")
    seen = tab.evaluate("window.replyTexts")
    tab.close()

    # the page sent the whole conversation, greedy, streamed
    first = [{"role": "user", "content": messages[0]}]
    assert bodies[0]["messages"] == first and bodies[0]["stream"] is True and bodies[0]["temperature"] == 0
    assert bodies[1]["messages"] == first + [{"role": "assistant", "content": shown_replies[0]},
                                             {"role": "user", "content": messages[1]}]
    assert bodies[1]["max_tokens"] == MAX_TOKENS and all(s.startswith("text/event-stream") for s in streams)
    # what it shows is the conversation, and each reply is chapter 12's greedy reply to it
    assert shown_users == messages
    assert shown_replies[0] == reference_reply(model, tokenizer, [("user", messages[0])]) and len(shown_replies[0]) > 20
    assert shown_replies[1] == reference_reply(model, tokenizer, [("user", messages[0]), ("assistant", shown_replies[0]),
                                                                  ("user", messages[1])])
    # each reply appeared piece by piece: the bubble showed a part of it before the whole (how many parts depends
    # on how the browser's reads fall between the server's events)
    for turn, reply in enumerate(shown_replies, start=1):
        partial = {text for n, text in seen if n == turn and text and text != reply}
        assert partial and all(reply.startswith(text) for text in partial), (turn, partial)
    assert not outside and not failed, (outside, failed)


def test_an_error_is_shown_and_the_message_leaves_the_conversation(served, browser):
    url, _, _ = served
    tab = browser.new_page()
    tab.goto(url + "/", wait_until="networkidle")
    tab.fill("#max-tokens", "100000")  # more than the context holds: the server answers 400
    tab.fill("#input", "Hail")
    tab.press("#input", "Enter")
    tab.wait_for_selector(".error")
    tab.wait_for_function("() => document.getElementById('form').dataset.busy === 'false'")
    assert "max_tokens=100000 does not fit" in tab.text_content(".error")
    assert tab.query_selector(".assistant") is None
    bodies = []
    tab.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    tab.fill("#max-tokens", "5")
    tab.fill("#input", "Hail again")
    tab.click("#send")
    tab.wait_for_function("() => document.querySelectorAll('.assistant').length === 1 "
                          "&& document.getElementById('form').dataset.busy === 'false'")
    assert bodies[0]["messages"] == [{"role": "user", "content": "Hail again"}]  # the failed message is not resent
    tab.close()
