"""Hugging Face folders: single and sharded safetensors, config.json, tokenizer files, chat
templates, and the errors for what pellucid refuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import CHATML, tiny_hf_llama
from tiny_hf import save_hf, tiny_gemma3, tiny_qwen2, write_tokenizer

from pellucid.errors import PellucidError
from pellucid.loading import load_model
from pellucid.weights.safetensors import INDEX, SafetensorsCheckpoint


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2(seed=11)


@pytest.fixture(scope="module")
def single(qwen, tmp_path_factory):
    return save_hf(qwen, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(qwen, tmp_path_factory):
    return save_hf(qwen, tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")


def _logits(lm, hf):
    x = torch.tensor([[3, 50, 60, 70, 80, 90, 4]])
    with torch.no_grad():
        return lm.model(x), hf(x).logits


def test_sharded_checkpoint_with_index(qwen, sharded):
    assert (sharded / INDEX).is_file()
    ckpt = SafetensorsCheckpoint(sharded)
    assert len(ckpt.files) > 1
    lm = load_model(sharded, dtype="float32")
    ours, ref = _logits(lm, qwen)
    assert (ours - ref).abs().max() < 1e-4
    assert sorted(lm.metadata["files"]) == ckpt.files


def test_single_file_equals_sharded(single, sharded):
    a, b = load_model(single, dtype="float32"), load_model(sharded, dtype="float32")
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_bfloat16_load(qwen, single):
    lm = load_model(single, dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.model.rope_cos.dtype == torch.float32  # computed tables stay float32
    ours, ref = _logits(lm, qwen)
    assert (ours - ref).abs().max() < 0.5  # bf16 rounding only


def test_tokenizer_and_chat_template_from_folder(single):
    lm = load_model(single, dtype="float32")
    tok = lm.tokenizer
    assert tok.decode(tok.encode("the cat sat in the end")) == "the cat sat in the end"
    assert tok.encode("<|im_start|>user", parse_special=True)[0] == 1
    assert tok.bos_id == 0 and tok.eos_id == 2 and 2 in tok.eog_ids
    assert lm.chat_template.source == CHATML
    assert lm.chat_template.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_from_jinja_file(qwen, tmp_path):
    folder = save_hf(qwen, tmp_path / "m", chat_template=None)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    lm = load_model(folder, dtype="float32")
    assert lm.chat_template.render([{"role": "user", "content": "hi"}]) == "[user] hi\n"


def test_add_bos_from_post_processor(tmp_path):
    """transformers 5 writes no add_bos_token; tokenizer.json's post-processor says it."""
    from tokenizers import Tokenizer, processors

    folder = save_hf(tiny_gemma3(seed=1, layers=2), tmp_path / "g", add_bos=None)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    lm = load_model(folder, dtype="float32")
    assert lm.tokenizer.add_bos and lm.tokenizer.encode("ab")[0] == 0
    assert lm.tokenizer.encode("<|endoftext|>ab") == lm.tokenizer.encode("ab")  # no second BOS


def test_eos_from_generation_config(qwen, tmp_path):
    folder = save_hf(qwen, tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    lm = load_model(folder, dtype="float32")
    assert {1, 2} <= lm.tokenizer.eog_ids


def test_pickle_checkpoints_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    tiny_hf_llama().config.save_pretrained(folder)
    write_tokenizer(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(PellucidError, match=r"pytorch_model\.bin.*pickle.*safetensors"):
        load_model(folder)


def test_unsupported_architecture_is_named_with_the_supported_list(single, tmp_path):
    folder = tmp_path / "phi"
    shutil.copytree(single, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["Phi3ForCausalLM"], "phi3"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PellucidError, match=r"Phi3ForCausalLM.*Supported: .*GPT2LMHeadModel.*Gemma3ForCausalLM.*Qwen2ForCausalLM"):
        load_model(folder)
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PellucidError, match=r"Unsupported architecture 'phi3'\. Supported: .*gemma3.*gpt2.*llama.*qwen2"):
        load_model(folder)


def test_gguf_unsupported_architecture_lists_supported(tmp_path):
    import gguf

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PellucidError, match=r"Unsupported architecture 'mamba'\. Supported: gemma3, gemma3_text, gpt2, llama, mistral, qwen2"):
        load_model(path)


def test_index_pointing_outside_the_folder_is_refused(sharded, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../elsewhere.safetensors"
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(PellucidError, match="same folder"):
        load_model(folder)


def test_missing_tensor_is_named(single, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(single, folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.bias"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(PellucidError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*missing"):
        load_model(folder)


def test_folder_without_config(tmp_path):
    with pytest.raises(PellucidError, match="config.json"):
        load_model(tmp_path)


def test_unsupported_rotary_scaling_is_refused(single, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(single, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PellucidError, match="rotary scaling 'yarn' is not supported for 'qwen2'"):
        load_model(folder)
