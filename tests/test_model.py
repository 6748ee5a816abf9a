"""model.py against the ecosystem's reference Llama (transformers), checkpoints both ways,
the chunked loss, generation, and bad checkpoints."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
import rope
from model import Llama, ModelArgs
from rope import RopeSettings

transformers = pytest.importorskip("transformers")

ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128,
             "beta_fast": 4.0, "beta_slow": 1.0},
    # gpt-oss's untruncated ramp and DeepSeek's attention factor: both change the logits
    "yarn-untruncated-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128,
                                "truncate": False, "mscale": 1.0, "mscale_all_dim": 0.5},
}


def assert_logits_close(got, expected):
    """Within 1e-4 of the logits' scale. What remains is transformers' own rounding: it forms
    position * inv_freq in fp32 (~1e-4 rad off at position 1500), we form it exactly."""
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() < 1e-4 * scale, (got - expected).abs().max()


def hf_model(rope_scaling, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=10000.0, rope_scaling=rope_scaling, rms_norm_eps=1e-5,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than HF's init so attention is far from uniform
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.15)
    return m


@pytest.mark.parametrize("kind", ROPES)
def test_logits_match_transformers_past_the_original_window(kind, tmp_path):
    ref = hf_model(ROPES[kind])
    ref.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(str(tmp_path))
    assert ours.args.rope.kind == kind.split("-")[0]
    tokens = torch.randint(0, 256, (2, 900), generator=torch.Generator().manual_seed(1))  # 7x the 128 window
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 900, 256)
    assert_logits_close(got, expected)
    assert expected.std() > 0.3  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_our_export_loads_in_transformers_with_the_same_logits(kind, tmp_path):
    from transformers import LlamaForCausalLM
    ref = hf_model(ROPES[kind])
    ref.save_pretrained(tmp_path / "src")
    ours = Llama.from_pretrained(str(tmp_path / "src"))
    ours.save_pretrained(str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["rope_scaling"]["rope_type"] == kind
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 256, (1, 600))
    with torch.no_grad():
        assert_logits_close(ours(tokens), reloaded(tokens).logits)


def test_yarn_extension_exports_a_config_engines_read_the_same_way(tmp_path):
    """Stage 1's export: llama3 scaling replaced by YaRN, every field spelled out, window = ctx."""
    from transformers import AutoConfig, LlamaForCausalLM
    ref = hf_model(ROPES["llama3"])
    ref.save_pretrained(tmp_path / "src")
    ours = Llama.from_pretrained(str(tmp_path / "src"))
    ours.set_rope(rope.extend_settings(ours.args.rope, 2048))
    ours.args.max_seq_len = 2048
    ours.save_pretrained(str(tmp_path / "out"))
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert scaling == {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128,
                       "beta_fast": 4.0, "beta_slow": 1.0, "attention_factor": pytest.approx(0.1 * 2.772588722 + 1),
                       "truncate": True}
    assert AutoConfig.from_pretrained(str(tmp_path / "out")).max_position_embeddings == 2048
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens = torch.randint(0, 256, (1, 1500))
    with torch.no_grad():
        assert_logits_close(ours(tokens), reloaded(tokens).logits)


def test_tied_embeddings_and_sharded_checkpoints_round_trip(tmp_path):
    ref = hf_model(ROPES["llama3"], tie=True)
    ref.save_pretrained(tmp_path / "src")
    ours = Llama.from_pretrained(str(tmp_path / "src"))
    assert ours.output.weight is ours.tok_embeddings.weight
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    ours.save_pretrained(str(tmp_path / "out"), max_shard_bytes=60_000)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    again = Llama.from_pretrained(str(tmp_path / "out"))
    tokens = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        assert torch.equal(again(tokens), ours(tokens))
        assert_logits_close(again(tokens), ref(tokens).logits)


def test_load_in_bf16_keeps_rope_in_full_precision(tmp_path):
    hf_model(ROPES["yarn"]).save_pretrained(tmp_path)
    ours = Llama.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    ours.to(torch.float16)
    assert ours.inv_freq.dtype == torch.float32
    assert torch.equal(ours.inv_freq, rope.inv_freq(ours.args.rope, 16))


def tiny_model(seed=0, **overrides):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=128, max_seq_len=256,
                     rope=RopeSettings(theta=1e4), **overrides)
    m = Llama(args)
    m.init_weights(std=0.1, seed=seed)
    return m


def test_chunked_loss_equals_full_cross_entropy_with_gradients(monkeypatch):
    monkeypatch.setattr(M, "loss_chunk_size", lambda vocab: 7)  # many chunks, one ragged
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (2, 40))
    labels = torch.randint(0, 300, (2, 40))
    labels[0, :13] = -100
    labels[1, 5:35] = -100  # whole chunks without a label
    a, b = tiny_model(), tiny_model()
    loss = a(tokens, labels=labels)
    logits = b(tokens)
    ref = F.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-5
    (loss * 3).backward()
    (ref * 3).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-4), name
    total = a(tokens, labels=labels, reduction="sum")
    assert abs(total.item() - ref.item() * (labels != -100).sum().item()) < 1e-3


def test_weighted_chunked_loss_equals_weighted_cross_entropy_with_gradients(monkeypatch):
    monkeypatch.setattr(M, "loss_chunk_size", lambda vocab: 7)
    torch.manual_seed(1)
    tokens, labels = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    labels[0, :13] = -100
    weights = torch.rand(2, 40)  # weights on unlabelled tokens must not count
    a, b = tiny_model(), tiny_model()
    total = a(tokens, labels=labels, reduction="sum", label_weights=weights)
    per_token = F.cross_entropy(b(tokens).reshape(-1, 300), labels.reshape(-1), ignore_index=-100, reduction="none")
    ref = (per_token * weights.reshape(-1) * (labels.reshape(-1) != -100)).sum()
    assert abs(total.item() - ref.item()) < 1e-4
    total.backward()
    ref.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):  # a sum, not a mean: gradients ~1
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5 * pb.grad.abs().max().item(), rtol=1e-4), name


def test_loss_with_no_labelled_token_is_zero_not_nan():
    m = tiny_model()
    tokens = torch.randint(0, 300, (1, 16))
    loss = m(tokens, labels=torch.full((1, 16), -100))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_explicit_positions_are_what_rope_sees():
    """A shard holding positions [0,1,6,7] computes what the full sequence computes there.
    The document mask makes the full sequence's tokens 0,1,6,7 see only each other, so the
    only thing that can differ is the relative distance RoPE gives them."""
    m = tiny_model()
    tokens = torch.randint(0, 300, (1, 8))
    full = m(tokens, doc_ids=torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]]))
    idx = torch.tensor([0, 1, 6, 7])
    same_doc = torch.zeros(1, 4, dtype=torch.long)
    shard = m(tokens[:, idx], positions=idx[None], doc_ids=same_doc)
    assert torch.allclose(shard, full[:, idx], atol=1e-5)
    packed_as_0123 = m(tokens[:, idx], doc_ids=same_doc)  # what forgetting the positions gives
    assert not torch.allclose(packed_as_0123[:, 2:], full[:, idx][:, 2:], atol=1e-3)


def test_generate_with_chunked_prefill_equals_recomputing_everything(monkeypatch):
    m = tiny_model(seed=3)
    prompt = torch.randint(0, 300, (37,)).tolist()
    monkeypatch.setattr(M, "PREFILL_CHUNK", 8)
    got = m.generate(prompt, max_new_tokens=12)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]
    stop = got[4]
    monkeypatch.setattr(M, "PREFILL_CHUNK", 5)
    assert m.generate(prompt, max_new_tokens=12, stop_ids=(stop,)) == got[:got.index(stop) + 1]


def test_presets():
    for name in M.PRESETS:
        M.preset(name)
    assert M.count_params(M.preset("llama3.1-8b")) == 8_030_261_248
    assert M.count_params(M.preset("llama3.2-1b")) == 1_235_814_400
    with pytest.raises(rope.UserError, match="unknown model preset"):
        M.preset("llama5")


# ------------------------------------------------------------------------------------------------
# bad checkpoints: one sentence naming what and where, nothing half-loaded

@pytest.fixture
def checkpoint(tmp_path):
    hf_model(None).save_pretrained(tmp_path)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(rope.UserError, match="config.json is missing"):
        Llama.from_pretrained(str(tmp_path))


def test_unknown_model_type_and_rope_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(rope.UserError, match="model_type 'mistral'"):
        Llama.from_pretrained(str(checkpoint))
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(rope.UserError, match="unsupported rope type 'longrope' in .*config.json"):
        Llama.from_pretrained(str(checkpoint))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), "config.json lacks 'hidden_size'"),
    (lambda c: c.pop("num_hidden_layers"), "config.json lacks 'num_hidden_layers'"),
    (lambda c: c.update(attention_bias=True), "attention_bias True in .*config.json is not supported"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' in .*config.json is not supported"),
    (lambda c: c.update(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 in .*config.json is not supported"),
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0, finetuned=True),
     "field 'finetuned' of rope type 'yarn' in .*config.json is not supported"),
])
def test_config_missing_a_field_or_changing_the_math_is_refused_by_name(checkpoint, edit, message):
    config = json.loads((checkpoint / "config.json").read_text())
    edit(config)
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(rope.UserError, match=message):
        Llama.from_pretrained(str(checkpoint))


def rewrite_weights(checkpoint, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, checkpoint / "model.safetensors")


def test_missing_extra_and_misshaped_tensors(checkpoint):
    rewrite_weights(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(rope.UserError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        Llama.from_pretrained(str(checkpoint))
    rewrite_weights(checkpoint, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(160, 64),
                                                    "model.layers.2.mlp.up_proj.weight": torch.zeros(160, 64)}))
    with pytest.raises(rope.UserError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight' in .*model.safetensors"):
        Llama.from_pretrained(str(checkpoint))
    rewrite_weights(checkpoint, lambda t: (t.pop("model.layers.2.mlp.up_proj.weight"),
                                           t.update({"model.norm.weight": torch.ones(65)})))
    with pytest.raises(rope.UserError, match=r"'model.norm.weight' in .* has shape \(65,\), but config.json implies \(64,\)"):
        Llama.from_pretrained(str(checkpoint))


def test_directory_without_weights(checkpoint):
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(rope.UserError, match="has no weights"):
        Llama.from_pretrained(str(checkpoint))


def test_per_token_losses_match_full_logits(monkeypatch):
    monkeypatch.setattr(M, "loss_chunk_size", lambda vocab: 6)
    m = tiny_model()
    tokens = torch.randint(0, 300, (2, 20))
    labels = torch.randint(0, 300, (2, 20))
    labels[1, 3:9] = -100
    with torch.no_grad():
        ref = F.cross_entropy(m(tokens).transpose(1, 2), labels, ignore_index=-100, reduction="none")
    losses = m(tokens, labels=labels, reduction="none")  # grad mode on: nothing is kept for backward
    assert losses.shape == (2, 20) and losses.dtype == torch.float32 and not losses.requires_grad
    assert torch.allclose(losses, ref, atol=1e-5) and (losses[1, 3:9] == 0).all()
