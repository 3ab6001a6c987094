"The hybrid of appendix F: Llama at LLaMA's settings, one GPT-2 part per switch, registered by name; its ablation grid."
import dataclasses
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tinyllama.hybrid import Hybrid, HybridArgs, PositionalEmbedding
from tinyllama.model import Llama, ModelArgs, build_model, count_parameters, flops_per_token, get_architecture

SMALL = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, multiple_of=16, max_seq_len=64)


def test_hybrid_at_llama_settings_is_llama():
    torch.manual_seed(3)
    llama = Llama(SMALL).eval()
    torch.manual_seed(3)
    hybrid = Hybrid(HybridArgs(**SMALL.to_dict())).eval()
    for key, value in llama.state_dict().items():
        assert torch.equal(hybrid.state_dict()[key], value), key
    tokens = torch.randint(0, 80, (2, 50))
    with torch.no_grad():
        assert torch.equal(llama(tokens), hybrid(tokens))
    assert flops_per_token(HybridArgs(**SMALL.to_dict()), 64) == flops_per_token(SMALL, 64)


def test_hybrid_switches_change_the_parameter_count_as_expected():
    args = HybridArgs(dim=48, n_layers=3, n_heads=4, vocab_size=100, multiple_of=32, max_seq_len=40)
    n_llama = count_parameters(Llama(ModelArgs(**{k: v for k, v in args.to_dict().items()
                                                 if k not in ("norm", "positions", "mlp")})))
    assert count_parameters(Hybrid(args)) == n_llama
    dim, hidden = args.dim, args.hidden_dim
    expected = {("norm", "layernorm"): (2 * 3 + 1) * dim, ("positions", "learned"): 40 * dim,
                ("mlp", "gelu"): 3 * (2 * dim * 4 * dim + 4 * dim + dim - 3 * dim * hidden)}
    for (name, value), delta in expected.items():
        model = Hybrid(dataclasses.replace(args, **{name: value}))
        assert count_parameters(model) - n_llama == delta, name
    everything = Hybrid(dataclasses.replace(args, norm="layernorm", positions="learned", mlp="gelu"))
    assert count_parameters(everything) - n_llama == sum(expected.values())
    assert all(isinstance(m, torch.nn.LayerNorm) for m in (everything.norm, everything.layers[0].ffn_norm))
    assert everything.output.weight is everything.tok_embeddings.weight  # still tied
    for bad, valid in [(dict(positions="alibi"), "'rope', 'learned'"), (dict(norm="batchnorm"), "'rmsnorm', 'layernorm'"),
                       (dict(mlp="relu"), "'swiglu', 'gelu'")]:
        with pytest.raises(ValueError, match=f"{list(bad)[0]}='{list(bad.values())[0]}' must be one of \\({valid}\\)"):
            HybridArgs(**bad)


def test_flops_per_token_counts_every_multiply_but_no_lookup_table():
    "Chapter 06's generic count against the hand count: all parameters - token table - position table + head."
    for switch in [{}, dict(norm="layernorm"), dict(positions="learned"), dict(mlp="gelu"),
                   dict(positions="learned", tie_embeddings=False)]:
        args = HybridArgs(**(SMALL.to_dict() | switch))
        d, vocab = args.dim, args.vocab_size
        n_params = count_parameters(Hybrid(args)) - vocab * d + vocab * d * args.tie_embeddings
        n_params -= args.max_seq_len * d if args.positions == "learned" else 0
        assert flops_per_token(args, 32) == 6 * n_params + 12 * args.n_layers * d * 32, switch


def test_positional_embedding_adds_the_position_rows():
    embedding = PositionalEmbedding(vocab_size=10, dim=4, max_seq_len=8)
    tokens = torch.tensor([[3, 1, 4], [1, 5, 9]])  # (B, T)
    embedding.start_pos = 5
    assert_close(embedding(tokens), embedding.weight[tokens] + embedding.pos_embeddings.weight[5:8], rtol=0, atol=0)
    embedding.start_pos, embedding.key_mask = 0, torch.tensor([[True, True, True], [False, True, True]])
    out = embedding(tokens)
    assert_close(out[0], embedding.weight[tokens[0]] + embedding.pos_embeddings.weight[:3], rtol=0, atol=0)
    assert_close(out[1, 1:], embedding.weight[tokens[1, 1:]] + embedding.pos_embeddings.weight[:2], rtol=0, atol=0)


def test_learned_positions_make_attention_position_blind_but_for_the_table():
    "One layer, table zeroed: swapping two earlier tokens cannot change the last logits; with the table or RoPE it does."
    one_layer = HybridArgs(**(SMALL.to_dict() | {"n_layers": 1}))
    tokens = torch.tensor([[5, 17, 2, 40, 9, 33, 71, 8, 12, 60]])
    swapped = tokens.clone()
    swapped[0, [1, 6]] = tokens[0, [6, 1]]
    blind = Hybrid(dataclasses.replace(one_layer, positions="learned")).eval()
    with_table = Hybrid(dataclasses.replace(one_layer, positions="learned")).eval()
    rope = Hybrid(one_layer).eval()
    torch.nn.init.zeros_(blind.tok_embeddings.pos_embeddings.weight)
    with torch.no_grad():
        change = {name: (m(swapped)[0, -1] - m(tokens)[0, -1]).abs().max().item()
                  for name, m in [("blind", blind), ("table", with_table), ("rope", rope)]}
    assert change["blind"] < 1e-6 and change["table"] > 1e-5 and change["rope"] > 1e-5, change  # float32 rounding vs signal


def test_learned_positions_cache_padding_and_stop_at_max_seq_len():
    model = Hybrid(HybridArgs(dim=32, n_layers=2, n_heads=4, vocab_size=60, max_seq_len=24, positions="learned")).eval()
    tokens = torch.randint(0, 60, (2, 24))
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    key_mask[1, :4] = False
    with torch.no_grad():
        full = model(tokens)
        shifted = model(tokens[:, 1:])  # the same tokens at other positions: other logits
        padded = model(tokens, key_mask=key_mask)
        alone = model(tokens[1:, 4:])
        model.enable_kv_cache(2)
        steps = [model(tokens[:, :10])] + [model(tokens[:, t:t + 1], start_pos=t) for t in range(10, 24)]
        model.disable_kv_cache()
    assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert_close(padded[1, 4:], alone[0], rtol=0, atol=1e-5)
    assert not torch.allclose(shifted[:, 0], full[:, 1], atol=1e-3)
    assert (model.rope_cos == 1).all() and (model.rope_sin == 0).all()
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_registered_in_chapter_06s_registry_and_its_grid_in_the_sweeps():
    "Importing tinyllama.hybrid registers the architecture with tinyllama.model and the grid 'hybrid.ablate' with the sweep."
    code = ("import sys, tinyllama.model as m, tinyllama.sweep as s; "
            "assert m.get_architecture('hybrid').model_class.__module__ == 'tinyllama.hybrid'; "
            "assert s.get_grid('hybrid.ablate').__module__ == 'tinyllama.hybrid'")
    subprocess.run([sys.executable, "-c", code], check=True)  # a fresh process: each registry imports the module itself
    args = HybridArgs(**SMALL.to_dict(), mlp="gelu")
    assert type(build_model(args)) is Hybrid and get_architecture("hybrid").args_class is HybridArgs
    assert {"max_seq_len", "norm", "positions", "mlp"} <= set(get_architecture("hybrid").shape_fields)


def test_ablate_grid_puts_back_one_gpt2_part_per_run_at_llamas_rate(tmp_path):
    "Appendix F's grid: 3 parts x 3 seeds at the main width, each run LLaMA but for one switch, all at LLaMA's best rate."
    from tinyllama.evaluate import SEEDS, best_lr, shape
    from tinyllama.hybrid import ABLATIONS, ablate_grid
    from tinyllama.sweep import COLUMNS
    rows = [{"name": f"{arch}-d{dim}-lr{lr:g}-s0", "status": "ok", "arch": arch, "lr": lr, "seed": 0,
             "val_bits_per_char": 3.0 + abs(lr - (4e-3 if arch == "llama" else 8e-3))}  # llama's best: 4e-3
            for arch in ("llama", "gpt2") for dim in (16, 32) for lr in (1e-3, 2e-3, 4e-3, 8e-3)]
    import pandas as pd
    pd.DataFrame(rows).reindex(columns=COLUMNS).to_csv(tmp_path / "evaluate.lr.csv", index=False)
    assert best_lr(tmp_path, "llama", 32, tiny=True) == 4e-3
    runs = ablate_grid(tmp_path, tiny=True)
    assert len(runs) == len(ABLATIONS) * len(SEEDS) and len({r.name for r in runs}) == len(runs)
    llama = shape("llama", 32, tiny=True)
    for run in runs:
        args = run.cfg.model
        changed = {name for name in ABLATIONS if getattr(args, name) != getattr(HybridArgs(), name)}
        assert len(changed) == 1 and getattr(args, changed.pop()) in run.name
        assert run.cfg.arch == "hybrid" and run.cfg.lr == 4e-3 and not run.final
        assert {k: v for k, v in args.to_dict().items() if k not in ABLATIONS} == llama.to_dict()


def test_hybrid_trains_and_its_checkpoint_reloads(tmp_path):
    from tinyllama.train import TrainConfig, load_trained_model, train
    cfg = TrainConfig(arch="hybrid", model=HybridArgs(dim=32, n_layers=1, n_heads=2, max_seq_len=32, norm="layernorm",
                                                      positions="learned", mlp="gelu"),
                      tokenizer="char", max_chars=20_000, batch_size=4, seq_len=32, max_steps=6, warmup_steps=1,
                      lr=3e-3, eval_interval=6, eval_batches=2, dtype="float32", sample_tokens=0, out_dir=str(tmp_path))
    result = train(cfg, progress=False)
    assert result.losses[-1] < result.losses[0]
    model, _, loaded_cfg = load_trained_model(tmp_path)
    assert isinstance(model, Hybrid) and loaded_cfg.arch == "hybrid" and loaded_cfg.model.mlp == "gelu"
    for key, value in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
