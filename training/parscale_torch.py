"""ParScale (arXiv 2505.10475) on a Qwen2 backbone, written from the arithmetic in
fixtures/golden/README.md. Used for training (stage 1 and stage 2) and evaluation.

Module and parameter names follow the published Hugging Face checkpoints, so that
`state_dict()` keys are exactly the tensor names that `parscale convert` reads:
  model.embed_tokens.weight
  model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}, o_proj.weight, prefix_k, prefix_v
  model.layers.N.mlp.{gate,up,down}_proj.weight
  model.layers.N.{input,post_attention}_layernorm.weight
  model.norm.weight
  model.aggregate_layer.{0,2}.{weight,bias}            (P > 1)
  lm_head.weight                                       (only when not tied)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sdpa_math(q, k, v, attn_mask=None, is_causal=False):
    """scaled_dot_product_attention for PyTorch < 2.0 (Debian bookworm's 1.13, used for CPU
    tests of training/): the same arithmetic, without fused kernels."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


sdpa = getattr(F, "scaled_dot_product_attention", _sdpa_math)


@dataclass
class Cfg:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    parscale_n: int = 1
    parscale_n_tokens: int = 0  # prefix tokens per layer per stream (0 = none)
    parscale_attn_smooth: float = 0.01
    dropout: float = 0.0  # training only (residual-branch dropout); not part of the checkpoint

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @staticmethod
    def from_hf(d: dict) -> "Cfg":
        p = int(d.get("parscale_n", 1) or 1)
        return Cfg(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", 10000.0),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            parscale_n=p,
            parscale_n_tokens=int(d.get("parscale_n_tokens", 0) or 0) if p > 1 else 0,
            parscale_attn_smooth=float(d.get("parscale_attn_smooth", 0.01)),
        )


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rope_tables(seq: int, head_dim: int, theta: float, device):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq, device=device, dtype=torch.float32)  # real tokens start at 0
    f = torch.outer(pos, inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x, cos, sin):
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c: Cfg, n_prefix_streams: int):
        super().__init__()
        self.c = c
        hd = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, c.hidden_size, bias=False)
        self.n_streams = n_prefix_streams
        if c.parscale_n_tokens > 0:
            shp = (n_prefix_streams, c.num_key_value_heads, c.parscale_n_tokens, hd)
            self.prefix_k = nn.Parameter(torch.zeros(shp))
            self.prefix_v = nn.Parameter(torch.zeros(shp))
        self.capture = None  # when a list: forward appends the un-rotated k and v
        self.nested_in = None  # another Attention whose first n_streams prefixes are this one's (nested_prefixes)

    def nest_prefixes_in(self, larger: "Attention"):
        """Use the first n_streams prefixes of `larger` (same layer, more streams) instead of own ones."""
        assert larger.n_streams >= self.n_streams and self.c.parscale_n_tokens > 0
        del self.prefix_k, self.prefix_v
        object.__setattr__(self, "nested_in", larger)  # a plain reference: not a submodule, not in state_dict

    def prefixes(self):
        if self.nested_in is not None:
            return self.nested_in.prefix_k[: self.n_streams], self.nested_in.prefix_v[: self.n_streams]
        return self.prefix_k, self.prefix_v

    def forward(self, x, cos, sin):
        c = self.c
        n, s, _ = x.shape
        hd = c.head_dim
        q = self.q_proj(x).view(n, s, c.num_attention_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(n, s, c.num_key_value_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(n, s, c.num_key_value_heads, hd).transpose(1, 2)
        if self.capture is not None:
            self.capture.append((k.detach(), v.detach()))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        rep = c.num_attention_heads // c.num_key_value_heads
        if c.parscale_n_tokens > 0:
            b = n // self.n_streams
            # stream-major batch: row i belongs to stream i // b
            prefix_k, prefix_v = self.prefixes()
            pk = prefix_k.to(k.dtype).repeat_interleave(b, dim=0)
            pv = prefix_v.to(v.dtype).repeat_interleave(b, dim=0)
            k = torch.cat([pk, k], dim=2)  # prefix keys are not rotated
            v = torch.cat([pv, v], dim=2)
            t = c.parscale_n_tokens
            mask = torch.ones(s, t + s, dtype=torch.bool, device=x.device)
            mask[:, t:] = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            o = sdpa(q, k, v, attn_mask=mask)
        else:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            o = sdpa(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(n, s, c.num_attention_heads * hd)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: Cfg, n_streams: int):
        super().__init__()
        self.self_attn = Attention(c, n_streams)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.drop = c.dropout

    def forward(self, x, cos, sin):
        p = self.drop if self.training else 0.0
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin), p, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p, self.training)


class Inner(nn.Module):
    def __init__(self, c: Cfg, n_streams: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Layer(c, n_streams) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.parscale_n > 1:
            p, h = c.parscale_n, c.hidden_size
            self.aggregate_layer = nn.Sequential(nn.Linear(p * h, h), nn.SiLU(), nn.Linear(h, p))


class ParScaleLM(nn.Module):
    """P = cfg.parscale_n streams. P == 1 with parscale_n_tokens == 0 is plain Qwen2.
    (P == 1 with prefix tokens is allowed for the prefix-tuning control run.)"""

    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.P = max(1, c.parscale_n)
        self.model = Inner(c, self.P)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def head_weight(self):
        return self.model.embed_tokens.weight if self.c.tie_word_embeddings else self.lm_head.weight

    def hidden(self, ids):
        c, P = self.c, self.P
        b, s = ids.shape
        x = self.model.embed_tokens(ids)
        if P > 1:
            x = x.repeat(P, 1, 1)  # (p b) s h, stream-major
        cos, sin = rope_tables(s, c.head_dim, c.rope_theta, ids.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        if P > 1:
            dt = x.dtype
            xs = x.view(P, b, s, c.hidden_size)
            feat = xs.permute(1, 2, 3, 0).reshape(b, s, c.hidden_size * P)  # feature h*P + p
            w = torch.softmax(self.model.aggregate_layer(feat).float(), dim=-1)
            sm = c.parscale_attn_smooth
            w = w * (1 - sm) + sm / P
            x = (xs.permute(1, 2, 0, 3) * w.unsqueeze(-1)).sum(dim=2).to(dt)
        return x

    def forward(self, ids):
        x = self.hidden(ids)
        return F.linear(x, self.head_weight().to(x.dtype))

    def loss(self, ids, targets):
        logits = self.forward(ids)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    # ---- helpers -------------------------------------------------------------
    def init_backbone(self, seed: int, std: float = 0.02):
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if "prefix_" in name or "aggregate_layer" in name:
                continue
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        # scaled init of the residual-branch outputs (GPT-2 style)
        nl = self.c.num_hidden_layers
        with torch.no_grad():
            for layer in self.model.layers:
                layer.self_attn.o_proj.weight.mul_(1 / math.sqrt(2 * nl))
                layer.mlp.down_proj.weight.mul_(1 / math.sqrt(2 * nl))

    def parscale_parameters(self):
        return [p for n, p in self.named_parameters() if "prefix_" in n or "aggregate_layer" in n]

    def backbone_state(self):
        return {k: v for k, v in self.state_dict().items() if "prefix_" not in k and "aggregate_layer" not in k}

    def parscale_state(self):
        out = {k: v for k, v in self.state_dict().items() if "prefix_" in k or "aggregate_layer" in k}
        for i, layer in enumerate(self.model.layers):  # nested prefixes: this arm's slice of the larger arm's
            if layer.self_attn.nested_in is not None:
                pk, pv = layer.self_attn.prefixes()
                out[f"model.layers.{i}.self_attn.prefix_k"] = pk.detach()
                out[f"model.layers.{i}.self_attn.prefix_v"] = pv.detach()
        return out
