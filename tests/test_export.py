"Export's promises: the Hugging Face folder loads without tinyllama and agrees id for id and logit for logit; llama.cpp runs the GGUF file with our ids, our greedy text and our logits; the round trip is exact; bad input is refused."
import dataclasses
import hashlib
import json

import gguf
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tinyllama.checkpoint import save_checkpoint, verify_checkpoint
from tinyllama.data import load_corpus, split_text
from tinyllama.export import (EXPORT_RECORD, LlamaCppModel, export, export_gguf, export_hf, hf_tokenizer, import_hf,
                              import_llama_cpp, llama_cpp_required, main, run_hf_check, write_gguf)
from tinyllama.generate import generate, generate_tokens
from tinyllama.model import build_model
from tinyllama.tokenizer import SPACE_MARKER
from tinyllama.train import TRAIN_PRESETS, TrainConfig, load_trained_model, train

EDGE_CASES = ["", " ", "   leading and trailing   ", "two  spaces,\tthree\t\t\ttabs", "CRLF\r\nline\r\n", "\n\n\n",
              "control \x00\x01\x07\x1b\x7f chars", "emoji 😀👍🏽🇫🇷", "CJK 中文字符 日本語 한국어", "é ñ ü ß Ω ∑",
              "▁", "a▁b ▁ c▁▁ ▁▁▁", "▁the", "<s> </s> <unk> <pad> <0x41>", "ROMEO:\nWhat say you?", "\ufffd\ufeff"]
PROMPTS = ["ROMEO:\n", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is the"]
N_NEW = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    "The tiny preset with a 384-token BPE tokenizer and a 256-token context, 300 steps (about 3 s): varied greedy text."
    tiny = TRAIN_PRESETS["tiny"]
    cfg = dataclasses.replace(tiny, tokenizer="bpe", max_chars=100_000, max_steps=300, warmup_steps=10, lr=2e-2,
                              batch_size=16, eval_interval=300, sample_tokens=0,
                              out_dir=str(tmp_path_factory.mktemp("run")),
                              model=dataclasses.replace(tiny.model, vocab_size=384, max_seq_len=256, dropout=0.0))
    train(cfg, progress=False)
    return cfg.out_dir + "/best"


@pytest.fixture(scope="module")
def hf_dir(checkpoint, tmp_path_factory):
    return export_hf(checkpoint, tmp_path_factory.mktemp("exports") / "hf")


@pytest.fixture(scope="module")
def gguf_files(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(checkpoint, root / t, t) for t in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def llama_cpp():
    "llama-cpp-python (the llamacpp extra): its checks skip without it, and fail where TINYLLAMA_REQUIRE_LLAMACPP=1 (CI)."
    try:
        return import_llama_cpp()
    except ImportError as e:
        if llama_cpp_required():
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def llama_f32(llama_cpp, gguf_files):
    return LlamaCppModel(gguf_files["f32"])


def greedy_ids(model, prompt_ids, n):
    return torch.stack(list(generate_tokens(model, [prompt_ids], n)), 1)[0].tolist()


def test_greedy_text_is_not_degenerate(trained):
    "The parity checks below mean something only if the greedy text varies and its choices are not near-ties."
    model, tokenizer = trained
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        new = greedy_ids(model, ids, N_NEW)
        assert len(set(new)) >= 4, tokenizer.decode(new)
        with torch.no_grad():
            top2 = model(torch.tensor([ids + new]))[0, len(ids) - 1:-1].topk(2).values  # (N_NEW, 2)
        # Logits within 1e-4 of ours can swap two choices only if these differ by less than twice that.
        assert (top2[:, 0] - top2[:, 1]).min() > 2e-4


# ---------------------------------------------------------------- Hugging Face

def test_hf_folder_in_a_fresh_process_without_tinyllama(trained, hf_dir):
    model, tokenizer = trained
    val = split_text(load_corpus()[:100_000])["val"]
    logit_ids = [tokenizer.encode(val)[:256], tokenizer.encode(PROMPTS[1])]
    report = run_hf_check(hf_dir, EDGE_CASES, logit_ids, PROMPTS, N_NEW)
    assert report["tinyllama_imported"] is False
    assert (report["tokenizer_class"], report["model_class"]) == ("TokenizersBackend", "LlamaForCausalLM") or \
        report["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert report["ids"] == [tokenizer.encode(t) for t in EDGE_CASES]  # no BOS added, '<s>' read as text
    assert report["decoded"] == EDGE_CASES
    with torch.no_grad():
        for theirs, ids in zip(report["logits"], logit_ids):
            assert (torch.tensor(theirs) - model(torch.tensor([ids]))[0]).abs().max() < 1e-4
    ours = [generate(model, tokenizer, p, max_new_tokens=N_NEW, temperature=0.0) for p in PROMPTS]
    assert all(len(g.ids) == N_NEW for g in ours)
    assert report["continuations"] == [g.text for g in ours]


def test_the_script_cannot_import_tinyllama(hf_dir):
    "The fresh process's import blocker works: a script that imports tinyllama fails there."
    import subprocess
    import sys
    from tinyllama.export import HF_CHECK_SCRIPT
    blocker = HF_CHECK_SCRIPT.split("import torch")[0]
    done = subprocess.run([sys.executable, "-c", blocker + "import tinyllama.model"], capture_output=True, text=True)
    assert done.returncode != 0 and "must not import tinyllama" in done.stderr


@pytest.fixture(scope="module")
def auto_tokenizer(hf_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(hf_dir)


tricky = st.text(alphabet=st.sampled_from(list(" \t\r\n▁eat,.:'!?-") + ["😀", "中", "\x00", "é", "<", "s", ">"]),
                 max_size=40)
corpus_slices = st.tuples(st.integers(0, 1_000_000), st.integers(0, 300)).map(lambda a: load_corpus()[a[0]:a[0] + a[1]])


@given(st.one_of(st.text(max_size=40), tricky, corpus_slices))
def test_hf_tokenizer_gives_our_ids_for_any_text(trained, auto_tokenizer, text):
    _, tokenizer = trained
    ids = auto_tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert auto_tokenizer.decode(ids) == text == tokenizer.decode(ids)


def test_hf_tokenizer_on_the_whole_corpus(trained):
    _, tokenizer = trained
    text = load_corpus()
    assert hf_tokenizer(tokenizer).encode(text).ids == tokenizer.encode(text)


def test_round_trip_gives_identical_logits(trained, hf_dir):
    model, tokenizer = trained
    back, back_tokenizer = import_hf(hf_dir)
    tokens = torch.tensor([tokenizer.encode(load_corpus()[:2000])[:256]])
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    assert back_tokenizer.model_proto == tokenizer.model_proto


# ---------------------------------------------------------------- GGUF and llama.cpp

def test_gguf_metadata(trained, gguf_files):
    model, tokenizer = trained
    reader = gguf.GGUFReader(gguf_files["f32"])
    value = lambda key: reader.fields[key].contents()
    assert value("general.architecture") == "llama" and value("tokenizer.ggml.model") == "llama"
    assert value("llama.block_count") == model.args.n_layers and value("llama.attention.head_count_kv") == model.args.n_kv_heads
    assert value("llama.rope.dimension_count") == model.args.head_dim
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id"),
            value("tokenizer.ggml.unknown_token_id"), value("tokenizer.ggml.padding_token_id")) == (1, 2, 0, 3)
    assert value("tokenizer.ggml.add_bos_token") is False and value("tokenizer.ggml.add_space_prefix") is False
    types = value("tokenizer.ggml.token_type")
    assert types[:4] == [2, 3, 3, 3] and types[4:260] == [6] * 256 and set(types[260:]) == {1}
    assert value("tokenizer.ggml.tokens")[260] == tokenizer.sp.id_to_piece(260)
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_files["q8_0"]).tensors}["blk.0.attn_q.weight"] == "Q8_0"
    assert gguf_files["q8_0"].stat().st_size < gguf_files["f16"].stat().st_size < gguf_files["f32"].stat().st_size


def test_llama_cpp_tokenizer_gives_our_ids(trained, llama_f32):
    "Identical ids, except that llama.cpp reads a literal '▁' as a space (it replaces spaces by '▁' itself)."
    _, tokenizer = trained
    for text in EDGE_CASES:
        expected = tokenizer.encode(text.replace(SPACE_MARKER, " "))
        assert llama_f32.tokenize(text) == expected, text
        assert (llama_f32.tokenize(text) == tokenizer.encode(text)) == (SPACE_MARKER not in text)
    val = split_text(load_corpus())["val"]
    assert llama_f32.tokenize(val) == tokenizer.encode(val)


def test_llama_cpp_f32_greedy_and_logits(trained, llama_f32):
    model, tokenizer = trained
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = greedy_ids(model, ids, N_NEW)
        theirs = llama_f32.greedy(ids, N_NEW)
        assert len(theirs) == len(ours) >= 64 and theirs == ours, prompt
    ids = tokenizer.encode(load_corpus()[:2000])[:256]
    with torch.no_grad():
        assert (llama_f32.logits(ids) - model(torch.tensor([ids]))[0]).abs().max() < 1e-4


@pytest.mark.parametrize("gguf_type,relative", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_llama_cpp_runs_the_smaller_types(llama_cpp, trained, gguf_files, gguf_type, relative):
    """Logits move with the rounding, in proportion to their spread: F16 rounds each weight by up to 2^-11 of itself;
    Q8_0 rounds weights, and in llama.cpp's kernels the activations too, by up to 1/254 of each 32-block's largest."""
    model, tokenizer = trained
    ids = tokenizer.encode(load_corpus()[:2000])[:256]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    theirs = LlamaCppModel(gguf_files[gguf_type]).logits(ids)
    difference = (theirs - ours).abs().max().item()
    assert 0 < difference < relative * (ours.max() - ours.min()).item()


def test_our_q8_0_is_llama_cpps_own(llama_cpp, gguf_files, tmp_path):
    "write_gguf's Q8_0 tensors are byte for byte what llama.cpp's quantizer makes of the F32 file."
    import ctypes
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 1
    theirs = tmp_path / "llama-cpp-q8_0.gguf"
    assert llama_cpp.llama_model_quantize(str(gguf_files["f32"]).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    tensors = lambda path: {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}
    assert tensors(gguf_files["q8_0"]) == tensors(theirs)


# ---------------------------------------------------------------- bad input

def foreign_checkpoint(tmp_path, arch, model_args, tokenizer):
    "A checkpoint of another architecture, saved without training (export reads only its configuration)."
    cfg = TrainConfig(arch=arch, model=model_args, tokenizer="bpe", seq_len=16)
    return save_checkpoint(tmp_path / arch / "best", build_model(model_args), cfg, {}, tokenizer)


def test_other_architectures_are_refused(trained, tmp_path):
    from tinyllama.gpt2 import GPT2Args
    from tinyllama.hybrid import HybridArgs
    _, tokenizer = trained
    for arch, args in [("gpt2", GPT2Args(dim=32, n_layers=1, n_heads=2, max_seq_len=16, vocab_size=384)),
                       ("hybrid", HybridArgs(dim=32, n_layers=1, n_heads=2, max_seq_len=16, vocab_size=384, norm="layernorm"))]:
        path = foreign_checkpoint(tmp_path, arch, args, tokenizer)
        for fmt in ("hf", "gguf"):
            with pytest.raises(ValueError, match=rf"arch='{arch}'.*only arch='llama' can be exported"):
                export(path, tmp_path / f"out-{arch}-{fmt}", fmt)
            assert not (tmp_path / f"out-{arch}-{fmt}").exists()


def test_character_tokenizer_is_refused(tmp_path):
    from tinyllama.tokenizer import CharTokenizer
    tiny = TRAIN_PRESETS["tiny"]  # a LLaMA with a character tokenizer
    path = save_checkpoint(tmp_path / "run" / "best", build_model(tiny.model), tiny, {}, CharTokenizer("abc "))
    with pytest.raises(ValueError, match="tokenizer='char'.*only tokenizer='bpe'"):
        export_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_existing_folders_are_kept(checkpoint, tmp_path):
    out = export_gguf(checkpoint, tmp_path / "q8", "q8_0").parent
    before = digest(out)
    with pytest.raises(ValueError, match=r"already exists.*--overwrite"):
        export_gguf(checkpoint, out, "f16")
    assert digest(out) == before
    export_gguf(checkpoint, out, "f16", overwrite=True)  # replaced whole: the q8_0 file is gone
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_RECORD, "manifest.json", "model-f16.gguf"]
    assert json.loads((out / EXPORT_RECORD).read_text())["gguf_type"] == "f16" and verify_checkpoint(out) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write"):
        export_hf(checkpoint, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_failed_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import tinyllama.export as export_module
    def broken(model, tokenizer, path, gguf_type="f32", name="tinyllama"):
        path.write_bytes(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(export_module, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(checkpoint, tmp_path / "out", "f32")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_name_what_is_valid(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"format='onnx'.*valid: hf, gguf"):
        export(checkpoint, tmp_path / "out", "onnx")
    with pytest.raises(ValueError, match=r"gguf_type='q4_0'.*f32, f16, q8_0"):
        export(checkpoint, tmp_path / "out", "gguf", "q4_0")
    with pytest.raises(ValueError, match=r"gguf_type='f16' applies to format='gguf' only"):
        export(checkpoint, tmp_path / "out", "hf", "f16")
    assert not (tmp_path / "out").exists()


def test_command_line(checkpoint, tmp_path, capsys):
    main(["--checkpoint", checkpoint, "--format", "gguf", "--gguf-type", "q8_0", "--out", str(tmp_path / "g")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "g" / "model-q8_0.gguf").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", checkpoint, "--format", "onnx", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--format" in err and "'onnx'" in err and "'hf'" in err and "'gguf'" in err
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", checkpoint, "--format", "gguf", "--out", str(tmp_path / "g")])
    assert "already exists" in str(e.value.code) and "--overwrite" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "nothing"), "--format", "hf", "--out", str(tmp_path / "x")])
    assert "no checkpoint at" in str(e.value.code)
    assert not (tmp_path / "x").exists()
