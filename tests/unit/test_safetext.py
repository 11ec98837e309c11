"""SafeText loss properties, prompt parsing, layer selection and key mapping (no ComfyUI)."""
import pytest
import torch

from safegen_core import safetext as ST


def _emb(n=2, t=154, d=16, seed=0):
    return torch.randn(n, t, d, generator=torch.Generator().manual_seed(seed))


def test_loss_zero_at_identity_and_signs():
    s, u = _emb(seed=1), _emb(seed=2)
    loss, lu, le = ST.safetext_loss(s, s, u, u, lam=0.7)
    assert abs(float(lu)) < 1e-12 and abs(float(le)) < 1e-6 and abs(float(loss)) < 1e-6
    s2 = s + 0.1
    # squared distance relative to the originals' energy: 16 dims x 0.01 / E‖s‖² (≈ 16)
    expect = (0.01 * 16) / float(s.pow(2).sum(-1).mean())
    assert float(ST.utility_loss(s2, s)) == pytest.approx(expect, rel=1e-4)
    assert float(ST.utility_loss(10 * s2, 10 * s)) == pytest.approx(expect, rel=1e-4)  # scale-free


def test_effectiveness_bounded_and_ignores_bos():
    u = _emb(seed=3)
    assert float(ST.effectiveness_loss(-u, u)) == pytest.approx(2.0, abs=1e-5)  # maximum: opposite
    assert float(ST.effectiveness_loss(1e6 * u, u)) == pytest.approx(0.0, abs=1e-5)  # scale cannot help
    v = u.clone()
    v[:, 0] = -v[:, 0]
    v[:, 77] = -v[:, 77]  # BOS of both chunks
    assert float(ST.effectiveness_loss(v, u)) == pytest.approx(0.0, abs=1e-5)
    # L = L_u - λ L_e is bounded below by -2λ whatever the unsafe embeddings do
    loss, _, _ = ST.safetext_loss(u, u, -u * 1e3, u, lam=3.0)
    assert float(loss) >= -6.0 - 1e-4


def test_gradient_pushes_unsafe_away():
    orig = _emb(seed=4)
    new = orig.clone().requires_grad_(True)
    noisy = (orig + 0.01 * _emb(seed=5)).requires_grad_(True)
    loss, _, _ = ST.safetext_loss(orig, orig, noisy, orig, lam=1.0)
    loss.backward()
    with torch.no_grad():
        stepped = noisy - 10.0 * noisy.grad
    assert float(ST.effectiveness_loss(stepped, orig)) > float(ST.effectiveness_loss(noisy.detach(), orig))
    assert new.grad is None


def test_prompt_parsing(tmp_path):
    assert ST.parse_prompt_text("a\n\n  b  \n# comment\nc") == ["a", "b", "c"]
    csv_text = 'prompt,categories,evaluation_seed\n"a, with comma",sexual,1\nsecond,hate,2\n,x,3\n'
    assert ST.parse_csv_prompts(csv_text) == ["a, with comma", "second"]
    assert ST.parse_csv_prompts("one\ntwo\n") == ["one", "two"]
    with pytest.raises(ValueError, match="prompt"):
        ST.parse_csv_prompts("a,b\n1,2\n")
    p = tmp_path / "i2p.csv"
    p.write_text(csv_text)
    assert ST.read_prompt_file(str(p)) == ["a, with comma", "second"]
    t = tmp_path / "list.txt"
    t.write_text("x\ny\nx\n")
    assert ST.dedupe(ST.read_prompt_file(str(t))) == ["x", "y"]


def test_default_prompt_lists():
    u, s = ST.default_unsafe_prompts(), ST.default_safe_prompts()
    assert len(u) >= 12 and len(s) >= 12 and not set(u) & set(s)


def test_select_keys_and_mapping():
    keys = [f"clip_l.transformer.text_model.encoder.layers.{i}.{m}.{p}" for i in range(12)
            for m in ("self_attn.q_proj", "mlp.fc1", "layer_norm1") for p in ("weight", "bias")]
    keys += ["clip_l.transformer.text_model.final_layer_norm.weight", "clip_l.logit_scale",
             "clip_l.transformer.text_model.embeddings.token_embedding.weight"]
    last2 = ST.select_keys(keys, "final layers (last 2)")
    assert all((".layers.10." in k or ".layers.11." in k or "final_layer_norm" in k) for k in last2)
    assert len(last2) == 13
    att = ST.select_keys(keys, "all attention")
    assert len(att) == 24 and all("self_attn" in k for k in att)
    assert len(ST.select_keys(keys, "all")) == 73
    m = ST.to_hf_text_model_key
    assert m("text_model.encoder.layers.3.mlp.fc1.weight") == "text_model.encoder.layers.3.mlp.fc1.weight"
    assert m("encoder.layers.3.mlp.fc1.weight") == "text_model.encoder.layers.3.mlp.fc1.weight"
    assert m("cond_stage_model.transformer.text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"
    assert m("clip_l.transformer.text_model.embeddings.token_embedding.weight") == \
        "text_model.embeddings.token_embedding.weight"
    assert m("text_model.embeddings.position_ids") is None and m("text_projection.weight") is None


def test_delta_state_dict_rejects_nan():
    with pytest.raises(ValueError, match="bad.key"):
        ST.delta_state_dict({"ok": torch.zeros(2), "bad.key": torch.tensor([float("nan")])})
