"Post-training's promises: special pieces round-trip, the extended model keeps old logits, the response mask, DPO's loss, a split without leakage."
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.data import load_corpus, split_text
from tinyllama.model import Llama, ModelArgs
from tinyllama.dpo import dpo_loss, dpo_step, pair_logps, preference_pairs
from tinyllama.posttrain import (ASSISTANT, CHAT_PIECES, IGNORE_INDEX, USER, Exchange, Speech, add_special_pieces,
                                 build_exchanges, chat_ids, clip_lines, collate, encode_chat, extend_vocab,
                                 masked_targets, parse_speeches, reply_format, reply_task, response_kl, response_loss,
                                 sequence_logps, speaker_baselines, who_task)
from tinyllama.tokenizer import CharTokenizer, Tokenizer, train_tokenizer
from tinyllama.train import train_step

TEXT = load_corpus()[:60_000]


@pytest.fixture(scope="module")
def base():
    return train_tokenizer(TEXT[:20_000], 400)


@pytest.fixture(scope="module")
def chat(base):
    return add_special_pieces(base)


def tiny_model(vocab_size, tie=True, seed=0):
    torch.manual_seed(seed)
    return Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                           max_seq_len=256, tie_embeddings=tie)).eval()


# --- special tokens -------------------------------------------------------------------------------------------------

def test_special_pieces_are_new_single_ids_and_round_trip(base, chat, tmp_path):
    user, assistant = chat_ids(chat)
    assert (user, assistant) == (base.vocab_size, base.vocab_size + 1) and chat.vocab_size == base.vocab_size + 2
    text = f"{USER}Reply as ROMEO to:\nJULIET:\nO Romeo!{ASSISTANT}ROMEO:\nAy me, sad hours seem long."
    ids = chat.encode(text)
    assert ids.count(user) == 1 and ids.count(assistant) == 1 and chat.decode(ids) == text
    assert chat.encode(TEXT[20_000:30_000]) == base.encode(TEXT[20_000:30_000])  # other text: the same ids as before
    reloaded = Tokenizer.load(chat.save(tmp_path / "tokenizer.model"))
    assert reloaded.encode(text) == ids and reloaded.vocab_size == chat.vocab_size


def test_special_pieces_errors(base, chat):
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_special_pieces(chat)  # the markers are there already
    with pytest.raises(ValueError, match="distinct"):
        add_special_pieces(base, ["<a>", "<a>"])
    with pytest.raises(ValueError, match="SentencePiece"):
        add_special_pieces(CharTokenizer("abc"))
    with pytest.raises(ValueError, match="add_special_pieces"):
        chat_ids(base)


# --- the extended model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_extended_model_gives_identical_logits_for_old_tokens(tie):
    model = tiny_model(300, tie)
    bigger = extend_vocab(model, 303)
    tokens = torch.randint(0, 300, (3, 40))
    with torch.no_grad():
        old, new = model(tokens), bigger(tokens)  # (3, 40, 300), (3, 40, 303)
    assert new.shape[-1] == 303
    assert_close(new[..., :300], old, rtol=1e-5, atol=1e-6)
    assert_close(new[..., 300:], old.mean(dim=-1, keepdim=True).expand(-1, -1, 3), rtol=1e-4, atol=1e-5)  # mean row -> mean logit
    assert (bigger.output.weight is bigger.tok_embeddings.weight) == tie
    with pytest.raises(ValueError, match="vocab_size"):
        extend_vocab(model, 299)


# --- the response mask ----------------------------------------------------------------------------------------------

def step_loss(model, ids, start):
    "The loss chapter 11's train_step reports for one example (a zero learning rate leaves the weights alone)."
    x, y = collate([(ids, start)])
    loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(x, y)])
    return loss.item()


def test_changing_a_prompt_target_leaves_the_loss_unchanged_and_a_response_target_does_not(chat):
    model = tiny_model(chat.vocab_size)
    ids, start = encode_chat(chat, "Who answers JULIET with these lines?\nShall I hear more?", "ROMEO")
    reference = step_loss(model, ids, start)
    for position in range(1, start):  # every prompt token, as a target (the inputs stay the same)
        changed = list(ids)
        changed[position] = (changed[position] + 7) % 400
        x, y = masked_targets(changed, start)
        assert (y[:start - 1] == IGNORE_INDEX).all()
        with torch.no_grad():
            assert F.cross_entropy(model(masked_targets(ids, start)[0][None])[0], y).item() == reference
    for position in range(start, len(ids)):  # every response token, EOS included
        changed = list(ids)
        changed[position] = (changed[position] + 7) % 400
        x, y = masked_targets(changed, start)
        with torch.no_grad():
            assert abs(F.cross_entropy(model(masked_targets(ids, start)[0][None])[0], y).item() - reference) > 1e-6


def test_masked_loss_is_the_mean_response_nll(chat):
    model = tiny_model(chat.vocab_size)
    ids, start = encode_chat(chat, "Reply as ROMEO to:\nJULIET:\nO Romeo!", "ROMEO:\nAy me!")
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    by_hand = -sum(log_probs[t, ids[t + 1]].item() for t in range(start - 1, len(ids) - 1)) / (len(ids) - start)
    assert abs(step_loss(model, ids, start) - by_hand) < 1e-5
    assert ids[start - 1] == chat_ids(chat)[1] and ids[-1] == chat.eos_id


def test_padding_changes_no_sequence_logp(chat):
    model = tiny_model(chat.vocab_size)
    examples = [encode_chat(chat, p, r) for p, r in [("a", "b c d e f"), ("Who speaks?\nlonger prompt here", "X"), ("q", "r")]]
    x, y = collate(examples)
    assert x.shape[0] == 3 and (y == IGNORE_INDEX).any()
    with torch.no_grad():
        batched = sequence_logps(model, x, y)
        alone = torch.stack([sequence_logps(model, *collate([e])) for e in examples]).flatten()
    assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_encode_chat_refuses_markers_and_masked_targets_checks_start(chat):
    with pytest.raises(ValueError, match="role marker"):
        encode_chat(chat, f"hello {USER}", "x")
    ids, start = encode_chat(chat, "p")
    assert start == len(ids) and ids[-1] == chat_ids(chat)[1]
    with pytest.raises(ValueError, match="response_start"):
        masked_targets([1, 2, 3], 3)


# --- DPO ------------------------------------------------------------------------------------------------------------

def test_dpo_loss_hand_computed_case():
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0]), torch.tensor([-15.0]), torch.tensor([-12.0]),
                                      torch.tensor([-12.0]), beta=0.1)
    assert abs(loss.item() - math.log(1 + math.exp(-0.5))) < 1e-6  # margin 0.1 * (2 - (-3)) = 0.5
    assert abs(chosen.item() - 0.2) < 1e-6 and abs(rejected.item() + 0.3) < 1e-6


def test_dpo_loss_against_python_floats_and_its_gradient():
    torch.manual_seed(1)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) * 20 - 50 for _ in range(4))
    pc.requires_grad_(True)
    beta = 0.3
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta)
    expected = sum(-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
                   for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 16
    assert abs(loss.item() - expected) < 1e-9
    loss.backward()
    assert (pc.grad < 0).all()  # raising log pi(chosen) always lowers the loss
    same, _, _ = dpo_loss(pc.detach(), pr, pc.detach(), pr)
    assert abs(same.item() - math.log(2)) < 1e-12
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_dpo_loss_on_model_logits_against_a_loop(chat):
    policy, reference = tiny_model(chat.vocab_size, seed=0), tiny_model(chat.vocab_size, seed=1)
    pairs = [("Reply as A to:\nB:\nhi", "A:\nwell met", "A:\nno more of that"), ("Reply as C to:\nD:\nhow now", "C:\nay", "C:\nbegone")]

    def loop_logp(model, prompt, response):
        ids, start = encode_chat(chat, prompt, response)
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0].double()
        return sum((logits[t, ids[t + 1]] - torch.logsumexp(logits[t], 0)).item() for t in range(start - 1, len(ids) - 1))

    pl, rl = pair_logps(policy, chat, pairs), pair_logps(reference, chat, pairs)  # (2, 2) each
    loss, chosen, rejected = dpo_loss(pl[:, 0], pl[:, 1], rl[:, 0], rl[:, 1], beta=0.5)
    margins = [0.5 * ((loop_logp(policy, p, c) - loop_logp(reference, p, c)) - (loop_logp(policy, p, r) - loop_logp(reference, p, r)))
               for p, c, r in pairs]
    assert_close((chosen - rejected).double(), torch.tensor(margins, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert abs(loss.item() - sum(math.log1p(math.exp(-m)) for m in margins) / 2) < 1e-4


def test_dpo_steps_raise_the_margin_on_their_pairs(chat):
    policy, reference = tiny_model(chat.vocab_size, seed=0), tiny_model(chat.vocab_size, seed=0)
    pairs = [("Reply as A to:\nB:\nhi", "A:\nwell met", "A:\nno more of that")] * 4
    examples = [(encode_chat(chat, p, c), encode_chat(chat, p, r)) for p, c, r in pairs]
    ref = pair_logps(reference, chat, pairs)
    step = dpo_step(policy.train(), examples, ref, 4, torch.Generator().manual_seed(0), beta=0.1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = step(optimizer)
    assert abs(first["train_loss"] - math.log(2)) < 1e-5 and first["train_margin"] == 0.0
    for _ in range(10):
        last = step(optimizer)
    assert last["train_margin"] > 0 and last["train_loss"] < math.log(2)


def test_response_kl_is_zero_for_the_reference_and_matches_torch_distributions(chat):
    a, b = tiny_model(chat.vocab_size, seed=0), tiny_model(chat.vocab_size, seed=1)
    tasks = [("Reply as A to:\nB:\nhi", "A:\nwell met")]
    assert abs(response_kl(a, a, chat, tasks)) < 1e-7
    x, y = collate([encode_chat(chat, *tasks[0])])
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a(x)[0]),
                                               torch.distributions.Categorical(logits=b(x)[0]))
    assert abs(response_kl(a, b, chat, tasks) - kl[y[0] != IGNORE_INDEX].mean().item()) < 1e-5


# --- data and split -------------------------------------------------------------------------------------------------

def test_parse_speeches_finds_headings_and_offsets():
    text = "A:\nHello there.\nHow now?\n\nB:\nBye.\n\n\nA:\nGo.\n\nnot a speech\n"
    speeches = parse_speeches(text)
    assert [(s.speaker, s.text) for s in speeches] == [("A", "Hello there.\nHow now?"), ("B", "Bye."), ("A", "Go.")]
    assert all(text[s.start:s.end] == f"{s.speaker}:\n{s.text}" for s in speeches)


def test_split_has_no_leakage_across_passages():
    train_text = split_text(TEXT)["train"]
    parts = build_exchanges(train_text, passage_size=20, val_every=5)
    assert parts["train"] and parts["val"]
    assert not {e.passage for e in parts["train"]} & {e.passage for e in parts["val"]}
    assert {e.passage for e in parts["val"]} == {p for p in range(100) if p % 5 == 2} & {e.passage for e in parts["val"]}
    spans = {part: {(s.start, s.end) for e in rows for s in (e.turn, e.reply)} for part, rows in parts.items()}
    assert not spans["train"] & spans["val"]  # no speech on both sides
    speeches = parse_speeches(train_text)
    index = {(s.start, s.end): i for i, s in enumerate(speeches)}
    for e in parts["train"] + parts["val"]:
        i = index[(e.turn.start, e.turn.end)]
        assert index[(e.reply.start, e.reply.end)] == i + 1  # consecutive speeches ...
        assert i // 20 == (i + 1) // 20 == e.passage  # ... of one passage
        assert e.turn.speaker != e.reply.speaker and e.reply.end <= len(train_text)
    with pytest.raises(ValueError, match="too few"):
        build_exchanges(train_text[:2_000], passage_size=20, val_every=5)


def test_preference_pairs_reject_another_passages_reply_under_the_same_name():
    parts = build_exchanges(split_text(TEXT)["train"], passage_size=20, val_every=5)
    rows = parts["val"]
    pairs = preference_pairs(rows, seed=0)
    texts = {(e.passage, e.reply.speaker, clip_lines(e.reply.text, 200)) for e in rows}
    for e, (prompt, chosen, rejected) in zip(rows, pairs):
        assert (prompt, chosen) == reply_task(e)
        heading, body = rejected.split("\n", 1)
        assert heading == f"{e.reply.speaker}:" and body != clip_lines(e.reply.text, 200)
        sources = [(p, s) for p, s, t in texts if t == body]
        assert any(p != e.passage and s != e.reply.speaker for p, s in sources)
    assert preference_pairs(rows, seed=0) == pairs and preference_pairs(rows, seed=1) != pairs
    with pytest.raises(ValueError, match="two passages"):
        preference_pairs([e for e in rows if e.passage == rows[0].passage])


def test_tasks_clip_and_format():
    assert clip_lines("ab\ncd\nef", 5) == "ab\ncd" and clip_lines("ab\ncd\nef", 5, from_end=True) == "cd\nef"
    assert clip_lines("abcdef", 4) == "abcd" and clip_lines("abcdef", 4, from_end=True) == "cdef"
    e = Exchange(0, Speech("JULIET", "O Romeo, Romeo!", 0, 10), Speech("ROMEO", "Shall I hear more?", 12, 30))
    assert reply_task(e) == ("Reply as ROMEO to:\nJULIET:\nO Romeo, Romeo!", "ROMEO:\nShall I hear more?")
    assert who_task(e) == ("Who answers JULIET with these lines?\nShall I hear more?", "ROMEO")
    assert reply_format("ROMEO:\nShall I?", True, "ROMEO")["in format"]
    assert not reply_format("ROMEO:\nShall I?\n\nJULIET:\nAy.", True, "ROMEO")["in format"]
    assert not reply_format(f"ROMEO:\nShall I?{USER}", True, "ROMEO")["one turn"]
    assert not reply_format("ROMEO:\n", True, "ROMEO")["names the speaker"]
    toy = [Exchange(0, Speech("A", "x", 0, 1), Speech(b, "y", 2, 3)) for b in "BBC"]
    assert speaker_baselines(toy, toy) == {"majority speaker": 2 / 3, "most frequent answerer of the turn's speaker": 2 / 3}


def test_response_loss_units(chat):
    model = tiny_model(chat.vocab_size)
    tasks = [("Reply as A to:\nB:\nhi", "A:\nwell met"), ("Who answers B with these lines?\nwell met", "A")]
    scores = response_loss(model, chat, tasks)
    n_tokens = sum(len(ids) - start for ids, start in (encode_chat(chat, p, r) for p, r in tasks))
    assert scores["tokens"] == n_tokens and scores["chars"] == sum(len(r) for _, r in tasks)
    assert abs(scores["bits_per_char"] - scores["nats_per_token"] * n_tokens / (scores["chars"] * math.log(2))) < 1e-9
