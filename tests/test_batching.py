"The batching engine's promises: stop strings cut while streaming, conversations in chapter 17's format, a batch's tokens = chapter 12's generate, the batcher, clients that leave, the load runner."
import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyllama.batching import (Batcher, Job, StopMatcher, chat_prompt_ids, decode_batch, job_events,
                                run_load)
from tinyllama.generate import encode_prompts, generate
from tinyllama.posttrain import encode_chat

from conftest import CONVERSATION, PROMPTS  # shared with the other serving tests; conftest gives chat_model


@given(st.text(alphabet="ab\n", max_size=30), st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), max_size=4),
       st.lists(st.integers(0, 30), max_size=6))
def test_stop_matcher_cuts_before_the_first_stop_to_complete_however_the_text_is_split(text, stops, cuts):
    cuts = sorted({c for c in cuts if 0 < c < len(text)})
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    matcher = StopMatcher(stops)
    released = "".join(matcher.push(p) for p in pieces) + matcher.flush()
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert released == (text[:min(found)[1]] if found else text) and matcher.stopped == bool(found)


def test_stop_matcher_rejects_empty_stops():
    for bad in ("\n", [""], [None]):
        with pytest.raises(ValueError, match="non-empty strings"):
            StopMatcher(bad)


def test_chat_prompt_ids_are_chapter_12s_turns_one_after_another(chat_model):
    _, tokenizer = chat_model
    ids = chat_prompt_ids(tokenizer, CONVERSATION)
    assert ids == encode_chat(tokenizer, CONVERSATION[0][1], CONVERSATION[1][1])[0] + encode_chat(tokenizer, CONVERSATION[2][1])[0]
    assert chat_prompt_ids(tokenizer, CONVERSATION[:1]) == encode_chat(tokenizer, CONVERSATION[0][1])[0]
    for bad in ([], [("system", "Be brief."), ("user", "Hi")], CONVERSATION[:2], [("user", "a"), ("user", "b")]):
        with pytest.raises(ValueError, match="alternate"):
            chat_prompt_ids(tokenizer, bad)


def test_decode_batch_equals_generate_row_by_row_and_as_a_batch(chat_model):
    model, tokenizer = chat_model
    jobs = [Job(ids, 30) for ids in encode_prompts(tokenizer, PROMPTS)]
    decode_batch(model, tokenizer, jobs)
    together = generate(model, tokenizer, PROMPTS, max_new_tokens=30, temperature=0)
    for job, g, prompt in zip(jobs, together, PROMPTS):
        text = "".join(value for kind, value in job.events if kind == "text")
        assert text == g.text == generate(model, tokenizer, prompt, max_new_tokens=30, temperature=0).text
        assert job.events[-1] == ("done", "stop" if g.stop_reason == "eos" else "length") and job.finished.is_set()


def test_batcher_and_job_reject_bad_settings(chat_model):
    model, tokenizer = chat_model
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(model, tokenizer, max_batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Job([5, 6], 0)
    with pytest.raises(ValueError, match="top_p"):
        Job([5, 6], 4, temperature=1.0, top_p=1.5)


def test_batcher_keeps_jobs_that_do_not_fit_together_for_the_next_batch(chat_model):
    model, tokenizer = chat_model
    batcher = Batcher(model, tokenizer, max_batch_size=8, window=0.2)
    long_prompt, long_reply = Job([7] * 200, 10), Job([7] * 10, 200)  # alone each fits in 256 positions, together not
    for job in (long_prompt, long_reply):
        batcher.submit(job)
    assert long_prompt.finished.wait(60) and long_reply.finished.wait(60)
    batcher.close()
    assert batcher.stats["batch_sizes"] == {1: 2} and long_reply.n_tokens == 200


async def read_events(batcher: Batcher, job: Job, limit: int | None = None) -> list:
    seen = []
    async with contextlib.aclosing(job_events(batcher, job)) as events:
        async for event in events:
            seen.append(event)
            if len(seen) == limit:
                break
    return seen


def run_async(coroutine):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def test_job_events_streams_a_job_and_a_reader_that_leaves_cancels_it(chat_model):
    model, tokenizer = chat_model
    batcher = Batcher(model, tokenizer, window=0.05)
    stays, leaves = Job(encode_prompts(tokenizer, ["ROMEO:\n"])[0], 30), Job(encode_prompts(tokenizer, ["O"])[0], 240)
    async def both():
        return await asyncio.gather(read_events(batcher, stays), read_events(batcher, leaves, limit=1))
    read, left = run_async(both())
    batcher.close()
    assert "".join(v for k, v in read if k == "text") == generate(model, tokenizer, "ROMEO:\n", 30, temperature=0).text
    assert read[-1] == ("done", stays.finish_reason) and len(left) == 1
    assert leaves.finish_reason == "cancelled" and leaves.n_tokens < 240 and batcher.stats["cancelled"] == 1
    with pytest.raises(RuntimeError, match="shutting down"):  # a closed batcher takes no more jobs
        run_async(read_events(batcher, Job([5, 6], 3)))


def test_run_load_counts_tokens_and_rejects_bad_settings():
    result = run_load(lambda i: i, 5, concurrency=2)
    assert result["requests"] == 5 and result["tokens"] == 0 + 1 + 2 + 3 + 4 and result["p50_ms"] <= result["p95_ms"]
    for concurrency, n in ((0, 5), (True, 5), (2, 1)):
        with pytest.raises(ValueError, match="concurrency"):
            run_load(lambda i: 1, n, concurrency)
