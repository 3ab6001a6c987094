"GRPO's promises: the reward and its loopholes, advantages in the group, the loss by hand, zero gradient where it must be, the prompt unscored, a step that learns."
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tinyllama.data import load_corpus
from tinyllama.grpo import (GRPOConfig, Sample, format_reward, group_advantages, grpo_loss, grpo_step, sample_groups,
                            token_logps)
from tinyllama.model import Llama, ModelArgs
from tinyllama.posttrain import IGNORE_INDEX, add_special_pieces, collate, encode_chat, sequence_logps
from tinyllama.recipe import TrainConfig, configure_optimizer
from tinyllama.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def chat():
    return add_special_pieces(train_tokenizer(load_corpus()[:20_000], 400))


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                           max_seq_len=256)).eval()


# --- the reward -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, stopped, failed", [
    ("ROMEO:\nAy me! sad hours seem long.", True, set()),
    ("ROMEO:\nAy.", True, set()),  # one word passes: the reward does not measure length or content
    ("JULIET:\nAy me!", True, {"names the speaker"}),
    ("ROMEO:\nAy me!", False, {"ends with EOS"}),  # cut before EOS
    ("ROMEO:\n", True, {"names the speaker", "body has a word"}),  # an empty reply under the right name
    ("ROMEO:", True, {"names the speaker", "body has a word"}),
    ("ROMEO:\n .", True, {"body has a word"}),  # chapter 17's check passes it: only the length is tested there
    ("ROMEO:\nROMEO:\nROMEO:", True, {"no heading in the body"}),  # the name repeated
    ("ROMEO:\nAy me!\nJULIET:\nWhat?", True, {"no heading in the body"}),  # a second speech without the blank line
    ("ROMEO:\nAy me!\n\nJULIET:\nWhat?", True, {"one turn", "no heading in the body"}),
    ("ROMEO:\nAy me!<|user|>", True, {"one turn"}),
])
def test_format_reward_on_hand_written_replies(text, stopped, failed):
    reward, checks = format_reward(text, stopped, "ROMEO", speakers=["JULIET", "ROMEO"])
    assert {name for name, ok in checks.items() if not ok} - {"in format"} == failed
    assert reward == (0.0 if failed else 1.0)
    assert checks["in format"] == (not failed & {"names the speaker", "one turn", "ends with EOS"})


def test_chapter_12_checks_alone_pass_the_repeated_name():
    _, checks = format_reward("ROMEO:\nROMEO:\nROMEO:", True, "ROMEO")
    assert checks["in format"] and not checks["no heading in the body"]


# --- advantages -----------------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # mean 0.5, unbiased std sqrt((4 * 0.25) / 3)
    assert_close(adv[0], torch.tensor([a, -a, -a, a]))
    assert (adv[1] == 0).all()  # equal rewards: no advantage
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4, 1))


# --- the loss -------------------------------------------------------------------------------------------------------

def hand_case():
    "Two replies: A = +1 over two tokens (ratios 1.1 and 1.5, the second clipped), A = -1 over one (ratio 0.6, clipped)."
    log = math.log
    logps = torch.tensor([[log(0.55), log(0.9)], [log(0.3), log(0.7)]], requires_grad=True)
    old = torch.tensor([[log(0.5), log(0.6)], [log(0.5), log(0.1)]])
    ref = torch.tensor([[log(0.5), log(0.9)], [log(0.2), log(0.4)]])
    mask = torch.tensor([[True, True], [True, False]])
    return logps, old, ref, torch.tensor([1.0, -1.0]), mask


def k3(p, q):  # q / p - log(q / p) - 1 in Python floats
    return q / p - math.log(q / p) - 1


def test_grpo_loss_hand_computed():
    logps, old, ref, adv, mask = hand_case()
    loss, stats = grpo_loss(logps, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    first = ((1.1 - 0.1 * k3(0.55, 0.5)) + (1.2 - 0.1 * k3(0.9, 0.9))) / 2  # min(r A, clip(r) A) - beta k3, mean of 2 tokens
    second = -0.8 - 0.1 * k3(0.3, 0.2)  # min(-0.6, -0.8): the clipped value is the smaller one
    assert abs(loss.item() + (first + second) / 2) < 1e-6
    assert abs(stats["kl"] - (k3(0.55, 0.5) + k3(0.3, 0.2)) / 3) < 1e-6 and abs(stats["clip_fraction"] - 2 / 3) < 1e-6
    loss.backward()
    assert logps.grad[0, 1] == 0 and logps.grad[1, 1] == 0  # clipped (ratio 1.5 with A > 0), and outside the mask
    assert logps.grad[0, 0] != 0


def test_grpo_loss_errors():
    logps, old, ref, adv, mask = hand_case()
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logps, old, ref, adv, mask, beta=-1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(logps, old, ref, adv, mask, clip_eps=0.0)


def test_k3_is_an_unbiased_kl_and_its_gradient_is_the_forward_kl():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(50, requires_grad=True), torch.randn(50)
    log_p, log_q = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    p = log_p.exp()
    expected_k3 = (p.detach() * ((log_q - log_p).exp() - (log_q - log_p) - 1)).sum()  # E_{x ~ p}[k3], samples not differentiated
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=logits),
                                              torch.distributions.Categorical(logits=ref_logits))
    assert_close(expected_k3, exact)  # value: KL(p || q)
    (grad,) = torch.autograd.grad(expected_k3, logits)
    forward = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=ref_logits),
                                                torch.distributions.Categorical(logits=logits))
    (forward_grad,) = torch.autograd.grad(forward, logits)
    assert_close(grad, forward_grad)  # gradient: that of KL(q || p)


# --- on a real (tiny) model -----------------------------------------------------------------------------------------

def batch(chat):
    replies = [("Reply as ROMEO to:\nJULIET:\nO Romeo!", "ROMEO:\nAy me!"), ("Say", "x y z"),
               ("Reply as ROMEO to:\nJULIET:\nO Romeo!", "JULIET:\nNo."), ("Say", "")]
    return collate([encode_chat(chat, p, r) for p, r in replies])


def test_token_logps_sum_to_sequence_logps(chat):
    model = tiny_model(chat.vocab_size)
    x, y = batch(chat)
    with torch.no_grad():
        per_token = token_logps(model, x, y)
        assert_close(per_token.sum(1), sequence_logps(model, x, y))
    assert (per_token[y == IGNORE_INDEX] == 0).all()


def loss_and_grads(policy, reference, chat, rewards, beta):
    x, y = batch(chat)
    with torch.no_grad():
        old, ref = token_logps(policy, x, y), token_logps(reference, x, y)
    adv = group_advantages(torch.tensor(rewards).view(2, 2)).flatten()
    loss, stats = grpo_loss(token_logps(policy, x, y), old, ref, adv, y != IGNORE_INDEX, beta=beta)
    grads = torch.autograd.grad(loss, list(policy.parameters()), allow_unused=True)
    return loss, stats, [g for g in grads if g is not None]


def test_equal_rewards_give_zero_gradient(chat):
    policy = tiny_model(chat.vocab_size)
    reference = copy.deepcopy(policy)
    loss, stats, grads = loss_and_grads(policy, reference, chat, [1.0, 1.0, 0.0, 0.0], beta=0.04)
    assert loss.item() == 0 and stats["kl"] == 0 and all((g == 0).all() for g in grads)  # policy = reference
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, stats, grads = loss_and_grads(policy, reference, chat, [1.0, 1.0, 0.0, 0.0], beta=0.0)
    assert stats["kl"] > 0 and all((g == 0).all() for g in grads)  # no KL weight: only the advantages push
    _, _, grads = loss_and_grads(policy, reference, chat, [1.0, 0.0, 0.0, 0.0], beta=0.0)
    assert any((g != 0).any() for g in grads)  # unequal rewards do push


def test_the_prompt_does_not_count(chat):
    policy = tiny_model(chat.vocab_size)
    reference = tiny_model(chat.vocab_size, seed=1)
    x, y = batch(chat)
    mask = y != IGNORE_INDEX
    with torch.no_grad():
        old, ref = token_logps(policy, x, y), token_logps(reference, x, y)
    logps = token_logps(policy, x, y).detach().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = grpo_loss(logps, old, ref, adv, mask)
    loss.backward()
    assert (logps.grad[~mask] == 0).all() and (logps.grad[mask] != 0).any()
    noise = torch.randn_like(old) * (~mask)  # change every prompt and padding position, none of the reply's
    changed, _ = grpo_loss(logps + noise, old - noise, ref + 2 * noise, adv, mask)
    assert changed.item() == loss.item()


# --- sampling and the step ------------------------------------------------------------------------------------------

def test_sample_groups_keeps_the_ids_it_drew(chat):
    model = tiny_model(chat.vocab_size)
    prompts = ["Reply as ROMEO to:\nJULIET:\nO Romeo!", "Say"]
    samples = sample_groups(model, chat, prompts, 3, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 6 and all(isinstance(s, Sample) for s in samples)
    for i, s in enumerate(samples):
        prompt_ids = encode_chat(chat, prompts[i // 3])[0]
        assert s.ids[:s.response_start] == prompt_ids and s.response_start == len(prompt_ids)
        reply = s.ids[s.response_start:]
        assert s.stopped == (reply[-1] == chat.eos_id) and chat.eos_id not in reply[:-1]
        assert len(reply) == 12 or s.stopped
        assert chat.decode(reply) == s.text
    with pytest.raises(ValueError, match="group_size"):
        sample_groups(model, chat, prompts, 0)


def test_config_errors():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="beta"):
        GRPOConfig(beta=-0.1)


def test_a_grpo_step_raises_a_reward(chat):
    "A reward the untrained model earns one time in eight (a reply starting with a vowel): 20 steps make it more likely."
    model = tiny_model(chat.vocab_size)
    reference = copy.deepcopy(model).requires_grad_(False)
    tasks = [("Say something", "x"), ("Another prompt here", "y")]
    reward = lambda text, stopped, speaker: float(text[:1].lower() in set("aeiou"))

    def rate(m):
        samples = sample_groups(m, chat, [p for p, _ in tasks], 128, 1, torch.Generator().manual_seed(1))
        return sum(reward(s.text, s.stopped, "") for s in samples) / len(samples)

    cfg = GRPOConfig(group_size=8, prompts_per_step=2, beta=0.04, max_new_tokens=2)
    optimizer = configure_optimizer(model, TrainConfig(model=model.args, lr=1e-2, weight_decay=0.0, seq_len=256))
    step = grpo_step(model, reference, chat, tasks, cfg, reward, torch.Generator().manual_seed(0))
    first = step(optimizer)
    assert abs(first["train_loss"]) < 1e-6  # policy = reference, ratio 1, and the advantages of a group sum to 0
    for _ in range(19):
        step(optimizer)
    before, after = rate(reference), rate(model)
    assert before < 0.2 and after > before + 0.15, (before, after)
