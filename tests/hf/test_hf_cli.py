"""`moekit generate --hf FOLDER`: a transformers-saved folder with a tokenizer continues text as transformers does."""

import json

import pytest
import torch

from moekit.cli import main
from moekit.train.data import Tokenizer

from hf_harness import randomize

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    tokenizer = Tokenizer.bytes()  # ids 0..255 bytes, 256 end of text
    config = MixtralConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           max_position_embeddings=64, bos_token_id=256, eos_token_id=256)  # fmt: skip
    torch.manual_seed(0)
    hf = MixtralForCausalLM(config).eval()
    randomize(hf, scale=0.5)
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    return hf, tokenizer, tmp_path


def test_generate_hf_streams_the_transformers_greedy_continuation(folder, capsys):
    hf, tokenizer, path = folder
    prompt = "MoE: "
    assert main(["generate", "--hf", str(path), "--prompt", prompt, "--max-new-tokens", "10", "--greedy"]) == 0
    out = capsys.readouterr()
    ids = torch.tensor([[256] + tokenizer.encode(prompt)])  # BOS, then the prompt
    want = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=256, eos_token_id=256)
    new = [t for t in want[0, ids.shape[1]:].tolist() if t != 256]
    assert out.out.rstrip("\n") == prompt + tokenizer.decode(new)
    assert "tokens/s" in out.err


def test_generate_hf_without_tokenizer_is_a_clear_error(folder, capsys):
    _, _, path = folder
    (path / "tokenizer.json").unlink()
    assert main(["generate", "--hf", str(path), "--prompt", "x"]) != 0
    assert "no tokenizer.json" in capsys.readouterr().err


def test_generate_hf_without_eos_is_a_clear_error(folder, capsys):
    _, _, path = folder
    for name in ("config.json", "generation_config.json"):
        data = json.loads((path / name).read_text())
        data.pop("eos_token_id", None)
        (path / name).write_text(json.dumps(data))
    assert main(["generate", "--hf", str(path), "--prompt", "x"]) != 0
    assert "eos_token_id" in capsys.readouterr().err
