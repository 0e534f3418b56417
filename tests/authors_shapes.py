"""SViTs in the shapes their authors publish them (our own code, not theirs), for the inference tests.

* ``SpikformerLike``: the official Spikformer CIFAR model's shape (ZK-Zhou/spikformer,
  ``cifar10/model.py``): tokens-last ``[T, B, N, C]``, separate q/k/v ``nn.Linear`` + ``BatchNorm1d``
  over transposed tokens + LIF, heads reshaped with the input's ``C // num_heads``, an MLP
  reading ``self.c_hidden``, LayerNorms built and never called, and a patch embedding
  storing ``num_patches``, ``H`` and ``W`` (``num_patches`` equals the residual width at
  32x32 with width 64) that its forward never reads.
* ``QKFormerLike``: QKFormer's shape (zhouchenlin2096/QKFormer): hierarchical stages, a
  stride-2 1x1 shortcut between them, token attention (q summed over each head's channels,
  a neuron, times k; no v) in the first stage and ``q @ (k^T @ v)`` in the second, heads
  fixed in code.
* ``HeadsFromNowhere``: heads formed from a width no projection produces: refused.

The Spike-Driven Transformer's shape is shipped with the package (``recipes/ported_sdt.py``),
since the porting guide and a recipe use it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron


def lif(v_threshold: float = 1.0) -> nn.Module:
    return neuron.LIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True, step_mode="m")


def tokens_last_bn(linear: nn.Linear, bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """Linear on ``[TB, N, C]`` then BatchNorm1d over its channels (transposed there and back)."""
    return bn(linear(x).transpose(-1, -2)).transpose(-1, -2)


# -- Spikformer (CIFAR) -----------------------------------------------------------------


class SSA(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.dim, self.num_heads, self.scale = dim, num_heads, 0.125
        for name in ("q", "k", "v", "proj"):
            setattr(self, f"{name}_linear", nn.Linear(dim, dim))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif())
        self.attn_lif = lif(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, N, C]
        T, B, N, C = x.shape
        flat = x.flatten(0, 1)

        def heads(name: str) -> torch.Tensor:
            y = tokens_last_bn(getattr(self, f"{name}_linear"), getattr(self, f"{name}_bn"), flat)
            y = getattr(self, f"{name}_lif")(y.reshape(T, B, N, C))
            return y.reshape(T, B, N, self.num_heads, C // self.num_heads).permute(0, 1, 3, 2, 4)

        q, k, v = heads("q"), heads("k"), heads("v")
        x = (q @ k.transpose(-2, -1)) * self.scale @ v
        x = self.attn_lif(x.transpose(2, 3).reshape(T, B, N, C)).flatten(0, 1)
        return self.proj_lif(tokens_last_bn(self.proj_linear, self.proj_bn, x).reshape(T, B, N, C))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1_linear, self.fc1_bn, self.fc1_lif = nn.Linear(in_features, hidden_features), \
            nn.BatchNorm1d(hidden_features), lif()
        self.fc2_linear, self.fc2_bn, self.fc2_lif = nn.Linear(hidden_features, in_features), \
            nn.BatchNorm1d(in_features), lif()
        self.c_hidden, self.c_output = hidden_features, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, N, C = x.shape
        x = self.fc1_lif(tokens_last_bn(self.fc1_linear, self.fc1_bn, x.flatten(0, 1)).reshape(T, B, N, self.c_hidden))
        return self.fc2_lif(tokens_last_bn(self.fc2_linear, self.fc2_bn, x.flatten(0, 1)).reshape(T, B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)  # built, never called (as the original)
        self.attn = SSA(dim, num_heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class SPS(nn.Module):
    """3x3 conv + BN + LIF stages in -> C/8 -> C/4 -> C/2 -> C, max-pooled after the last two, then a
    relative position branch; ``[T, B, N, C]`` out."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, embed_dims: int = 64):
        super().__init__()
        self.image_size, self.patch_size, self.C = [image_size, image_size], (patch_size, patch_size), in_channels
        self.H = self.W = image_size // patch_size
        self.num_patches = self.H * self.W
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, bias=False) for i in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(widths[i + 1]) for i in range(4))
        self.lifs = nn.ModuleList(lif() for _ in range(4))
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.rpe_conv = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, bias=False)
        self.rpe_bn, self.rpe_lif = nn.BatchNorm2d(embed_dims), lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W]
        T, B = x.shape[:2]
        x = x.flatten(0, 1)
        for i in range(4):
            x = self.bns[i](self.convs[i](x))
            x = self.lifs[i](x.reshape(T, B, *x.shape[1:])).flatten(0, 1)
            if i >= 2:
                x = self.pool(x)
        H, W = x.shape[-2:]
        rpe = self.rpe_lif(self.rpe_bn(self.rpe_conv(x)).reshape(T, B, -1, H, W))
        x = x.reshape(T, B, -1, H, W) + rpe
        return x.flatten(-2).transpose(-1, -2)  # [T, B, N, C]


class SpikformerLike(nn.Module):
    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 embed_dims: int = 64, num_heads: int = 4, mlp_ratios: float = 4.0, depths: int = 2, T: int = 2):
        super().__init__()
        self.T = T
        self.patch_embed = SPS(image_size, patch_size, in_channels, embed_dims)
        self.block = nn.ModuleList(Block(embed_dims, num_heads, mlp_ratios) for _ in range(depths))
        self.head = nn.Linear(embed_dims, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1))
        for block in self.block:
            x = block(x)
        return self.head(x.mean(2).mean(0))


# -- QKFormer ----------------------------------------------------------------------------


def conv_bn_lif(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.ModuleDict:
    return nn.ModuleDict({"conv": nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                                            bias=False), "bn": nn.BatchNorm2d(out_channels), "lif": lif()})


def run_conv_bn_lif(stage: nn.ModuleDict, x: torch.Tensor, pool: nn.Module | None = None) -> torch.Tensor:
    T, B = x.shape[:2]
    y = stage["bn"](stage["conv"](x.flatten(0, 1)))
    if pool is not None:
        y = pool(y)
    return stage["lif"](y.reshape(T, B, *y.shape[1:]))


class TokenQKAttention(nn.Module):
    """No v: the q channels of each head are summed, fired through a neuron, and gate k per token."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        for name in ("q", "k", "proj"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, 1, bias=name == "proj"))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif())
        self.attn_lif = lif(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W]
        T, B, C, H, W = x.shape
        flat = x.flatten(3).flatten(0, 1)

        def spikes(name: str) -> torch.Tensor:
            y = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(flat)).reshape(T, B, C, H * W)
            return getattr(self, f"{name}_lif")(y)

        q = spikes("q").reshape(T, B, self.num_heads, C // self.num_heads, H * W)
        k = spikes("k").reshape(T, B, self.num_heads, C // self.num_heads, H * W)
        x = (self.attn_lif(q.sum(dim=3, keepdim=True)) * k).flatten(2, 3)  # [T, B, C, N]
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1))).reshape(T, B, C, H, W)
        return self.proj_lif(x)


class LinearSSA(nn.Module):
    """``q @ (k^T @ v) * 0.125`` on Conv1d projections over ``[T, B, C, N]``."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.dim, self.num_heads, self.scale = dim, num_heads, 0.125
        for name in ("q", "k", "v", "proj"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, 1, bias=name == "proj"))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", lif())
        self.attn_lif = lif(0.5)
        self.qkv_mp = nn.MaxPool1d(4)  # built, never called (as the original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, B, C, H, W]
        T, B, C, H, W = x.shape
        flat = x.flatten(3).flatten(0, 1)

        def heads(name: str) -> torch.Tensor:
            y = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(flat)).reshape(T, B, C, H * W)
            y = getattr(self, f"{name}_lif")(y).transpose(-1, -2)
            return y.reshape(T, B, H * W, self.num_heads, C // self.num_heads).permute(0, 1, 3, 2, 4)

        q, k, v = heads("q"), heads("k"), heads("v")
        x = q @ (k.transpose(-2, -1) @ v) * self.scale
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, H * W))
        return self.proj_lif(self.proj_bn(self.proj_conv(x.flatten(0, 1))).reshape(T, B, C, H, W))


class ConvMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_hidden, self.c_output = hidden, dim
        self.fc1, self.fc2 = conv_bn_lif(dim, hidden, 1), conv_bn_lif(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        hidden = run_conv_bn_lif(self.fc1, x).reshape(T, B, self.c_hidden, H, W)
        return run_conv_bn_lif(self.fc2, hidden)


class QKBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, token_attention: bool):
        super().__init__()
        self.attn = (TokenQKAttention if token_attention else LinearSSA)(dim, num_heads)
        self.mlp = ConvMLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class PatchEmbeddingStage(nn.Module):
    """3x3 conv + BN + LIF twice (max-pooled before the second LIF) beside a stride-2 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.main1, self.main2 = conv_bn_lif(in_channels, out_channels), conv_bn_lif(out_channels, out_channels)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.shortcut = conv_bn_lif(in_channels, out_channels, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_conv_bn_lif(self.main2, run_conv_bn_lif(self.main1, x), self.pool) + run_conv_bn_lif(self.shortcut, x)


class QKFormerLike(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, embed_dims: int = 64, num_heads: int = 2,
                 T: int = 2):
        super().__init__()
        num_heads = 4  # fixed in code, whatever the argument (as the original)
        self.T = T
        self.stem1, self.stem2 = conv_bn_lif(in_channels, embed_dims // 4), conv_bn_lif(embed_dims // 4, embed_dims // 2)
        self.stem_shortcut = conv_bn_lif(embed_dims // 4, embed_dims // 2, 1)
        self.stage1 = QKBlock(embed_dims // 2, num_heads, token_attention=True)
        self.patch_embed2 = PatchEmbeddingStage(embed_dims // 2, embed_dims)
        self.stage2 = QKBlock(embed_dims, num_heads, token_attention=False)
        self.head = nn.Linear(embed_dims, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_conv_bn_lif(self.stem1, x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1))
        x = run_conv_bn_lif(self.stem2, x) + run_conv_bn_lif(self.stem_shortcut, x)
        x = self.stage2(self.patch_embed2(self.stage1(x)))
        return self.head(x.flatten(3).mean(3).mean(0))


# -- refused -------------------------------------------------------------------------


class HeadsFromNowhere(nn.Module):
    """q is 96 channels wide but the output projection reads 64: the heads come from a width no
    projection produces, so no head-aligned pruning of it can be inferred."""

    def __init__(self, dim: int = 64, num_heads: int = 4):
        super().__init__()
        self.num_heads = num_heads
        self.q_conv, self.k_conv = nn.Conv1d(dim, 96, 1), nn.Conv1d(dim, dim, 1)
        self.proj_conv = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, N]
        B, C, N = x.shape
        q = self.q_conv(x).reshape(B, self.num_heads, -1, N)[:, :, :C // self.num_heads]
        k = self.k_conv(x).reshape(B, self.num_heads, -1, N)
        return self.proj_conv((q * k).reshape(B, C, N))


class HeadsFromNowhereNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv1d(3, 64, 1)
        self.attn = HeadsFromNowhere()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W]
        x = self.embed(x.flatten(2))
        return self.head((x + self.attn(x)).mean(-1))
