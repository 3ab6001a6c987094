"Tests for tinyllama.data: verified corpus loading (local copy, env var, cache, download), splits and batches."
import functools
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import tinyllama.data as data
from tinyllama.data import (CORPUS_ENV, CORPUS_SHA256, corpus_stats, load_corpus, random_batch,
                            sequential_batches, speaker_turns, split_text)


@pytest.fixture(scope="module")
def corpus_file() -> Path:
    "The shared copy named by $TINYSHAKESPEARE_PATH, else the cached download."
    env = os.environ.get(CORPUS_ENV)
    if env: return Path(env)
    load_corpus()
    return data.default_cache_dir() / data.CORPUS_FILENAME


@pytest.fixture(scope="module")
def corpus_bytes(corpus_file) -> bytes:
    return corpus_file.read_bytes()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    "No local copy configured, an empty cache folder, and a download address where nothing listens."
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(data, "CORPUS_URL", f"http://127.0.0.1:{port}/input.txt")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "cache"


class _Handler(http.server.SimpleHTTPRequestHandler):
    "Serves a folder; /truncated promises the whole corpus but sends half of it and hangs up."
    def do_GET(self):
        if self.path == "/truncated":
            body = (Path(self.directory) / "input.txt").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus_bytes):
    "A local HTTP server with the corpus (input.txt) and a copy with one character changed (corrupted.txt)."
    root = tmp_path_factory.mktemp("www")
    (root / "input.txt").write_bytes(corpus_bytes)
    (root / "corrupted.txt").write_bytes(corpus_bytes.replace(b"ROMEO", b"R0MEO", 1))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# --- loading -----------------------------------------------------------------------------------

def test_shared_copy_is_the_pinned_file(corpus_bytes):
    assert len(corpus_bytes) == data.CORPUS_BYTES
    assert hashlib.sha256(corpus_bytes).hexdigest() == CORPUS_SHA256


def test_path_argument(offline, corpus_file, corpus_bytes):
    text = load_corpus(path=corpus_file)
    assert text.encode("utf-8") == corpus_bytes
    assert not offline.exists()  # neither the cache nor the network was touched


def test_path_argument_wins_over_env(offline, monkeypatch, corpus_file, corpus_bytes, tmp_path):
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "missing.txt"))
    assert load_corpus(path=str(corpus_file)).encode("utf-8") == corpus_bytes


def test_env_var(offline, monkeypatch, corpus_file, corpus_bytes):
    monkeypatch.setenv(CORPUS_ENV, str(corpus_file))
    assert load_corpus().encode("utf-8") == corpus_bytes
    assert not offline.exists()


def test_missing_local_copy_names_the_path(offline, monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "input.txt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_corpus(path=missing)
    monkeypatch.setenv(CORPUS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=CORPUS_ENV) as info:
        load_corpus()
    assert str(missing) in str(info.value)


def test_wrong_local_copy_is_refused(offline, tmp_path, corpus_bytes):
    bad = tmp_path / "input.txt"
    bad.write_bytes(corpus_bytes[:-1])  # one byte short
    actual = hashlib.sha256(corpus_bytes[:-1]).hexdigest()
    with pytest.raises(ValueError) as info:
        load_corpus(path=bad)
    message = str(info.value)
    assert str(bad) in message and CORPUS_SHA256 in message and actual in message


def test_offline_error_names_both_remedies(offline):
    with pytest.raises(RuntimeError) as info:
        load_corpus()
    message = str(info.value)
    assert "path=" in message and CORPUS_ENV in message
    assert list(offline.iterdir()) == []  # nothing half-written left in the cache


def test_download_fills_the_cache_atomically(offline, monkeypatch, server, corpus_bytes):
    monkeypatch.setattr(data, "CORPUS_URL", f"{server}/input.txt")
    assert load_corpus().encode("utf-8") == corpus_bytes  # cache from $TINYLLAMA_CACHE
    assert [p.name for p in offline.iterdir()] == [data.CORPUS_FILENAME]  # no temporary file left
    assert (offline / data.CORPUS_FILENAME).read_bytes() == corpus_bytes
    monkeypatch.setattr(data, "CORPUS_URL", "http://127.0.0.1:1/unreachable")
    assert load_corpus().encode("utf-8") == corpus_bytes  # now served from the cache


def test_download_into_cache_dir_argument(offline, monkeypatch, server, corpus_bytes, tmp_path):
    monkeypatch.setattr(data, "CORPUS_URL", f"{server}/input.txt")
    folder = tmp_path / "elsewhere" / "deeper"
    assert load_corpus(cache_dir=folder).encode("utf-8") == corpus_bytes
    assert (folder / data.CORPUS_FILENAME).read_bytes() == corpus_bytes
    assert not offline.exists()


def test_corrupted_download_is_deleted(offline, monkeypatch, server, corpus_bytes):
    monkeypatch.setattr(data, "CORPUS_URL", f"{server}/corrupted.txt")
    actual = hashlib.sha256(corpus_bytes.replace(b"ROMEO", b"R0MEO", 1)).hexdigest()
    with pytest.raises(ValueError) as info:
        load_corpus()
    assert CORPUS_SHA256 in str(info.value) and actual in str(info.value)
    assert list(offline.iterdir()) == []


@pytest.mark.parametrize("address", ["/truncated", "/no-such-file.txt"])
def test_failed_download_leaves_nothing(offline, monkeypatch, server, address):
    monkeypatch.setattr(data, "CORPUS_URL", server + address)
    with pytest.raises(RuntimeError, match=CORPUS_ENV):
        load_corpus()
    assert list(offline.iterdir()) == []


def test_corrupted_cache_is_not_used(offline, monkeypatch, server):
    offline.mkdir(parents=True)
    (offline / data.CORPUS_FILENAME).write_text("not Shakespeare")
    monkeypatch.setattr(data, "CORPUS_URL", f"{server}/input.txt")
    with pytest.raises(ValueError, match=data.CORPUS_FILENAME):
        load_corpus()


def test_download_file_from_file_url(tmp_path, corpus_file, corpus_bytes):
    dest = data.download_file(corpus_file.as_uri(), tmp_path / "copy.txt", CORPUS_SHA256)
    assert dest.read_bytes() == corpus_bytes
    with pytest.raises(ValueError):
        data.download_file(corpus_file.as_uri(), tmp_path / "other.txt", "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt"]


# --- splits ------------------------------------------------------------------------------------

def test_default_split_is_nanogpts(corpus_bytes):
    text = corpus_bytes.decode("utf-8")
    parts = split_text(text)
    n = len(text)
    assert list(parts) == ["train", "val"]
    assert parts["train"] == text[: int(n * 0.9)] and parts["val"] == text[int(n * 0.9):]  # nanoGPT prepare.py
    assert len(parts["train"]) == 1_003_854 and len(parts["val"]) == 111_540


@given(st.text(min_size=100, max_size=300),
       st.lists(st.floats(0.1, 1.0), min_size=2, max_size=3))
def test_split_concatenates_back(text, weights):
    fractions = [w / sum(weights) for w in weights]
    parts = split_text(text, fractions)
    assert "".join(parts.values()) == text
    assert list(parts) == ["train", "val", "test"][: len(fractions)]
    for part, fraction in zip(parts.values(), fractions):
        assert abs(len(part) - fraction * len(text)) <= 2


def test_split_is_reproducible():
    text = "abcdefghij" * 100
    assert split_text(text, (0.7, 0.2, 0.1)) == split_text(text, (0.7, 0.2, 0.1))


@pytest.mark.parametrize("fractions", [(0.9, 0.2), (1.0, 0.0), (1.1, -0.1), (0.5,), (0.25,) * 4,
                                       (0.5, 0.5, 0.0), (float("nan"), 0.5)])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_text("some text " * 20, fractions)


def test_text_too_short_to_split():
    with pytest.raises(ValueError, match="too short"):
        split_text("a", (0.9, 0.1))  # train would get int(0.9) = 0 characters
    with pytest.raises(ValueError, match="too short"):
        split_text("", (0.5, 0.5))


# --- batches -----------------------------------------------------------------------------------

def test_random_batch_targets_are_the_next_ids_in_the_source():
    ids = torch.randperm(3000, generator=torch.Generator().manual_seed(0))  # distinct ids: id -> position
    where = torch.empty_like(ids)
    where[ids] = torch.arange(len(ids))
    x, y = random_batch(ids, 32, 24, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (32, 24) and x.dtype == y.dtype == torch.long
    torch.testing.assert_close(y[:, :-1], x[:, 1:], rtol=0, atol=0)
    pos = where[x]
    assert torch.equal(pos[:, 1:], pos[:, :-1] + 1)
    assert torch.equal(y, ids[pos + 1])


def test_random_batch_is_reproducible_and_seeded():
    ids = torch.arange(10_000)
    a = random_batch(ids, 8, 16, torch.Generator().manual_seed(5))
    b = random_batch(ids, 8, 16, torch.Generator().manual_seed(5))
    c = random_batch(ids, 8, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_random_batch_reaches_every_start_including_the_last():
    ids = torch.arange(10)  # seq_len 7: starts 0, 1, 2 are possible, 3 is not
    x, y = random_batch(ids, 300, 7, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2}
    assert y.max().item() == 9


@given(st.integers(2, 200), st.integers(1, 7), st.integers(1, 40))
def test_sequential_batches_score_every_target_once(n_ids, batch_size, seq_len):
    ids = torch.randint(0, 50, (n_ids,))
    if n_ids < seq_len + 1:
        with pytest.raises(ValueError, match="seq_len"):
            sequential_batches(ids, batch_size, seq_len)
        return
    batches = list(sequential_batches(ids, batch_size, seq_len))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(xs, ids[:-1]) and torch.equal(ys, ids[1:])  # every target exactly once, in order
    for x, y in batches:
        assert x.shape == y.shape and torch.equal(y[:, :-1], x[:, 1:])
    n_full, leftover = divmod(n_ids - 1, seq_len)
    full = batches[:-1] if leftover else batches
    assert all(x.shape[1] == seq_len and 1 <= x.shape[0] <= batch_size for x, _ in full)
    assert all(x.shape[0] == batch_size for x, _ in full[:-1])
    assert sum(x.shape[0] for x, _ in full) == n_full
    if leftover: assert batches[-1][0].shape == (1, leftover)


@pytest.mark.parametrize("ids, batch_size, seq_len, match", [
    (torch.arange(10), 4, 10, "seq_len=10"),
    (torch.arange(10), 0, 4, "batch_size=0"),
    (torch.arange(10), 2, 0, "seq_len=0"),
    (torch.arange(10.0), 2, 4, "integer"),
    (torch.arange(12).view(3, 4), 2, 2, "1-D"),
])
def test_bad_batch_arguments(ids, batch_size, seq_len, match):
    with pytest.raises(ValueError, match=match):
        random_batch(ids, batch_size, seq_len, torch.Generator())
    with pytest.raises(ValueError, match=match):
        sequential_batches(ids, batch_size, seq_len)  # raised at the call, not at the first batch


# --- statistics --------------------------------------------------------------------------------

def test_speaker_turns_and_stats_by_hand():
    play = "A:\nHello there.\nHow now?\n\nB:\nBye.\n\nA:\nGo.\n\nC:\n\nNot a: heading\n"
    assert speaker_turns(play) == [("A", 2), ("B", 1), ("A", 1), ("C", 0)]
    stats = corpus_stats(play)
    assert stats == {"characters": len(play), "bytes": len(play.encode()), "lines": 13, "words": 13,
                     "distinct_characters": len(set(play)), "speakers": 3, "speeches": 4}
    assert corpus_stats("one line")["lines"] == 1 and corpus_stats("")["lines"] == 0


def test_corpus_stats_on_tiny_shakespeare(corpus_bytes):
    text = corpus_bytes.decode("utf-8")
    stats = corpus_stats(text)
    assert stats["characters"] == stats["bytes"] == len(corpus_bytes)
    assert stats["lines"] == len(text.splitlines())
    assert stats["words"] == len(corpus_bytes.split())
    assert stats["distinct_characters"] == len(set(corpus_bytes)) == 65
    turns = speaker_turns(text)
    lines = text.splitlines()
    assert len(turns) + sum(n for _, n in turns) + lines.count("") == len(lines)  # every line is a heading, speech or blank
    assert 200 < stats["speakers"] < stats["speeches"]
