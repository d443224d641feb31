"""The Stable Diffusion conditional U-Net, written to be read top to bottom.

Module attribute names reproduce the original CompVis `openaimodel.py` ones
(`input_blocks.1.1.transformer_blocks.0.attn2.to_k`, placeholders such as
`out_layers.2` Dropout included; SDXL's `label_emb.0.0` / `label_emb.0.2` as in Stability's sgm code),
so the `model.diffusion_model.*` tensors of any SD 1.x / 2.x / XL checkpoint load with
`load_state_dict(strict=True)` and no renaming.

SDXL is the same network with a transformer depth per level, no attention at full resolution, and an
added conditioning vector `y` (pooled text + size/crop features, ldm.conditioning.sdxl.label_vector)
embedded by `label_emb` and summed into the time embedding.

Shape notation: B batch, C channels, H/W latent height/width, L = H*W tokens,
T text tokens, D context (text embedding) width, nh heads, hd head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    """Everything needed to build a UNet; stored with every checkpoint we write."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with a SpatialTransformer
    num_heads: int | None = 8  # fixed head count (SD1) ...
    head_dim: int | None = None  # ... or fixed head width (SD2); exactly one is set
    context_dim: int = 768
    transformer_depth: int | tuple[int, ...] = 1  # blocks per SpatialTransformer: one for all, or one per level
    middle_transformer_depth: int | None = None  # None: the depth of the deepest attention level
    use_linear_projection: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 convs
    adm_in_channels: int | None = None  # SDXL: width of the added conditioning vector y (label_emb); None: none
    norm_groups: int = 32
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)  # free-form metadata (e.g. prediction type), never read by the model

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_levels = tuple(int(a) for a in self.attention_levels)
        if isinstance(self.transformer_depth, (list, tuple)):
            self.transformer_depth = tuple(int(d) for d in self.transformer_depth)
            if len(self.transformer_depth) != len(self.channel_mult):
                raise ValueError(
                    f"UNetConfig: transformer_depth {self.transformer_depth} needs one entry per level "
                    f"({len(self.channel_mult)})"
                )
        depths = [self.depth_at(a) for a in self.attention_levels if 0 <= a < len(self.channel_mult)]
        if any(d < 1 for d in depths) or (
            self.middle_transformer_depth is not None and self.middle_transformer_depth < 1
        ):
            raise ValueError(
                f"UNetConfig: transformer depth must be >= 1 at every attention level {self.attention_levels}, "
                f"got {self.transformer_depth} (middle {self.middle_transformer_depth})"
            )
        if self.adm_in_channels is not None and self.adm_in_channels < 1:
            raise ValueError(f"UNetConfig: adm_in_channels must be positive or None, got {self.adm_in_channels}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads (SD1 style) or head_dim (SD2 style)")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig: channel_mult must be positive integers, got {self.channel_mult}")
        bad = [a for a in self.attention_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ValueError(f"UNetConfig: attention_levels {bad} outside 0..{len(self.channel_mult) - 1}")
        for ch in {self.model_channels * m for m in self.channel_mult}:
            if ch % self.norm_groups:
                raise ValueError(f"UNetConfig: channel width {ch} is not divisible by norm_groups={self.norm_groups}")
            if self.num_heads is not None and ch % self.num_heads:
                raise ValueError(f"UNetConfig: channel width {ch} is not divisible by num_heads={self.num_heads}")
            if self.head_dim is not None and ch % self.head_dim:
                raise ValueError(f"UNetConfig: channel width {ch} is not divisible by head_dim={self.head_dim}")

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (CLIP ViT-L/14 context, 8 heads everywhere)."""
        return cls()

    @classmethod
    def sd21(cls) -> UNetConfig:
        """Stable Diffusion 2.x (OpenCLIP ViT-H/14 context, 64-wide heads, linear projections)."""
        return cls(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)

    @classmethod
    def sdxl(cls) -> UNetConfig:
        """SDXL base (2,567,463,684 parameters): three levels, no attention at full resolution, 2 and 10
        transformer blocks below (10 in the middle), 64-wide heads, CLIP-L + bigG context (2048 wide), and
        a 2816-wide added vector (1280 pooled bigG + 6 size/crop ids x 256 sinusoidal features)."""
        return cls(
            channel_mult=(1, 2, 4),
            attention_levels=(1, 2),
            num_heads=None,
            head_dim=64,
            context_dim=2048,
            transformer_depth=(0, 2, 10),
            use_linear_projection=True,
            adm_in_channels=2816,
        )

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL refiner (2,259,526,660 parameters): 384 channels, four levels, 4 transformer blocks at the two
        middle levels and in the middle, bigG context (1280 wide), and a 2560-wide added vector (1280 pooled
        + 5 ids: original size, crop, aesthetic score)."""
        return cls(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            attention_levels=(1, 2),
            num_heads=None,
            head_dim=64,
            context_dim=1280,
            transformer_depth=4,
            use_linear_projection=True,
            adm_in_channels=2560,
        )

    def depth_at(self, level: int) -> int:
        """Transformer blocks of the SpatialTransformers at a level."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

    @property
    def middle_depth(self) -> int:
        """Transformer blocks of the middle block's SpatialTransformer."""
        if self.middle_transformer_depth is not None:
            return self.middle_transformer_depth
        if not self.attention_levels:
            return self.depth_at(len(self.channel_mult) - 1)
        return self.depth_at(max(self.attention_levels))

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of the attention at a given channel width."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        assert self.head_dim is not None  # validated at construction: one of the two is set
        return channels // self.head_dim, self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features [cos | sin] (Vaswani et al. 2017, as in DDPM). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes float16 inputs in float32 (as the original code), cast back.

    bfloat16 runs natively: its kernels accumulate in float32 already and its range is float32's,
    so the round trip through a float32 copy would only cost time.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.bfloat16):
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip path."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(inplace=True), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(inplace=True),  # on the norm's fresh output: one memory pass instead of two
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # (B, C) -> (B, C, 1, 1)
        h = self.out_layers(h)
        return self.skip_connection(x) + h


# Per-call state: the cross-attention keys/values of the text, cached for one sampling call
# (UNet.cached_context). A context variable, not a module attribute: DESIGN.md says per-call state
# belongs to the call, so that two threads (or tasks) sampling with one U-Net never share it.
_KV_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ldm_unet_kv_cache", default=None)


def kv_cache_active() -> bool:
    """Whether this thread / task is inside a `UNet.cached_context` block."""
    return _KV_CACHE.get() is not None


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.is_cross = context_dim is not None  # attends to the text (attn2), not to itself (attn1)
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.query_chunk: int | None = None  # set by UNet.set_attention_slicing

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = context.shape
        k = self.to_k(context).view(B, T, self.heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        v = self.to_v(context).view(B, T, self.heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.to_q(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, nh, L, hd)
        cache = _KV_CACHE.get() if context is not None and not torch.is_grad_enabled() else None
        if cache is not None:
            hit = cache.get((id(self), id(context)))
            if hit is None or hit[0] is not context:  # the context is kept alive in the entry: ids stay unique
                hit = cache[(id(self), id(context))] = (context, *self.key_value(context))  # type: ignore[arg-type]
            k, v = hit[1], hit[2]
        else:
            k, v = self.key_value(x if context is None else context)  # self- or cross-attention
        n = self.query_chunk
        if n and L > n:  # each query row's softmax is its own: chunks of queries give the same result
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + n], k, v) for i in range(0, L, n)], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v: (B, nh, L, hd)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, nh*hd)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2x width, half of it gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Image features -> tokens, transformer blocks conditioned on the text, -> image features (residual)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int,
        context_dim: int,
        groups: int,
        use_linear: bool,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, C, H, W) -> (B, L, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, L, C) -> (B, C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` is the next skip's size, so latents whose side is not a multiple of
        # 2**levels still line up (the original code would fail; diffusers does the same).
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.ModuleList):
    """A list of layers, each given what it needs (time embedding, text context or target size)."""

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """unet(x, t, context) -> prediction (epsilon or v, whatever the weights were trained for).

    x: (B, in_channels, H, W) latents, t: (B,) or scalar timesteps, context: (B, T, context_dim).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        self.gradient_checkpointing = False
        mc, groups = c.model_channels, c.norm_groups
        emb_ch = mc * 4

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, hd = c.heads_at(ch)
            return SpatialTransformer(ch, heads, hd, depth, c.context_dim, groups, c.use_linear_projection, c.dropout)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if c.adm_in_channels is not None:  # sgm's nesting: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(c.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mc * mult, groups, c.dropout)]
                ch = mc * mult
                if level in c.attention_levels:
                    layers.append(transformer(ch, c.depth_at(level)))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            [
                ResBlock(ch, emb_ch, ch, groups, c.dropout),
                transformer(ch, c.middle_depth),
                ResBlock(ch, emb_ch, ch, groups, c.dropout),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, mc * mult, groups, c.dropout)]
                ch = mc * mult
                if level in c.attention_levels:
                    layers.append(transformer(ch, c.depth_at(level)))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(inplace=True), nn.Conv2d(mc, c.out_channels, 3, padding=1)
        )

    @contextlib.contextmanager
    def cached_context(self, *contexts: torch.Tensor):
        """Inside this block, every cross-attention computes the keys and values of a context tensor once,
        at its first use, not at each call: they depend only on the text, the same at every sampling step.

            with unet.cached_context():
                for t in timesteps:
                    eps = unet(x, t, context)

        The cache belongs to the block (a context variable: per thread and per asyncio task), never to the
        modules, so threads sampling with one U-Net keep their own. `contexts` are accepted for the
        older call style `cached_context(context)` and need not be listed. Not used while gradients are on.
        """
        token = _KV_CACHE.set({})
        try:
            yield self
        finally:
            _KV_CACHE.reset(token)

    def set_attention_slicing(self, query_chunk: int | None) -> UNet:
        """Run attention on at most `query_chunk` queries at a time (None: all at once).

        Only matters where scaled_dot_product_attention falls back to its plain kernel, which holds
        the whole (L x L) score matrix: 2 x 8 x 16384^2 floats = 17 GB for one 1024x1024 SD1 step
        (e.g. on Apple MPS). The flash / memory-efficient kernels used on CPUs and CUDA GPUs never
        hold it, so there it only costs time.
        """
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1 or None, got {query_chunk}")
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.query_chunk = query_chunk
        return self

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y: the added conditioning vector (B, adm_in_channels) of an SDXL U-Net; None for SD1/SD2."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        dtype = self.time_embed[0].weight.dtype  # the model's parameter dtype
        assert isinstance(dtype, torch.dtype)
        emb = timestep_embedding(t, self.config.model_channels).to(dtype)
        emb = self.time_embed(emb)  # (B, 4*model_channels)
        if self.config.adm_in_channels is not None:
            if y is None or y.shape != (B, self.config.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(
                    f"this U-Net (SDXL-like) takes an added conditioning vector y of shape "
                    f"({B}, {self.config.adm_in_channels}), got {got}; see ldm.conditioning.sdxl.label_vector"
                )
            emb = emb + self.label_emb(y.to(dtype))
        elif y is not None:
            raise ValueError("this U-Net (SD1/SD2-like) takes no added conditioning vector y; pass y=None")

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # skip concatenation along channels
            # an upsampling block must reach the size of the skip it will meet next
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, h, emb, context, size)
        return self.out(h)


@torch.no_grad()
def random_weights_(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Fill every parameter with seeded random values (for parity tests and benchmarks).

    Matrices/kernels get uniform values of variance scale**2/fan_in so activations stay O(1)
    through the whole net (uniform: twice as fast to draw as normal at 860M parameters);
    vectors (biases, norm affines) get 0.1-scale noise around their usual value. Works on
    modules built on the `meta` device (materialized on CPU first).
    """
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
    g = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            bound = math.sqrt(3.0) * scale / math.sqrt(p[0].numel())  # std = scale / sqrt(fan_in)
            p.uniform_(-bound, bound, generator=g)
        else:
            base = 1.0 if name.endswith("weight") else 0.0  # norm gains around 1, biases around 0
            p.uniform_(base - 0.17, base + 0.17, generator=g)
    return module
