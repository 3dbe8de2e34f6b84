"""The model's block choices, each against a reference computed another way; the KV cache for every
combination; model.json round trips; no Python work per token or per head."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmstages.blocks import MLP, CausalSelfAttention, apply_rope, make_norm, rope_tables
from llmstages.checkpoint import load_checkpoint, save_checkpoint
from llmstages.model import GPT, GPTConfig, KVCache, build_config, flops_per_token, num_params
from llmstages.sampling import generate_tokens
from llmstages.store import Store
from llmstages.tokenizer import train_bpe


def config(**kw) -> GPTConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


# --- each block by another computation ---------------------------------------------------------------
def test_rope_is_the_rotation_of_each_pair_by_position_times_frequency():
    T, D, theta = 5, 8, 100.0
    x = torch.randn(1, 1, T, D, dtype=torch.float64)
    cos, sin = rope_tables(torch.arange(T), D, theta)
    got = apply_rope(x.float(), cos, sin).double()
    expected = torch.empty_like(x)
    for p in range(T):
        for i in range(D // 2):
            angle = p * theta ** (-2 * i / D)
            a, b = x[0, 0, p, i], x[0, 0, p, i + D // 2]  # Llama's half-split pairing
            expected[0, 0, p, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[0, 0, p, i + D // 2] = a * math.sin(angle) + b * math.cos(angle)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation keeps lengths


def test_rope_scores_depend_only_on_the_distance_between_positions():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope_tables(torch.tensor([pq]), 16, 10000.0)
        ck, sk = rope_tables(torch.tensor([pk]), 16, 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_rmsnorm_by_hand():
    norm = make_norm(config(norm="rmsnorm"), 32)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-5)
    assert not hasattr(norm, "bias")


def test_layernorm_without_bias_has_none():
    assert make_norm(config(bias=False), 32).bias is None
    assert make_norm(config(), 32).bias is not None


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor, qk_norm: bool) -> torch.Tensor:
    """Attention with each kv head copied to its group of query heads, softmax written out."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    w = attn.c_attn.weight  # (H*D + 2*Hkv*D, C)
    q = (x @ w[:H * D].t()).view(B, T, H, D).transpose(1, 2)
    k = (x @ w[H * D:(H + Hkv) * D].t()).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ w[(H + Hkv) * D:].t()).view(B, T, Hkv, D).transpose(1, 2)
    if qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.k_norm.weight
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.c_proj.weight.t()


@pytest.mark.parametrize("n_kv_head,qk_norm", [(4, False), (2, False), (1, True), (2, True)])
def test_grouped_query_attention_equals_attention_with_repeated_kv_heads(n_kv_head, qk_norm):
    torch.manual_seed(0)
    attn = CausalSelfAttention(config(n_kv_head=n_kv_head, qk_norm=qk_norm, bias=False), 0).eval()
    assert attn.c_attn.weight.shape == ((4 + 2 * n_kv_head) * 8, 32)
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.normal_()
            attn.k_norm.weight.normal_()
    x = torch.randn(2, 7, 32)
    assert torch.allclose(attn(x), reference_attention(attn, x, qk_norm), atol=1e-5)


@pytest.mark.parametrize("kind", ["gelu", "relu2", "swiglu"])
def test_mlp_by_hand(kind):
    torch.manual_seed(0)
    mlp = MLP(config(mlp=kind, bias=False))
    x = torch.randn(2, 3, 32)
    h = x @ mlp.c_fc.weight.t()
    if kind == "swiglu":
        assert mlp.c_fc.weight.shape == (2 * 128, 32) and mlp.c_proj.weight.shape == (32, 128)  # 8/3*32 -> 128
        gate, up = h[..., :128], h[..., 128:]
        h = gate * torch.sigmoid(gate) * up
    elif kind == "relu2":
        h = torch.clamp(h, min=0) ** 2
    else:
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    assert torch.allclose(mlp(x), h @ mlp.c_proj.weight.t(), atol=1e-5)


def test_softcap_bounds_the_logits_and_the_loss_uses_the_capped_logits():
    torch.manual_seed(0)
    cap = 2.0
    model = GPT(config(logit_softcap=cap, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # raw logits beyond the cap
    x, y = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    raw = model.lm_head(model.hidden(x))
    assert raw.abs().max() > 3 * cap
    logits = model(x)
    assert torch.allclose(logits, cap * torch.tanh(raw / cap), atol=1e-6)
    assert logits.abs().max() <= cap
    plain = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = model(x, targets=y)  # the chunked CPU path, which applies the cap chunk by chunk
    chunked.backward()
    assert torch.allclose(chunked, plain, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name


def test_presets_and_overrides():
    modern = build_config("tiny", vocab_size=97, arch="modern")
    assert (modern.pos_emb, modern.norm, modern.mlp, modern.qk_norm, modern.bias, modern.tie_embeddings,
            modern.logit_softcap) == ("rope", "rmsnorm", "relu2", True, False, False, 15.0)
    model = GPT(modern)
    assert "transformer.wpe.weight" not in model.state_dict()  # no learned positions
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not any(n.endswith(".bias") for n in model.state_dict())
    assert build_config("tiny", vocab_size=97, arch="modern", mlp="swiglu", bias=True).mlp == "swiglu"
    assert build_config("tiny", vocab_size=97).is_gpt2() and not modern.is_gpt2()
    with pytest.raises(ValueError, match="n_kv_head"):
        config(n_kv_head=3)


def test_flops_count_the_weights_of_each_block_choice():
    for kw in [{}, dict(mlp="swiglu", n_kv_head=2, tie_embeddings=False), dict(mlp="relu2", n_kv_head=1)]:
        cfg = config(**kw)
        model = GPT(cfg)
        matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
        expected = 3 * (2 * (matrices + 32 * 97) + 4 * 2 * 16 * 32)
        assert flops_per_token(cfg, 16) == expected, kw


# --- the KV cache for every combination --------------------------------------------------------------
COMBOS = [
    dict(),  # gpt2
    dict(arch="modern", pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False,
         tie_embeddings=False, logit_softcap=15.0),
    dict(pos_emb="rope", mlp="swiglu", n_kv_head=2),
    dict(pos_emb="rope", norm="rmsnorm", n_kv_head=1, qk_norm=True, logit_softcap=5.0),
    dict(pos_emb="learned", norm="rmsnorm", mlp="relu2", n_kv_head=2, bias=False, tie_embeddings=False),
    dict(pos_emb="rope", mlp="swiglu", qk_norm=True, bias=False, num_classes=3),
]


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "gpt2")
def test_kv_cache_equals_full_recomputation(kw):
    torch.manual_seed(0)
    model = GPT(config(**kw)).eval()
    idx = torch.randint(0, 97, (2, 14))
    full = model(idx)
    cache = KVCache(model.config, 2, 32, torch.device("cpu"), torch.float32)
    pieces = [model(idx[:, :5], cache), model(idx[:, 5:9], cache)]  # chunked prefill (offset mask)
    pieces += [model(idx[:, t:t + 1], cache) for t in range(9, 14)]  # one token at a time
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    if not model.is_classifier:
        prompt = [5, 17, 42]
        with_cache = list(generate_tokens(model, prompt, max_new_tokens=40, use_cache=True))
        without = list(generate_tokens(model, prompt, max_new_tokens=40, use_cache=False))
        assert with_cache[:29] == without[:29]  # the same until the context (32) is full
        assert len(with_cache) == 40


# --- model.json -----------------------------------------------------------------------------------------
def test_model_json_round_trip_rebuilds_the_same_model(tmp_path):
    tok = train_bpe(["the king shall speak of love and war " * 20], 280)
    torch.manual_seed(0)
    cfg = build_config("tiny", vocab_size=tok.vocab_size, arch="modern", mlp="swiglu", n_head=4, n_kv_head=2,
                       block_size=32, lora_rank=2, lora_targets=["c_attn", "c_fc"])
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    path = save_checkpoint(Store(tmp_path), "m", 1, model, tok, {"task": "pretrain"})
    saved = json.loads((path / "model.json").read_text())
    assert {k: saved[k] for k in ("arch", "pos_emb", "mlp", "n_kv_head", "tie_embeddings", "logit_softcap")} == \
        {"arch": "modern", "pos_emb": "rope", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False,
         "logit_softcap": 15.0}
    loaded = load_checkpoint("m", Store(tmp_path))
    assert loaded.model.config == cfg
    idx = torch.randint(0, tok.vocab_size, (2, 12))
    assert torch.equal(loaded.model.eval()(idx), model(idx))
    prompt = [3, 4, 5]
    assert list(generate_tokens(loaded.model, prompt, max_new_tokens=10)) == \
        list(generate_tokens(model, prompt, max_new_tokens=10))


def test_old_model_json_without_the_block_fields_loads_as_gpt2():
    old = {"vocab_size": 97, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
           "bias": True, "num_classes": 0, "class_names": [], "lora_rank": 0, "lora_alpha": 16.0,
           "lora_dropout": 0.0, "lora_targets": []}  # a model.json from before the block choices
    cfg = GPTConfig.from_dict(old)
    assert cfg.is_gpt2() and cfg.arch == "gpt2"
    model = GPT(cfg)
    assert "transformer.wpe.weight" in model.state_dict() and model.head_is_tied


def test_untied_head_is_saved_and_loaded():
    torch.manual_seed(0)
    model = GPT(config(tie_embeddings=False))
    state = model.state_for_saving()
    assert "lm_head.weight" in state
    other = GPT(config(tie_embeddings=False))
    other.load_saved_state(state)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="lm_head"):
        other.load_saved_state({k: v for k, v in state.items() if k != "lm_head.weight"})
    assert num_params(model) == num_params(GPT(config())) + 97 * 32


# --- speed: no Python work per token or per head ------------------------------------------------------
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_forward(kw: dict, T: int) -> int:
    model = GPT(config(**kw)).eval()
    idx = torch.randint(0, 97, (2, T))
    with torch.no_grad(), CountOps() as counter:
        model(idx)
    return counter.count


@pytest.mark.parametrize("kw", COMBOS[1:4], ids=["modern", "swiglu-gqa", "rope-qknorm-softcap"])
def test_the_number_of_tensor_ops_does_not_grow_with_tokens_or_heads(kw):
    assert ops_per_forward(kw, 4) == ops_per_forward(kw, 32)
    groups = 2 if kw.get("n_kv_head") else 0  # (Hkv = 1 takes one more layout copy per layer than Hkv > 1)
    four_heads = ops_per_forward(dict(kw, n_kv_head=groups), 32)
    eight_heads = ops_per_forward(dict(kw, n_head=8, n_embd=64, n_kv_head=2 * groups), 32)  # D = 8 in both
    assert four_heads == eight_heads


def test_hf_export_refuses_a_model_that_is_not_gpt2(tmp_path):
    from llmstages.checkpoint import Checkpoint
    from llmstages.errors import UserError
    from llmstages.interop import export_hf

    tok = train_bpe(["the king shall speak of love and war " * 20], 280)
    model = GPT(build_config("tiny", vocab_size=tok.vocab_size, arch="modern"))
    with pytest.raises(UserError, match="GPT-2 models"):
        export_hf(Checkpoint(model, tok, {}, None), tmp_path / "out", force=False)
    assert not (tmp_path / "out").exists()
