"""`python -m model.convert` round trip (HF Llama -> ours -> HF) through real directories and subprocesses."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import subprocess
import sys
import this
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from model.config import ModelConfig
from model.convert import load_model_dir, save_model_dir
from model.convert import main as convert_main
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


def run_convert(*args: str, subprocess_cli: bool = True) -> subprocess.CompletedProcess:
    """``python -m model.convert ARGS`` in a subprocess, or the same entry point in-process (saves ~10 s)."""
    if not subprocess_cli:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = convert_main(list(args))
        return subprocess.CompletedProcess(args, code, "", stderr.getvalue())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "model.convert", *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def train_tokenizer(tmp: Path) -> Path:
    text = tmp / "zen.txt"
    text.write_text(codecs.decode(this.s, "rot13"))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp / "sp"), vocab_size=120, model_type="bpe", minloglevel=2
    )
    return tmp / "sp.model"


@pytest.mark.parametrize("tied", [False, True])
def test_cli_round_trip_llama(tmp_path: Path, tied: bool):
    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        initializer_range=0.1,
    )
    hf = LlamaForCausalLM(config).eval()
    hf_dir, ours_dir, back_dir = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
    hf.save_pretrained(hf_dir)
    tokenizer = train_tokenizer(tmp_path)
    (hf_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())

    # One real `python -m model.convert` subprocess (untied from-hf); the rest calls the same main() in-process.
    result = run_convert("from-hf", str(hf_dir), str(ours_dir), subprocess_cli=not tied)
    assert result.returncode == 0, result.stderr
    cfg_json = json.loads((ours_dir / "model_config.json").read_text())
    assert cfg_json["family"] == "dense" and cfg_json["tie_embeddings"] == tied
    assert (ours_dir / "tokenizer.model").read_bytes() == tokenizer.read_bytes()

    result = run_convert("to-hf", str(ours_dir), str(back_dir), subprocess_cli=False)
    assert result.returncode == 0, result.stderr

    tokens = torch.randint(0, 120, (2, 20))
    back = AutoModelForCausalLM.from_pretrained(back_dir).eval()
    assert type(back) is LlamaForCausalLM
    ours, _ = load_model_dir(ours_dir)
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (back(tokens).logits - ref).abs().max().item() < 1e-5
        assert (ours.eval()(tokens).logits - ref).abs().max().item() < 1e-5

    # The exported tokenizer loads as LlamaTokenizer and encodes as sentencepiece does (plus BOS).
    hf_tok = LlamaTokenizer.from_pretrained(back_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    sentence = "Beautiful is better than ugly."
    assert hf_tok(sentence)["input_ids"] == [sp.bos_id()] + sp.encode(sentence)
    assert back.config.bos_token_id == sp.bos_id() and back.config.eos_token_id == sp.eos_id()


def test_save_and_load_model_dir(tmp_path: Path):
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=48, tie_embeddings=True
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_model_dir(model, cfg, tmp_path / "m")
    loaded, loaded_cfg = load_model_dir(tmp_path / "m")
    assert loaded_cfg == cfg
    assert loaded.lm_head.weight is loaded.embed.weight
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_errors_are_one_line(tmp_path: Path):
    result = run_convert("to-hf", str(tmp_path / "missing"), str(tmp_path / "out"), subprocess_cli=False)
    assert result.returncode == 1
    assert "model_config.json" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = run_convert("from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), subprocess_cli=False)
    assert result.returncode == 1
    assert "unsupported HF model_type 'gpt2'" in result.stderr and "Traceback" not in result.stderr
