"""A ViT vision tower in the two layouts VLMs build on: CLIP and SigLIP.

Module and parameter names follow `transformers`' CLIPVisionModel / SiglipVisionModel
(`embeddings.patch_embedding`, `pre_layrnorm`, `encoder.layers.N.mlp.fc1`, ...), so
importing a released tower is a prefix rename. The tower returns the hidden states that
`VisionConfig.feature_layers` selects, patch tokens only, concatenated on the feature axis.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmscale.config.towers import VisionConfig
from mmscale.models.attention import attention
from mmscale.models.initialise import gathered


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; its weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def build_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")


class VisionEmbeddings(nn.Module):
    """Patch embedding, the class token (CLIP only) and learned absolute positions."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        clip = cfg.family == "clip"
        if clip:
            self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        else:
            self.register_parameter("class_embedding", None)
        self.patch_embedding = nn.Conv2d(
            3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=not clip
        )
        # CLIP's class token has a position of its own, ahead of the patches.
        self.position_embedding = nn.Embedding(cfg.num_patches + int(clip), cfg.hidden_size)
        # The child is complete (under zero.Init: partitioned) before it is initialised here.
        with gathered([self.position_embedding.weight]):
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    attention_kernel = "auto"  # which kernel computes it (mmscale.models.attention.set_kernel)

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=False, kernel=self.attention_kernel)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.mlp_size)
        self.act = build_activation(cfg.activation)
        self.fc2 = nn.Linear(cfg.mlp_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def run_layer(layer: nn.Module, checkpointing: bool, x: torch.Tensor, *args: object) -> torch.Tensor:
    """`layer(x, *args)`, with `checkpointing` recomputed in the backward pass rather than stored.

    Only a forward that builds a graph checkpoints: a frozen tower over pixels stores nothing
    for backward, and recomputing it would cost a forward for no memory.
    """
    if (
        checkpointing and layer.training and torch.is_grad_enabled()
        and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    ):
        # Non-reentrant, as the LLM's: the reentrant variant drops the parameters' gradients
        # when the layer's input needs none.
        return checkpoint(layer, x, *args, use_reentrant=False)
    return layer(x, *args)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.checkpointing = cfg.activation_checkpointing
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input and every block's output: hidden state i is the output of block i."""
        states = [x]
        for layer in self.layers:
            states.append(run_layer(layer, self.checkpointing, states[-1]))
        return states


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # CLIP's spelling ("layrnorm") is kept so its weights load by name.
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.family == "clip" else None
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.post_norm else None

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens ahead of the patches (CLIP's class token), dropped from the features."""
        return int(self.embeddings.class_embedding is not None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) normalised pixels -> (images, patches, cfg.feature_size) features."""
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = self.encoder(x)
        features = [states[i] for i in self.cfg.feature_layer_ids]
        if self.post_layernorm is not None:
            features = [self.post_layernorm(f) for f in features]
        return torch.cat(features, dim=-1)[:, self.num_prefix_tokens :]
