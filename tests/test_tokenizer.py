"Tests for tinyllama.tokenizer: lossless round trips, special ids, determinism, save/load, vocabulary limits, bits per char, the CLI."
import io
import math
import os
import re

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, strategies as st

from tinyllama.data import load_corpus, split_text
from tinyllama.tokenizer import (BOS_ID, EOS_ID, N_BYTES, N_SPECIAL, PAD_ID, SPM_OPTIONS, TOKENIZER_FILENAME, UNK_ID,
                                 CharTokenizer, Tokenizer, bits_per_char, min_vocab_size, prepare_cli,
                                 train_tokenizer, training_chunks)

VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_corpus()  # $TINYSHAKESPEARE_PATH, else the cache or a download


@pytest.fixture(scope="module")
def train_slice(corpus) -> str:
    return split_text(corpus)["train"][:100_000]


@pytest.fixture(scope="module")
def tok(train_slice) -> Tokenizer:
    return train_tokenizer(train_slice, VOCAB_SIZE)


# --- lossless round trips ----------------------------------------------------------------------

WHITESPACE_AND_CONTROL = (" \t\n\r\x0b\x0c\x00\x01\x07\x1b\x1c\x1f\x7f\x85\xa0\u1680\u2000\u200a\u200b\u200c\u200d"
                          "\u200e\u200f\u2028\u2029\u202a\u202e\u202f\u205f\u2066\u2069\u3000\u2581\ufeff")
EMOJI = "😀👩🏽💻🇫🇷❤🧑🏿‍🚀" + "\u200d\ufe0f\U0001f3fb\U0001f3ff"
SHAKESPEARE = "ROMEO:\nBut soft, what light through yonder window breaks?\n'Tis the east; and Juliet is the sun!"
any_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)))  # every code point but lone surrogates
mixed_text = st.text(alphabet=st.one_of(
    st.sampled_from(SHAKESPEARE), st.sampled_from(WHITESPACE_AND_CONTROL), st.sampled_from(EMOJI),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x0590, max_codepoint=0x06FF),  # Hebrew and Arabic, right to left
    st.characters(exclude_categories=("Cs",))))


@given(any_text)
def test_round_trip_any_text(tok, s):
    assert tok.decode(tok.encode(s)) == s


@given(mixed_text)
def test_round_trip_targeted_text(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert UNK_ID not in ids  # byte fallback: nothing is ever unknown


@given(st.text(alphabet=st.sampled_from(WHITESPACE_AND_CONTROL), max_size=30))
def test_round_trip_whitespace_and_control(tok, s):
    assert tok.decode(tok.encode(s)) == s


@pytest.mark.parametrize("s", ["", " ", "  two  spaces  ", "\n", "\n\n\n", "a\r\nb\rc", "\x00", "\t\t",
                               "▁", "a▁b c", "<s></s><unk><pad><0x41>", "\ufeff", "👩🏽‍💻", "שָׁלוֹם", "中文", "ﬁ"])
def test_round_trip_examples(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_round_trip_unseen_corpus_text(tok, corpus):
    val = split_text(corpus)["val"]
    ids = tok.encode(val)
    assert tok.decode(ids) == val
    assert len(ids) < len(val)  # BPE compresses


def test_matches_sentencepiece_where_no_fix_is_needed(tok, train_slice):
    text = train_slice[:20_000]
    reference = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    assert tok.encode(text) == reference.encode(text)


def test_newline_is_a_real_token(tok):
    newline = tok.encode("\n")
    assert len(newline) == 1 and newline[0] >= N_SPECIAL + N_BYTES and tok.sp.id_to_piece(newline[0]) == "\n"


# --- ids ---------------------------------------------------------------------------------------

def test_vocabulary_layout(tok):
    assert tok.vocab_size == VOCAB_SIZE
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in (BOS_ID, EOS_ID)] == ["<s>", "</s>"]
    assert all(tok.sp.id_to_piece(N_SPECIAL + b) == f"<0x{b:02X}>" for b in range(256))
    assert tok.encode("é") == [N_SPECIAL + 0xC3, N_SPECIAL + 0xA9]  # unseen character: its UTF-8 bytes


def test_bos_eos_pad(tok):
    s = "Good night, good night!"
    ids = tok.encode(s)
    assert tok.encode(s, bos=True) == [BOS_ID] + ids
    assert tok.encode(s, eos=True) == ids + [EOS_ID]
    assert tok.encode(s, bos=True, eos=True) == [BOS_ID] + ids + [EOS_ID]
    assert tok.decode([BOS_ID, PAD_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]) == s
    assert tok.decode([UNK_ID]) == "\ufffd"


def test_batches(tok):
    texts = ["To be,", "", "or not\nto be", "▁x"]
    batch = tok.encode_batch(texts, bos=True, eos=True)
    assert batch == [tok.encode(t, bos=True, eos=True) for t in texts]
    assert tok.decode_batch(batch) == texts
    assert tok.decode(torch.tensor(batch[2])) == texts[2]


def test_bad_ids_and_text(tok):
    with pytest.raises(ValueError, match=f"0 to {VOCAB_SIZE - 1}"):
        tok.decode([5, VOCAB_SIZE])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# --- training ----------------------------------------------------------------------------------

def test_training_is_deterministic(tok, train_slice):
    again = train_tokenizer(train_slice, VOCAB_SIZE)
    assert again.model_proto == tok.model_proto
    assert again.encode(train_slice[:5000]) == tok.encode(train_slice[:5000])


@given(st.text(alphabet=st.sampled_from("ab é中\n\r😀"), max_size=400), st.integers(4, 64))
def test_training_chunks_cover_the_text(text, max_bytes):
    chunks = training_chunks(text, max_bytes)
    assert "".join(chunks) == text
    assert all(chunk and len(chunk.encode()) <= max_bytes for chunk in chunks)


WEIRD = "Hello  world\r\n\x00tab\there ▁ 😀 中文\n\nSecond  para:\nline\n\n\n"


@pytest.mark.parametrize("name", ["corpus", "weird"])
def test_min_vocab_size_is_exact(name, train_slice):
    text = train_slice[:20_000] if name == "corpus" else WEIRD
    minimum = min_vocab_size(text)
    assert train_tokenizer(text, minimum).vocab_size == minimum
    with pytest.raises(ValueError, match=f"vocab_size >= {minimum}"):
        train_tokenizer(text, minimum - 1)
    # SentencePiece itself, without our check, agrees that one id fewer is too few
    with pytest.raises(RuntimeError, match="smaller than required_chars"):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(training_chunks(text)), model_writer=io.BytesIO(),
                                       vocab_size=minimum - 1, **SPM_OPTIONS)


def test_min_vocab_size_of_tiny_shakespeare(corpus):
    assert min_vocab_size(split_text(corpus)["train"]) == N_SPECIAL + N_BYTES + len(set(corpus)) == 325


def test_vocab_size_too_large():
    text = "hello world\nhello there\n"
    with pytest.raises(ValueError, match="too large") as info:
        train_tokenizer(text, 1000)
    maximum = int(re.search(r"vocab_size <= (\d+)", str(info.value))[1])
    assert train_tokenizer(text, maximum).vocab_size == maximum
    with pytest.raises(ValueError, match="too large"):
        train_tokenizer(text, maximum + 1)


@pytest.mark.parametrize("text", ["", "\n\n\n", "\x00"])
def test_nothing_to_train_on(text):
    with pytest.raises(ValueError, match="text"):
        train_tokenizer(text, 400)


# --- save and load -----------------------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path, train_slice):
    path = tok.save(tmp_path / "sub" / TOKENIZER_FILENAME)
    loaded = Tokenizer.load(path)
    assert loaded.model_proto == tok.model_proto and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(train_slice[:5000]) == tok.encode(train_slice[:5000])
    tok.save(path)  # overwriting works, and leaves no temporary file behind
    assert os.listdir(path.parent) == [TOKENIZER_FILENAME]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer.load(tmp_path / "junk.model")


# --- CharTokenizer -----------------------------------------------------------------------------

def test_char_tokenizer_matches_nanogpt(corpus):
    char_tok = CharTokenizer(corpus)
    chars = sorted(set(corpus))  # nanoGPT's shakespeare_char vocabulary
    stoi = {c: i for i, c in enumerate(chars)}
    text = corpus[-3000:]
    assert char_tok.vocab_size == N_SPECIAL + len(chars) == 69
    assert char_tok.encode(text) == [N_SPECIAL + stoi[c] for c in text]
    assert char_tok.decode(char_tok.encode(text, bos=True, eos=True) + [PAD_ID]) == text
    assert char_tok.decode_batch(char_tok.encode_batch(["ab", "c"])) == ["ab", "c"]


def test_char_tokenizer_unseen_character():
    char_tok = CharTokenizer("abc ")
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 2"):
        char_tok.encode("a é")
    with pytest.raises(ValueError, match="outside"):
        char_tok.decode([char_tok.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer("")


def test_char_tokenizer_save_load(tmp_path):
    text = "weird \x00\n\t😀▁ chars"
    char_tok = CharTokenizer(text)
    loaded = CharTokenizer.load(char_tok.save(tmp_path / "chars.json"))
    assert loaded.chars == char_tok.chars and loaded.encode(text) == char_tok.encode(text)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CharTokenizer.load(tmp_path / "nope.json")


# --- bits per character ------------------------------------------------------------------------

def test_bits_per_char_by_hand():
    probs = [0.5, 0.25, 0.125, 0.9, 0.01]  # model probabilities of 5 tokens covering 12 characters
    total_nll = -sum(math.log(p) for p in probs)
    assert math.isclose(bits_per_char(total_nll, 12), -sum(math.log2(p) for p in probs) / 12, rel_tol=1e-12)
    nats_per_token, tokens_per_char = total_nll / 5, 5 / 12
    assert math.isclose(bits_per_char(total_nll, 12), nats_per_token * tokens_per_char / math.log(2), rel_tol=1e-12)
    assert bits_per_char(torch.tensor(3 * math.log(2)), 3) == pytest.approx(1.0, rel=1e-6)  # tensors work
    assert bits_per_char(0.0, 7) == 0.0


@pytest.mark.parametrize("args, match", [((1.0, 0), "n_chars=0"), ((-1.0, 5), "total_nll_nats"),
                                         ((float("nan"), 5), "total_nll_nats")])
def test_bits_per_char_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        bits_per_char(*args)


# --- command line ------------------------------------------------------------------------------

def test_prepare_cli(tmp_path, capsys, corpus):
    prepare_cli(["--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "artifacts")])
    out = capsys.readouterr().out
    assert "chars per token" in out and "tokens" in out and "1,003,854" in out
    saved = Tokenizer.load(tmp_path / "artifacts" / TOKENIZER_FILENAME)
    # trained on the training split and nothing else
    assert saved.model_proto == train_tokenizer(split_text(corpus)["train"], VOCAB_SIZE).model_proto


def test_prepare_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        prepare_cli(["--vocab-size", "100", "--out", str(tmp_path)])
    assert info.value.code == 2 and "vocab_size >= 325" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_cli(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / TOKENIZER_FILENAME).exists()
