"Checkpoints: the format before the manifest still loads and resumes; damaged files name themselves; nothing is overwritten."
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tinyllama.checkpoint import FORMAT_VERSION, MANIFEST, read_checkpoint, save_checkpoint, verify_checkpoint
from tinyllama.model import PRESETS, Llama
from tinyllama.train import evaluate, load_trained_model, prepare_data, train

# written by tinyllama at commit b03201b (format 1: no manifest.json), the tiny preset shrunk to dim 16, 4 steps on
# the first 20,000 characters; that code printed this final validation loss on the whole split
FORMAT1 = Path(__file__).parent / "fixtures" / "format1_checkpoint"
FORMAT1_VAL_LOSS = 4.023465790588776


def test_format1_checkpoint_loads_and_scores_as_it_did(tmp_path):
    assert not (FORMAT1 / MANIFEST).exists() and verify_checkpoint(FORMAT1) == 1
    model, tokenizer, cfg = load_trained_model(FORMAT1)
    data = prepare_data(cfg, tokenizer)
    val = evaluate(model, data.val_ids, data.val_chars, cfg.seq_len, cfg.batch_size)
    assert val["loss"] == pytest.approx(FORMAT1_VAL_LOSS, rel=1e-6)


def test_format1_checkpoint_resumes_and_is_rewritten_in_the_current_format(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FORMAT1, run / "last")
    _, state = read_checkpoint(run)
    cfg = load_trained_model(run)[2]
    result = train(dataclasses.replace(cfg, out_dir=str(run), max_steps=6), resume=run, progress=False)
    assert result.start_step == state["step"] == 4 and result.step == 6
    assert json.loads((run / "last" / MANIFEST).read_text())["format_version"] == FORMAT_VERSION


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "last", Llama(PRESETS["tiny"]), {"model": PRESETS["tiny"].to_dict()}, {"step": 7})


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,damage,message", [
    ("model.safetensors", _truncate, "truncated or replaced"),
    ("state.pt", _flip, "SHA-256"),
    ("config.json", lambda p: p.unlink(), "is missing"),
])
def test_a_damaged_file_is_named_and_left_as_it_was(checkpoint, name, damage, message):
    path = checkpoint / name
    damage(path)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(ValueError, match=message) as error:
        read_checkpoint(checkpoint)
    assert str(path) in str(error.value)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before  # reading wrote nothing


def test_a_format1_folder_with_bad_files_names_them(checkpoint):
    (checkpoint / MANIFEST).unlink()
    (checkpoint / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="state.pt could not be read"):
        read_checkpoint(checkpoint)
    (checkpoint / "config.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match=r"config.json is not valid UTF-8 JSON"):
        read_checkpoint(checkpoint)


def test_a_newer_format_is_refused_with_both_versions(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    (checkpoint / MANIFEST).write_text(json.dumps(manifest | {"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"format_version={FORMAT_VERSION + 1}.*formats 1 to {FORMAT_VERSION}"):
        read_checkpoint(checkpoint)


def test_load_trained_model_names_a_bad_tokenizer(tmp_path):
    result = train(dataclasses.replace(load_trained_model(FORMAT1)[2], out_dir=str(tmp_path / "run"), max_steps=2,
                                       eval_interval=2), progress=False)
    (result.out_dir / "last" / MANIFEST).unlink()  # format 1: the manifest would catch it first
    (result.out_dir / "last" / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model could not be read as a char tokenizer"):
        load_trained_model(result.out_dir)
