"""LoRA adapters for the U-Net (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen layer y = W x + b gains a trainable low-rank update

    y = W x + b + (alpha / rank) * scale * B A dropout(x)      A = lora_down: (rank, in), B = lora_up: (out, rank)

B starts at zero, so a fresh adapter changes nothing. `alpha` is fixed when the adapter is made (and saved
with it); `scale` is a run-time knob (0 = base model), not saved.

Naming (the design choice). `add_lora` swaps each targeted layer for a `LoRALinear` that registers the
*same* weight and bias Parameters under the *same* names, next to its two small layers:

    input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight             unchanged, frozen
    input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight   new, trainable (A)
    input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight     new, trainable (B)

so every base tensor keeps its CompVis name (`base_state_dict` only drops the `lora_` keys, and
`merge_lora` / `remove_lora` give back a plain UNet), while the adapters stay ordinary submodules that
`.to()`, `copy.deepcopy` (EMA), DDP/FSDP gradient sync and gradient checkpointing all see. The
alternatives each lose one of these: keeping the Linear as a `.base` child renames every wrapped
weight (`to_q.base.weight`); `torch.nn.utils.parametrize` renames it too
(`to_q.parametrizations.weight.original`) and rebuilds the full (out, in) matrix on every call; a
forward hook keeps names but hides the adapter in a closure that deepcopy and `print(unet)` do not follow.

A 1x1 Conv2d (SD1's proj_in / proj_out) is a Linear over channels and is adapted the same way (its
lora_down / lora_up are 1x1 convs, as in kohya files). 3x3 convolutions (LoCon) are not supported.

Files: `save_lora` writes the kohya-ss / AUTOMATIC1111 layout that the SD ecosystem loads
(`lora_unet_<diffusers module path, dots -> underscores>.lora_down.weight` / `.lora_up.weight` /
`.alpha`); `load_lora` reads that, its CompVis-name variant (`lora_unet_input_blocks_1_1_...`,
kohya's SDXL spelling) and the diffusers / PEFT layouts, for SD1, SD2 and SDXL U-Nets. Text-encoder
tensors (`lora_te_`, SDXL's `lora_te1_` / `lora_te2_`, `text_encoder(_2).`) are skipped with a warning. A
LoRA made for the other family (SDXL on SD1/SD2 or back) is refused in one line saying so.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.formats.checkpoint import diffusers_key_map, read_state_dict, save_safetensors
from ldm.formats.metadata import LORA_KEY, UNET_CONFIG_KEY, load_json, safetensors_header
from ldm.models.unet import UNet, UNetConfig

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# the text-encoder parts of a LoRA file, by prefix: kohya writes one text encoder for SD1/SD2 and two for SDXL
TEXT_ENCODER_PARTS = {
    "lora_te_": "the text encoder",
    "lora_te1_": "SDXL's CLIP ViT-L",
    "lora_te2_": "SDXL's OpenCLIP ViT-bigG",
    "text_encoder.": "the (first) text encoder",
    "text_encoder_2.": "SDXL's OpenCLIP ViT-bigG",
}
TEXT_ENCODER_PREFIXES = tuple(TEXT_ENCODER_PARTS)


# A multiplier of every adapter's update for one call (`lora_scale`): per-call state in a context variable,
# so that threads sharing one model can run at different LoRA strengths. Merged adapters are fixed.
_CALL_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("ldm_lora_call_scale", default=1.0)


@contextlib.contextmanager
def lora_scale(multiplier: float):
    """Inside this block (this thread / task only), every unmerged adapter's update is multiplied by
    `multiplier` on top of its own `scale` (0 = the base model)."""
    token = _CALL_SCALE.set(float(multiplier))
    try:
        yield
    finally:
        _CALL_SCALE.reset(token)


class LoRALinear(nn.Module):
    """A frozen nn.Linear (or 1x1 nn.Conv2d) plus a trainable low-rank update; see the module docstring."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if (
                base.kernel_size != (1, 1)
                or base.stride != (1, 1)
                or base.padding not in ((0, 0), "valid")
                or base.dilation != (1, 1)
                or base.groups != 1
            ):
                raise ValueError(
                    f"LoRALinear: only 1x1 convolutions can be adapted, got {base}; conv LoRA (LoCon) is not supported"
                )
            in_f, out_f = base.in_channels, base.out_channels
        elif isinstance(base, nn.Linear):
            in_f, out_f = base.in_features, base.out_features
        else:
            raise TypeError(f"LoRALinear wraps nn.Linear or a 1x1 nn.Conv2d, got {type(base).__name__}")
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"LoRALinear: rank must be a positive integer, got {rank!r}")
        self.is_conv = isinstance(base, nn.Conv2d)
        self.in_features, self.out_features = in_f, out_f
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0
        # the wrapped layer's own Parameters, under the same names: base state-dict keys do not change
        self.weight = base.weight.requires_grad_(False)
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None
        self.dropout = nn.Dropout(dropout)
        device, dtype = base.weight.device, base.weight.dtype

        def layer(i: int, o: int) -> nn.Linear | nn.Conv2d:
            if self.is_conv:
                return nn.Conv2d(i, o, 1, bias=False, device=device, dtype=dtype)
            return nn.Linear(i, o, bias=False, device=device, dtype=dtype)

        self.lora_down = layer(in_f, rank)  # A
        self.lora_up = layer(rank, out_f)  # B
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear, kohya and PEFT
        nn.init.zeros_(self.lora_up.weight)  # B = 0: a fresh adapter is the identity

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank * self.scale * _CALL_SCALE.get()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias) if self.is_conv else F.linear(x, self.weight, self.bias)
        # the adapter may be kept in float32 over a half-precision base
        d = self.lora_up(self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype))))
        return y + (self.scaling * d).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, shaped like `weight` (computed in float32)."""
        up, down = self.lora_up.weight.float().flatten(1), self.lora_down.weight.float().flatten(1)
        return (self.scaling * (up @ down)).view(self.weight.shape)  # (out, rank) @ (rank, in) -> (out, in)

    def to_base(self) -> nn.Linear | nn.Conv2d:
        """A plain layer holding this one's weight and bias Parameters (the adapter is dropped)."""
        with torch.device("meta"):
            layer = (
                nn.Conv2d(self.in_features, self.out_features, 1, bias=self.bias is not None)
                if self.is_conv
                else nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            )
        layer.weight, layer.bias = self.weight, self.bias
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"
        )


# --------------------------------------------------------------------------- adding, scaling, merging


def lora_modules(unet: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(unet).values() for p in (*m.lora_down.parameters(), *m.lora_up.parameters())]


def base_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """unet.state_dict() without the adapter tensors: the base model under its own (CompVis) names."""
    return {k: v for k, v in unet.state_dict().items() if ".lora_down." not in k and ".lora_up." not in k}


def _replace(unet: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(unet.get_submodule(parent) if parent else unet, child, module)


def add_lora(
    unet: UNet,
    rank: int = 4,
    alpha: float | None = None,
    targets: tuple[str, ...] = ATTENTION_TARGETS,
    dropout: float = 0.0,
    include_proj: bool = False,
) -> list[nn.Parameter]:
    """Wrap every layer whose name ends with one of `targets` (e.g. "to_q", "to_out.0", "ff.net.2") in a
    LoRALinear; include_proj adds the transformers' proj_in / proj_out (1x1 convs in SD1, Linear in SD2).

    Every base parameter is frozen; returns the adapter parameters, the only ones that require grad.
    alpha defaults to rank (update scaling alpha/rank = 1).
    """
    if lora_modules(unet):
        raise ValueError("add_lora: this U-Net already has LoRA adapters; call remove_lora or merge_lora first")
    targets = tuple(targets) + (("proj_in", "proj_out") if include_proj else ())
    if not targets:
        raise ValueError("add_lora: no targets given")
    chosen = {t: [n for n, _ in unet.named_modules() if n == t or n.endswith("." + t)] for t in targets}
    unmatched = [t for t, names in chosen.items() if not names]
    if unmatched:
        raise ValueError(
            f"add_lora: no layer of the U-Net is named '{unmatched[0]}'; targets are name suffixes "
            "such as 'to_q', 'to_k', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2', 'proj_in'"
        )
    adapters = {}
    for name in sorted({n for names in chosen.values() for n in names}):
        layer = unet.get_submodule(name)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(
                f"add_lora: '{name}' is a {type(layer).__name__}; only Linear and 1x1 Conv2d layers "
                "can take a LoRA adapter"
            )
        adapters[name] = LoRALinear(layer, rank, alpha, dropout)  # raises before anything changed
    unet.requires_grad_(False)
    for name, adapter in adapters.items():
        _replace(unet, name, adapter)
    return lora_parameters(unet)


def set_lora_scale(unet: nn.Module, scale: float) -> None:
    """Multiply every adapter's update by `scale` (0 = base model, 1 = as trained)."""
    modules = lora_modules(unet)
    if not modules:
        raise ValueError("set_lora_scale: this U-Net has no LoRA adapters")
    for m in modules.values():
        m.scale = float(scale)


def remove_lora(unet: nn.Module) -> None:
    """Drop the adapters: the U-Net is again the plain base model (its base weights never changed;
    they stay frozen — call unet.requires_grad_(True) to train them)."""
    for name, m in lora_modules(unet).items():
        _replace(unet, name, m.to_base())


@torch.no_grad()
def merge_lora(unet: nn.Module) -> None:
    """Fold each adapter into its base weight (W += scale * alpha/rank * B A) and drop the adapters.

    Inference then costs exactly the base model's. Irreversible: the base weights are changed in
    place; to get the base model back, load its checkpoint again.
    """
    for name, m in lora_modules(unet).items():
        m.weight += m.delta_weight().to(m.weight.dtype)
        _replace(unet, name, m.to_base())


# --------------------------------------------------------------------------- files


def _short_target(name: str) -> str:
    """input_blocks.1.1.transformer_blocks.0.attn1.to_q -> to_q (the part add_lora's `targets` name)."""
    return re.sub(
        r"^(input_blocks|middle_block|output_blocks)(\.\d+)*\.(transformer_blocks\.\d+\.)?(attn[12]\.)?", "", name
    )


def _diffusers_module_names(unet: UNet) -> dict[str, str]:
    """Our name -> diffusers' name of every Linear / Conv2d layer of the U-Net."""
    kmap = diffusers_key_map(unet.config)
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, LoRALinear)) and name + ".weight" in kmap:
            out[name] = kmap[name + ".weight"][: -len(".weight")]
    return out


def save_lora(
    unet: UNet, path: str | os.PathLike, metadata: dict | None = None, base_model_hash: str | None = None
) -> Path:
    """Write the adapters as a small safetensors file in the kohya-ss / AUTOMATIC1111 layout, atomically.

    Keys: `lora_unet_<diffusers module path with dots -> underscores>.lora_down.weight`, `.lora_up.weight`
    and `.alpha` (a scalar). The run-time `scale` is not saved. `metadata` (str -> str or JSON-able) is
    added to kohya's `ss_*` fields and our `ldm_lora` record; base_model_hash (e.g. the base checkpoint's
    sha256) is written as kohya's `ss_new_sd_model_hash`.
    """
    modules = lora_modules(unet)
    if not modules:
        raise ValueError("save_lora: this U-Net has no LoRA adapters; call add_lora or load_lora first")
    names = _diffusers_module_names(unet)
    tensors = {}
    for name, m in modules.items():
        key = "lora_unet_" + names[name].replace(".", "_")
        tensors[key + ".lora_down.weight"] = m.lora_down.weight
        tensors[key + ".lora_up.weight"] = m.lora_up.weight
        tensors[key + ".alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    record = {
        "rank": ranks.pop() if len(ranks) == 1 else "Dynamic",
        "alpha": alphas.pop() if len(alphas) == 1 else "Dynamic",
        "targets": sorted({_short_target(n) for n in modules}),
        "modules": len(modules),
        "layout": "kohya-ss: lora_unet_<diffusers module path>.lora_down/lora_up/alpha",
    }
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(record["rank"]),
        "ss_network_alpha": str(record["alpha"]),
        LORA_KEY: json.dumps(record),
        UNET_CONFIG_KEY: json.dumps(unet.config.to_dict()),
    }
    if base_model_hash:
        meta["ss_new_sd_model_hash"] = base_model_hash
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    save_safetensors(tensors, path, metadata=meta)
    return Path(path)


_UNSUPPORTED = [
    ("hada_", "LoHa (LyCORIS)"),
    ("lokr_", "LoKr (LyCORIS)"),
    ("lora_mid", "LoCon with a Tucker core"),
    ("dora_scale", "DoRA"),
    ("lora_magnitude_vector", "DoRA"),
    ("lora_B.bias", "LoRA with a bias"),
    (".diff", "a full weight difference"),
]
_PART = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|"
    r"lora\.down\.weight|lora\.up\.weight|alpha)$"
)


def _normalize_key(key: str) -> str:
    """Old diffusers attention-processor names -> module names.

    attn1.processor.to_out_lora.down -> attn1.to_out.0.lora.down
    """
    key = re.sub(r"\.processor\.to_(q|k|v)_lora\.", r".to_\1.lora.", key)
    return key.replace(".processor.to_out_lora.", ".to_out.0.lora.")


def _peft_alphas(metadata: dict, path: Path) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) from diffusers' `lora_adapter_metadata` (PEFT LoraConfig fields), checked:
    ValueError naming the file for a value that is not a finite number >= 0."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return None, {}
    cfg = load_json(text, f"{path}: metadata lora_adapter_metadata")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: metadata lora_adapter_metadata is not a JSON object")
    get = lambda k: cfg.get(f"unet.{k}", cfg.get(k))  # noqa: E731
    alpha, pattern = get("lora_alpha"), get("alpha_pattern") or {}
    if alpha is not None and not _alpha_ok(alpha):
        raise ValueError(f"{path}: metadata lora_alpha={alpha!r:.80} is not a finite number >= 0")
    if not isinstance(pattern, dict) or not all(_alpha_ok(v) for v in pattern.values()):
        raise ValueError(f"{path}: metadata alpha_pattern={pattern!r:.80} is not a map of names to numbers >= 0")
    return alpha, {str(k): float(v) for k, v in pattern.items()}


def _alpha_ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _layer_aliases(names: dict[str, str]) -> dict[str, str]:
    """Every name a LoRA file may give a layer -> our name, from `_diffusers_module_names`.

    Built from the U-Net's real module names, never by splitting a file's key: kohya's underscored
    `transformer_blocks_10_attn1` or `input_blocks_1_1_` cannot be split back into dotted names without
    guessing ("10" or "1" + "0"?), but each real layer spells to exactly one underscored string, so an
    exact lookup resolves them. (Spellings are unique: names differ by more than '.' vs '_'.)
    """
    layer_of: dict[str, str] = {}
    for ours, theirs in names.items():
        for alias in (
            "lora_unet_" + theirs.replace(".", "_"),  # kohya, diffusers module paths (SD1/SD2, our files)
            "lora_unet_" + ours.replace(".", "_"),  # kohya, CompVis / sgm module paths (SDXL)
            theirs,  # old diffusers
            "unet." + theirs,  # diffusers / PEFT
        ):
            if layer_of.setdefault(alias, ours) != ours:
                raise AssertionError(f"LoRA key '{alias}' would name both '{layer_of[alias]}' and '{ours}'")
    return layer_of


# Cross-attention width (= the text encoder's) of each released family; a LoRA's to_k / to_v show it
_CONTEXT_FAMILY = {768: "SD1", 1024: "SD2", 1280: "SDXL refiner", 2048: "SDXL"}


def _model_family(config: UNetConfig) -> str:
    if config.adm_in_channels is not None:  # the added vector y (label_emb): SDXL base or refiner
        return "SDXL refiner" if config.context_dim == 1280 else "SDXL"
    return _CONTEXT_FAMILY.get(config.context_dim, "SD1/SD2")


def _family_mismatch(path: Path, unet: UNet, sd: dict[str, torch.Tensor], unresolved: list[str]) -> str | None:
    """The one-line error for a LoRA made for another model family (SDXL on SD1/SD2 or back, SD2 on SD1...),
    or None when the file shows no sign of one (other misfits get the generic errors).

    Evidence, each a phrase of the message: kohya's text-encoder prefixes (one encoder: lora_te_; SDXL's two:
    lora_te1_ / lora_te2_), the cross-attention width of to_k / to_v (= the model's context width), and what
    the layers this U-Net lacks are: deeper transformers (SD1/SD2 have one block) or the added-vector MLP
    (label_emb) say SDXL; attention at full resolution (input_blocks.1.1, down_blocks.0.attentions) says
    SD1/SD2. Conflicting evidence names no family.
    """
    config = unet.config
    found: dict[str, bool | None] = {}  # phrase -> says SDXL (True), SD1/SD2 (False), no family (None)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd):
        found["lora_te1_/lora_te2_ text-encoder parts"] = True
    if any(k.startswith("text_encoder_2.") for k in sd):
        found["text_encoder_2 parts"] = True
    if any(k.startswith("lora_te_") for k in sd):
        found["lora_te_ text-encoder parts"] = False

    widths = sorted(
        {
            t.shape[1]
            for key, t in sd.items()
            if t.ndim >= 2
            and (m := _PART.match(_normalize_key(key)))
            and m["part"] in ("lora_down.weight", "lora_A.weight", "lora.down.weight")
            and re.search(r"attn2[._]to_[kv]$", m["module"])
        }
        - {config.context_dim}
    )
    width_family = _CONTEXT_FAMILY.get(widths[0]) if widths else None
    if widths:
        found[f"{widths[0]}-wide cross-attention"] = None if width_family is None else width_family.startswith("SDXL")

    deepest = -1
    for name in unresolved:
        bare = re.sub(r"^(lora_unet_|unet\.)", "", name)
        if re.match(r"(label_emb|add_embedding)[._]", bare):
            found["added-vector (label_emb) layers"] = True
        if m := re.search(r"transformer_blocks[._](\d+)[._]", bare):
            deepest = max(deepest, int(m[1]))
        if re.match(r"(input_blocks[._][12][._]1|down_blocks[._]0[._]attentions)[._]", bare):
            found["attention at full resolution"] = False
    if deepest >= 1:  # every SD1/SD2 transformer has a single block (transformer_blocks.0)
        found[f"transformer blocks up to index {deepest}"] = True

    sides = set(found.values()) - {None}
    if len(sides) != 1:  # no evidence, or conflicting evidence
        return None
    is_xl = sides.pop()
    family = width_family or ("SDXL" if is_xl else "SD1/SD2")
    model = _model_family(config)
    if is_xl == model.startswith("SDXL") and width_family is None:  # same family, no other release's width
        return None
    return (
        f"{path}: an {family} LoRA ({', '.join(found)}) for an {model} model "
        f"({config.context_dim}-wide context); use a LoRA made for this model"
    )


@torch.no_grad()
def load_lora(unet: UNet, path: str | os.PathLike, scale: float = 1.0, merge: bool = False) -> list[str]:
    """Apply a LoRA file's U-Net adapters; returns the names of the adapted layers (ours).

    Reads our files and the common layouts: kohya-ss (`lora_unet_<diffusers path>` or
    `lora_unet_<CompVis path>`, `.lora_down/.lora_up/.alpha`), diffusers/PEFT
    (`unet.<path>.lora_A/lora_B.weight`, alpha from `lora_adapter_metadata`) and older diffusers
    (`<path>.lora.down/up.weight`, `attn1.processor.to_q_lora.down.weight`). Without a stored alpha,
    alpha = rank (update scale 1), as kohya and diffusers assume. SDXL files name layers the same ways
    (kohya's SDXL trainer writes the sgm names: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).
    Text-encoder tensors (`lora_te_`, `lora_te1_`, `lora_te2_`, `text_encoder.`, `text_encoder_2.`) are
    skipped with a warning naming them. Strict: a LoRA for another model family (SDXL on SD1/SD2 or back)
    is a ValueError saying so; an unknown or mis-shaped tensor is one naming it.

    merge=False adds LoRALinear adapters (frozen base, trainable adapters; set_lora_scale works);
    merge=True folds scale * alpha/rank * B A into the base weights (irreversible, see merge_lora).
    """
    path = Path(path)
    sd = read_state_dict(path)
    file_meta: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        _, file_meta = safetensors_header(path)

    text_keys = [k for k in sd if k.startswith(TEXT_ENCODER_PREFIXES)]
    names = _diffusers_module_names(unet)
    layer_of = _layer_aliases(names)  # every name a file may use for a layer -> our name

    # a LoRA for another family (SDXL on SD1, ...) is one mistake, not many unknown or mis-shaped tensors
    unresolved = [
        m["module"]
        for key in sd
        if not key.startswith(TEXT_ENCODER_PREFIXES)
        and (m := _PART.match(_normalize_key(key)))
        and m["module"] not in layer_of
    ]
    if mismatch := _family_mismatch(path, unet, sd, unresolved):
        raise ValueError(mismatch)

    example = (
        "lora_unet_"
        + next((n for n in names.values() if n.endswith("attn1.to_q")), next(iter(names.values()))).replace(".", "_")
        + ".lora_down.weight"
    )

    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            continue
        if m := _PART.match(_normalize_key(key)):
            layer = layer_of.get(m["module"])
            if layer is None:
                raise ValueError(
                    f"{path}: tensor '{key}' names no layer of this U-Net (our files use keys like "
                    f"'{example}'); the LoRA is for another model or configuration"
                )
            role = "alpha" if m["part"] == "alpha" else "down" if "down" in m["part"] or "_A" in m["part"] else "up"
            parts.setdefault(layer, {})[role] = (key, t)
            continue
        kind = next((what for marker, what in _UNSUPPORTED if marker in key), None)
        if kind:
            raise ValueError(
                f"{path}: tensor '{key}' belongs to {kind}, which is not supported; only plain LoRA "
                "(lora_down/lora_up) on Linear and 1x1-conv layers is"
            )
        raise ValueError(f"{path}: unknown tensor '{key}'; expected LoRA keys like '{example}'")
    if text_keys:
        counts = {p: sum(k.startswith(p) for k in text_keys) for p in TEXT_ENCODER_PREFIXES}
        which = ", ".join(f"{n} {p}* ({TEXT_ENCODER_PARTS[p]})" for p, n in counts.items() if n)
        warnings.warn(
            f"{path}: skipped {len(text_keys)} text-encoder LoRA tensors: {which}; only the U-Net part of a "
            "LoRA is applied — text-encoder LoRA is not supported",
            stacklevel=2,
        )
    if not parts:
        raise ValueError(f"{path}: no U-Net LoRA tensors found" + (" (only text-encoder ones)" if text_keys else ""))

    peft_alpha, alpha_pattern = _peft_alphas(file_meta, path)
    plan: list[tuple[str, nn.Linear | nn.Conv2d | LoRALinear, int, float, torch.Tensor, torch.Tensor]] = []
    for layer, p in parts.items():
        for role in ("down", "up"):
            if role not in p:
                other = next(iter(p.values()))[0]
                raise ValueError(f"{path}: '{other}' has no matching {role} tensor for layer '{names[layer]}'")
        (down_key, down), (up_key, up) = p["down"], p["up"]
        target = unet.get_submodule(layer)
        assert isinstance(target, (nn.Linear, nn.Conv2d, LoRALinear)), layer  # layer_of lists only those
        if (isinstance(target, nn.Conv2d) and target.kernel_size != (1, 1)) or (
            down.ndim == 4 and down.shape[2:] != (1, 1)
        ):
            raise ValueError(
                f"{path}: tensor '{down_key}' is a LoRA for the convolution '{names[layer]}' with kernel "
                f"{tuple(down.shape[2:]) if down.ndim == 4 else target.kernel_size} (conv LoRA / LoCon): "
                "not supported; only Linear and 1x1-conv layers can be adapted"
            )
        out_f, in_f = target.weight.shape[:2]
        rank = down.shape[0] if down.ndim else 0
        if rank < 1:
            raise ValueError(f"{path}: tensor '{down_key}' has shape {tuple(down.shape)}: a LoRA needs rank >= 1")
        for key, t, want in ((down_key, down, (rank, in_f)), (up_key, up, (out_f, rank))):
            if t.ndim not in (2, 4) or tuple(t.flatten(1).shape) != want:  # a 1x1 conv's (r, in, 1, 1) is (r, in)
                raise ValueError(
                    f"{path}: tensor '{key}' has shape {tuple(t.shape)}; layer '{names[layer]}' "
                    f"({in_f} -> {out_f} features, rank {rank}) needs {want}"
                )
        for key, t in ((down_key, down), (up_key, up)):
            if not t.dtype.is_floating_point:
                raise ValueError(f"{path}: tensor '{key}' is {t.dtype}; LoRA weights are floating-point")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor '{key}' holds NaN or infinite values")
        down, up = down.flatten(1), up.flatten(1)
        if "alpha" in p:
            alpha_key, alpha_t = p["alpha"]
            if alpha_t.numel() != 1 or alpha_t.is_complex() or not _alpha_ok(alpha := float(alpha_t.flatten()[0])):
                raise ValueError(
                    f"{path}: tensor '{alpha_key}' (shape {tuple(alpha_t.shape)}) is not one finite number >= 0"
                )
        else:
            alpha = next(
                (float(v) for k, v in alpha_pattern.items() if names[layer].endswith(k.lstrip("^"))),
                float(peft_alpha) if peft_alpha is not None else float(rank),
            )
        plan.append((layer, target, rank, alpha, down, up))

    if not merge:
        taken = [layer for layer, target, *_ in plan if isinstance(target, LoRALinear)]
        if taken:
            raise ValueError(
                f"{path}: layer '{taken[0]}' already has a LoRA adapter; call merge_lora or remove_lora "
                "first, or load with merge=True"
            )
        unet.requires_grad_(False)
    for layer, target, rank, alpha, down, up in plan:
        if merge:
            w = target.weight
            delta = (scale * alpha / rank) * (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32))
            w += delta.view(w.shape).to(w.dtype)  # (out, rank) @ (rank, in) -> (out, in)
        else:
            assert not isinstance(target, LoRALinear)  # refused above
            adapter = LoRALinear(target, rank, alpha)
            adapter.lora_down.weight.copy_(down.view(adapter.lora_down.weight.shape))
            adapter.lora_up.weight.copy_(up.view(adapter.lora_up.weight.shape))
            adapter.scale = float(scale)
            _replace(unet, layer, adapter)
    return sorted(layer for layer, *_ in plan)
