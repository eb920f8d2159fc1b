"""
A GPT with three kinds of position information, side by side:

  pos="learned"  learned absolute position embeddings (GPT-2, nanoGPT)
  pos="rope"     rotary position embedding (RoPE) after real Q/K/V projections
  pos="crope"    CRoPE (arXiv 2601.02728): the same rotation after *complex-linear* Q/K/V
                 projections, which have half the parameters

Everything is real arithmetic on interleaved pairs: coordinates (2j, 2j+1) of a vector are
read as one complex number z_j = x[2j] + i x[2j+1]. No complex dtypes on the hot path, so
torch.compile works.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

POS_KINDS = ("learned", "rope", "crope")
# how rotary angles reach past the trained context: "Context extension", after the model
ROPE_SCALINGS = ("extrapolate", "linear", "ntk", "yarn", "llama3")


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms, like GPT-2; False is faster and no worse
    pos: str = "crope"  # one of POS_KINDS
    rope_base: float = 10000.0
    complex_out: bool = False  # CRoPE only: complex-linear output projection too (not in the paper)
    # context extension (GPT.extend_context): the context the weights were trained at, and the
    # method that maps block_size positions onto it; trained_block_size None means block_size
    trained_block_size: int | None = None
    rope_scaling: str = "extrapolate"  # one of ROPE_SCALINGS

    def __post_init__(self):
        if self.trained_block_size is None:
            self.trained_block_size = self.block_size
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "trained_block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_base <= 0 or not math.isfinite(self.rope_base):
            raise ValueError(f"rope_base must be a positive number, got {self.rope_base}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos not in POS_KINDS:
            raise ValueError(f"pos must be one of {', '.join(POS_KINDS)}, got {self.pos!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size n_embd/n_head = {self.n_embd // self.n_head} must be even: "
                             "rotary embeddings rotate pairs of coordinates")
        if self.complex_out and self.pos != "crope":
            raise ValueError("complex_out=True needs pos='crope'")
        if self.rope_scaling == "ntk" and self.head_size < 4:  # d / (d - 2) needs two pairs or more
            raise ValueError(f"rope_scaling 'ntk' needs a head size of at least 4, got {self.head_size}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        if self.trained_block_size > self.block_size:
            raise ValueError(f"trained_block_size ({self.trained_block_size}) cannot exceed block_size "
                             f"({self.block_size}): a context is extended, never shrunk")
        if self.pos == "learned" and self.trained_block_size != self.block_size:
            raise ValueError("a learned-position model has no positions past the table it was trained with: "
                             "only rope and crope models extend their context")

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def context_scale(self):
        """s = block_size / trained_block_size: how far the context was extended."""
        return self.block_size / self.trained_block_size


class ComplexLinear(nn.Module):
    """A complex-linear map C^(in/2) -> C^(out/2) acting on interleaved pairs of real features.

    With W = A + iB and z = x_re + i x_im, W z = (A x_re - B x_im) + i (B x_re + A x_im).
    As a real (out, in) matrix every 2x2 block is [[a, -b], [b, a]]: a rotation and a scaling,
    never a reflection. It stores a and b, in_features * out_features / 2 real numbers: half
    of nn.Linear's weight.
    """

    def __init__(self, in_features, out_features, bias=False):
        super().__init__()
        if in_features % 2 or out_features % 2:
            raise ValueError(f"ComplexLinear needs even feature counts, got {in_features} -> {out_features}")
        self.in_features, self.out_features = in_features, out_features
        # weight[o, i] = (a, b): real and imaginary part of complex weight W[o, i]
        self.weight = nn.Parameter(torch.empty(out_features // 2, in_features // 2, 2))
        # a complex bias has out/2 complex numbers: out real ones, as for nn.Linear
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def to_real_weight(self):
        """The equivalent dense real (out, in) matrix, built from 2x2 blocks [[a, -b], [b, a]]."""
        return real_block_matrix(self.weight)

    @classmethod
    def from_real_weight(cls, weight):
        """The nearest ComplexLinear (in Frobenius norm) to a real (out, in) weight: the
        rotation-and-scaling part of every 2x2 block, with the reflections dropped."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features).to(weight)
        identity, _, rotation, _ = basis_coefficients(weight.detach())
        layer.weight.data = torch.stack((identity, rotation), -1)
        return layer

    def forward(self, x):
        # one real GEMM with the block matrix: the simplest form, and the fused op's reference
        return F.linear(x, self.to_real_weight(), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def real_block_matrix(weight):
    """Complex weights (out/2, in/2, 2) -> the real (out, in) matrix of 2x2 blocks [[a, -b], [b, a]]."""
    a, b = weight.unbind(-1)                                                      # (out/2, in/2) each
    blocks = torch.stack((torch.stack((a, -b), -1), torch.stack((b, a), -1)), 1)  # (out/2, 2, in/2, 2)
    return blocks.reshape(2 * weight.size(0), 2 * weight.size(1))


def basis_coefficients(weight):
    """Coefficients of every 2x2 block [[p, q], [r, s]] of a real (out, in) weight on the paper's basis
    (section 3.2): identity s0, reflection about the 45 degree line s1 = [[0, 1], [1, 0]], 90 degree
    rotation s2 = [[0, -1], [1, 0]], reflection about the x axis s3 = [[1, 0], [0, -1]].

    block = c0 s0 + c1 s1 + c2 s2 + c3 s3. CRoPE keeps s0 and s2 (a = c0, b = c2). The basis is
    orthogonal with squared norm 2, so p^2 + q^2 + r^2 + s^2 = 2 (c0^2 + c1^2 + c2^2 + c3^2).
    Returns four (out/2, in/2) tensors c0, c1, c2, c3.
    """
    blocks = weight.unflatten(0, (-1, 2)).unflatten(-1, (-1, 2))       # (out/2, 2, in/2, 2)
    p, q = blocks[:, 0, :, 0], blocks[:, 0, :, 1]
    r, s = blocks[:, 1, :, 0], blocks[:, 1, :, 1]
    return (p + s) / 2, (q + r) / 2, (r - q) / 2, (p - s) / 2


def rope_frequencies(head_size, base):
    """RoPE's theta_j = base^(-2j / head_size), j < head_size / 2, in float64."""
    return base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)


def rotary_tables(n_positions, theta, scale=1.0):
    """scale * cos and scale * sin of m * theta_j for m < n_positions (theta: float64 frequencies).

    Angles are formed in float64 and stored in float32, so long positions keep their precision.
    Returns two (n_positions, len(theta)) tensors.
    """
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * theta[None, :]
    return (scale * angles.cos()).float(), (scale * angles.sin()).float()


def model_rotary_tables(config):
    """The rotary tables of a model: every position m < block_size, theta_j by the config's
    rope_scaling method, and YaRN's attention scale folded in (it multiplies q and k alike)."""
    s = config.context_scale
    theta = ROPE_FREQUENCIES[config.rope_scaling](config.head_size, config.rope_base, s, config.trained_block_size)
    return rotary_tables(config.block_size, theta, yarn_attention_scale(s) if config.rope_scaling == "yarn" else 1.0)


def apply_rotary(x, cos, sin):
    """Multiply every interleaved pair z_j = x[2j] + i x[2j+1] at position m by e^(i m theta_j).

    x: (B, T, H, hs); cos, sin: (T, hs/2), the rows of x's positions.
    (re + i im)(cos + i sin) = (re cos - im sin) + i (re sin + im cos).
    """
    re, im = x.unflatten(-1, (-1, 2)).unbind(-1)       # (B, T, H, hs/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]        # broadcast over heads
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).type_as(x)                  # float32 tables promote; cast back


class KVCache:
    """Keys and values of past positions, so that generation feeds one new token per step."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer, start_pos, k, v):
        """Store k, v (B, nh, T, hs) at start_pos and return all keys and values up to their end."""
        end = start_pos + k.size(2)
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.rotary = config.pos in ("rope", "crope")
        self.qkv_kernel = None  # a fused kernel that stands in for project_and_rotate (fused_op.use_kernel)
        # The one line where CRoPE differs from RoPE: complex-linear Q, K, V (stacked into one weight)
        qkv_linear = ComplexLinear if config.pos == "crope" else nn.Linear
        self.c_attn = qkv_linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        out_linear = ComplexLinear if config.complex_out else nn.Linear
        self.c_proj = out_linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def project_and_rotate(self, x, cos, sin):
        """The Q/K/V projection of x (B, T, C), then the rotation of q and k: q and k side by side (B, T, 2C), and v
        (B, T, C). In a CRoPE layer the fused op of csrc/ may stand in for this method, and only where both compute
        the same (fused_op.use_kernel checks that, every parameter of the layer drawn at random), so an edit here
        takes effect."""
        B, T, C = x.size()
        qk, v = self.c_attn(x).split([2 * C, C], dim=2)
        if self.rotary:  # q and k heads rotated in one pass
            qk = apply_rotary(qk.view(B, T, 2 * self.n_head, C // self.n_head), cos, sin).view(B, T, 2 * C)
        return qk, v

    def forward(self, x, cos, sin, start_pos=0, kv_cache=None):
        """x (B, T, C) at positions start_pos..start_pos+T-1; cos, sin (T, hs/2): the rotary tables' rows of them."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        if self.qkv_kernel is None:
            qk, v = self.project_and_rotate(x, cos, sin)
        else:
            qk, v = self.qkv_kernel(x, self.c_attn.weight, cos, sin, 2 * C).split([2 * C, C], dim=2)
        q, k = qk.view(B, T, 2 * nh, hs).transpose(1, 2).chunk(2, dim=1)      # (B, nh, T, hs) each
        v = v.view(B, T, nh, hs).transpose(1, 2)                             # (B, nh, T, hs)

        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)   # (B, nh, start_pos + T, hs)
        # Why no special attention kernel: for interleaved real vectors q . k = Re(q~^H k~),
        # the real part of the Hermitian product of their complex forms. With q~ = R_m u and
        # k~ = R_n w (R_m = diag(e^(i m theta)); u, w the projected query and key), the score is
        # Re(u^H R_(n-m) w): it depends on n - m only, and plain scaled dot-product attention computes
        # it. For CRoPE u = W_q x_m and w = W_k x_n with complex W, so Re(x_m^H W_q^H R_(n-m) W_k x_n).
        S = k.size(2)
        mask = None
        if T > 1 and S > T:  # new queries after cached keys: query i sees keys up to start_pos + i
            mask = torch.arange(S, device=x.device)[None, :] <= torch.arange(start_pos, S, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, start_pos=0, kv_cache=None):
        x = x + self.attn(self.ln_1(x), cos, sin, start_pos, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # rotary tables for every position: derived from the config, so not saved in checkpoints
        cos, sin = model_rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        # ComplexLinear draws a and b with std 0.02: its real matrix then has the same entry scale
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, start_pos=0, kv_cache=None):
        """Logits (B, T, vocab) for every position of idx (B, T), placed at start_pos..start_pos+T-1,
        and the mean cross-entropy against targets (B, T), or None without targets."""
        logits = self.lm_head(self.features(idx, start_pos, kv_cache))     # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def next_token_logits(self, idx, start_pos=0, kv_cache=None):
        """Logits (B, vocab) of the token after idx: generation needs the last position only."""
        return self.lm_head(self.features(idx, start_pos, kv_cache)[:, -1])

    def features(self, idx, start_pos=0, kv_cache=None):
        """The last layer's normalised states (B, T, C) of idx (B, T): what lm_head reads."""
        B, T = idx.size()
        if start_pos + T > self.config.block_size:
            raise ValueError(f"positions up to {start_pos + T} exceed block_size {self.config.block_size}")
        x = self.transformer.wte(idx)                                   # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(start_pos, start_pos + T, device=idx.device))
        x = self.transformer.drop(x)
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]  # (T, hs/2)
        for block in self.transformer.h:
            x = block(x, cos, sin, start_pos, kv_cache)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). The context is the last block_size tokens.

        With the KV cache, the first step feeds the prompt and every later step one new token, while
        the sequence fits in block_size. Once the window slides, every token moves to a new position
        and the dropped token still shapes the cached states of the later layers, so each step runs
        the whole window, as without a cache: the result is exactly generation without a cache.
        """
        block_size = self.config.block_size
        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype) if use_cache else None
        cached = 0  # positions held in the cache
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block_size:
                logits = self.next_token_logits(idx[:, cached:], start_pos=cached, kv_cache=cache)
                cached = idx.size(1)
            else:
                logits = self.next_token_logits(idx[:, -block_size:])
            idx = torch.cat((idx, sample_next(logits, temperature, top_k, top_p)), dim=1)
        return idx

    def flops_per_token(self):
        """Training FLOPs per token, as nanoGPT's estimate_mfu counts them: 6 per weight (a multiply-add
        forward, two backward) plus attention scores. A ComplexLinear costs what its dense real matrix
        costs, since that is how it runs; embedding lookups cost nothing."""
        c = self.config
        matrices = sum(2 * m.weight.numel() if isinstance(m, ComplexLinear) else m.weight.numel()
                       for m in self.modules() if isinstance(m, (nn.Linear, ComplexLinear)))
        return 6 * matrices + 12 * c.n_layer * c.block_size * c.n_embd

    def param_report(self):
        """Parameter counts by part: Q/K/V weights, output projection, MLP, embeddings, total."""
        def count(modules):
            return sum(p.numel() for m in modules for p in m.parameters())
        blocks = self.transformer.h
        embeddings = [m for name, m in self.transformer.items() if name in ("wte", "wpe")]
        report = dict(
            qkv=count(b.attn.c_attn for b in blocks),
            attn_out=count(b.attn.c_proj for b in blocks),
            mlp=count(b.mlp for b in blocks),
            embeddings=count(embeddings),
            norms=count([b.ln_1 for b in blocks] + [b.ln_2 for b in blocks] + [self.transformer.ln_f]),
            total=sum(p.numel() for p in self.parameters()),  # the tied lm_head counts once
        )
        report["attention"] = report["qkv"] + report["attn_out"]
        return report

    def extend_context(self, block_size, method=None):
        """The same weights with a longer context: positions up to block_size, rotary angles by method
        (one of ROPE_SCALINGS; None keeps the model's own, which is "extrapolate" for a model never
        extended), relative to the context the weights were trained at. KV cache and checkpoints work as
        for any model: the change is in the config and the rotary tables."""
        method = self.config.rope_scaling if method is None else method
        if block_size < self.config.block_size:
            raise ValueError(f"extend_context lengthens the context: block_size {block_size} is below the "
                             f"model's {self.config.block_size}")
        config = GPTConfig(**{**vars(self.config), "block_size": block_size, "rope_scaling": method})
        return self._with_config(config, self.state_dict())

    def _with_config(self, config, state):
        """A GPT of config on this model's device and dtype, holding the weights in state."""
        model = GPT(config).to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        model.load_state_dict(state)
        return model

    def to_rope(self):
        """An equivalent pos="rope" model with dense real weights; its logits equal this model's.

        The executable form of "CRoPE is a subset of RoPE": every ComplexLinear becomes the
        nn.Linear of its to_real_weight(), and nothing else changes.
        """
        if self.config.pos != "crope":
            raise ValueError(f"to_rope() converts a CRoPE model; this one has pos={self.config.pos!r}")
        config = GPTConfig(**{**vars(self.config), "pos": "rope", "complex_out": False})
        state = self.state_dict()
        for name, module in self.named_modules():
            if isinstance(module, ComplexLinear):
                state[name + ".weight"] = module.to_real_weight().detach()
        return self._with_config(config, state)

    def to_crope(self):
        """The nearest pos="crope" model to this RoPE model: every Q/K/V weight is projected onto
        the complex-linear ones (ComplexLinear.from_real_weight); everything else is kept."""
        if self.config.pos != "rope":
            raise ValueError(f"to_crope() projects a RoPE model; this one has pos={self.config.pos!r}")
        state = self.state_dict()
        for name, module in self.named_modules():
            if name.endswith("attn.c_attn"):
                state[name + ".weight"] = ComplexLinear.from_real_weight(module.weight).weight.detach()
        return self._with_config(GPTConfig(**{**vars(self.config), "pos": "crope"}), state)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """Draw one token per row from logits (B, vocab), after temperature, top-k and top-p (nucleus)."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1)


# ----------------------------------------------------------------------------- context extension

# Context extension: a model trained at context L runs at L' = s L. Each method changes the
# frequencies theta_j (a position m turns pair j by m theta_j); "extrapolate" keeps them.

def extrapolated_frequencies(head_size, base, s, trained_block_size):
    """No scaling: theta_j as trained, so positions past the trained context turn by angles the
    model never saw (the baseline of the ALiBi paper's protocol)."""
    return rope_frequencies(head_size, base)


def linear_frequencies(head_size, base, s, trained_block_size):
    """Position interpolation (Chen et al. 2023, arXiv 2306.15595): positions m -> m / s, so the
    longest new position turns by the angles of the longest trained one: theta_j -> theta_j / s."""
    return rope_frequencies(head_size, base) / s


def ntk_base(head_size, base, s):
    """NTK-aware scaling (bloc97 2023; rotary-embedding-torch's theta_rescale_factor) is RoPE with a larger
    base: base -> base * s^(d / (d - 2)), d = head_size. The fastest pair keeps its frequency, the slowest is
    interpolated by exactly s."""
    return base * s ** (head_size / (head_size - 2))


def ntk_frequencies(head_size, base, s, trained_block_size):
    """NTK-aware scaling: theta_j of RoPE with ntk_base."""
    return rope_frequencies(head_size, ntk_base(head_size, base, s))


def blend_frequencies(theta, s, kept):
    """theta_j -> kept_j theta_j + (1 - kept_j) theta_j / s: kept_j = 1 extrapolates pair j, 0 interpolates it."""
    return kept * theta + (1 - kept) * theta / s


def yarn_frequencies(head_size, base, s, trained_block_size, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023, arXiv 2309.00071) as its authors' code and Hugging Face transformers
    compute it ("NTK-by-parts"). Pair j turns L theta_j / 2pi times over the trained context L; it
    turns beta times at the pair index

        j(beta) = d ln(L / (2 pi beta)) / (2 ln base),        d = head_size.

    Pairs up to low = max(floor(j(beta_fast)), 0) keep theta_j, pairs from high = min(ceil(j(beta_slow)),
    d - 1) on are interpolated to theta_j / s, and a ramp linear in the pair index blends those between:
    kept_j = 1 - clamp((j - low) / (high - low), 0, 1).
    """
    def pair_turning(beta):
        return head_size * math.log(trained_block_size / (2 * math.pi * beta)) / (2 * math.log(base))

    low = max(math.floor(pair_turning(beta_fast)), 0)
    # the reference clamps at d - 1, not at the last pair d/2 - 1: the ramp may end past the last pair
    high = min(math.ceil(pair_turning(beta_slow)), head_size - 1)
    if high == low:  # at tiny contexts both ends fall on pair 0: the reference widens the ramp by 0.001
        high += 0.001
    pairs = torch.arange(head_size // 2, dtype=torch.float64)
    kept = 1 - ((pairs - low) / (high - low)).clamp(0, 1)
    return blend_frequencies(rope_frequencies(head_size, base), s, kept)


def yarn_attention_scale(s):
    """YaRN's attention temperature: q and k both scaled by 0.1 ln(s) + 1 (so the logits by its square)."""
    return 0.1 * math.log(s) + 1


def llama3_frequencies(head_size, base, s, trained_block_size, low_freq_factor=1, high_freq_factor=4):
    """Llama 3.1's scaling (Hugging Face transformers' "llama3"), by wavelength lambda_j = 2 pi / theta_j:
    pairs with lambda_j > L / low_freq_factor are interpolated to theta_j / s, pairs with
    lambda_j < L / high_freq_factor keep theta_j, and between, with r_j = L / lambda_j the turns over
    the trained context L, kept_j = (r_j - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    theta = rope_frequencies(head_size, base)
    turns = trained_block_size * theta / (2 * math.pi)
    kept = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return blend_frequencies(theta, s, kept)


ROPE_FREQUENCIES = {"extrapolate": extrapolated_frequencies, "linear": linear_frequencies, "ntk": ntk_frequencies,
                    "yarn": yarn_frequencies, "llama3": llama3_frequencies}
