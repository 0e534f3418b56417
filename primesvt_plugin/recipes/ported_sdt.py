"""A Spike-Driven-Transformer-shaped SViT, written as its authors' code is written and ported to SpikingJelly 2.0.

This is not the authors' code (BICLab/Spike-Driven-Transformer: ``module/ms_conv.py``,
``module/sps.py``, ``model/spikeformer.py``); it has the same structure, so that the
porting guide (docs/models.md) can show every step on it:

* neurons: the authors build ``spikingjelly.clock_driven.neuron.MultiStepLIFNode(tau=2.0,
  detach_reset=True, backend="cupy")``; SpikingJelly 2.0 has no ``clock_driven`` module and no
  ``backend`` argument, and its ``activation_based.neuron.LIFNode(..., step_mode="m")`` is the
  same neuron (``lif`` below);
* timm: ``to_2tuple`` and ``trunc_normal_`` are one line each here, ``DropPath`` is not used by
  these models' forward passes, ``register_model`` is not needed (``build`` is the builder);
* the shapes kept on purpose: attention on 1x1 convolutions over ``[T, B, C, H, W]``, heads
  formed with the input's ``C // num_heads``, ``k * v`` summed over tokens through a
  "talking heads" neuron, the residual added inside the attention and the MLP, tuples
  returned all the way up (``(x, v, hook)``, ``(x, hook)``, the model's ``(logits, hook)``),
  an MLP reading its hidden width from ``self.c_hidden``, and layers built but never called.
"""
import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron


def lif(v_threshold: float = 1.0) -> nn.Module:
    """The authors' MultiStepLIFNode(tau=2.0, detach_reset=True, backend="cupy"), in SpikingJelly 2.0."""
    return neuron.LIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True, step_mode="m")


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = False):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    return conv, nn.BatchNorm2d(out_channels)


class SpikeDrivenSelfAttention(nn.Module):
    """q, k, v from 1x1 convolutions; ``q * LIF(sum over tokens of k * v)``; the residual inside."""

    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.dim, self.num_heads, self.scale = dim, num_heads, 0.125  # scale: kept, never used (as the original)
        self.shortcut_lif = lif()
        self.q_conv, self.q_bn = conv_bn(dim, dim)
        self.k_conv, self.k_bn = conv_bn(dim, dim)
        self.v_conv, self.v_bn = conv_bn(dim, dim)
        self.q_lif, self.k_lif, self.v_lif = lif(), lif(), lif()
        self.attn_lif = lif(0.5)  # built, never called
        self.talking_heads = nn.Conv1d(num_heads, num_heads, 1, bias=False)  # built, never called
        self.talking_heads_lif = lif(0.5)
        self.proj_conv, self.proj_bn = conv_bn(dim, dim, bias=True)

    def heads(self, x: torch.Tensor, conv, bn, spiking) -> torch.Tensor:
        T, B, C, H, W = x.shape
        y = spiking(bn(conv(x.flatten(0, 1))).reshape(T, B, C, H, W))
        return y.flatten(3).transpose(-1, -2).reshape(T, B, H * W, self.num_heads, C // self.num_heads).permute(
            0, 1, 3, 2, 4)  # [T, B, heads, tokens, C // heads]

    def forward(self, x: torch.Tensor, hook: dict | None = None):
        T, B, C, H, W = x.shape
        identity = x
        x = self.shortcut_lif(x)
        q = self.heads(x, self.q_conv, self.q_bn, self.q_lif)
        k = self.heads(x, self.k_conv, self.k_bn, self.k_lif)
        v = self.heads(x, self.v_conv, self.v_bn, self.v_lif)
        kv = self.talking_heads_lif((k * v).sum(dim=-2, keepdim=True))  # [T, B, heads, 1, C // heads]
        if hook is not None:
            hook["kv"] = kv.detach()
        x = (q * kv).transpose(3, 4).reshape(T, B, C, H, W)
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1))).reshape(T, B, C, H, W)
        return x + identity, v, hook


class SpikeDrivenMLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.c_hidden, self.c_output = hidden_features, in_features
        self.fc1_lif, self.fc2_lif = lif(), lif()
        self.fc1_conv, self.fc1_bn = conv_bn(in_features, hidden_features, bias=True)
        self.fc2_conv, self.fc2_bn = conv_bn(hidden_features, in_features, bias=True)

    def forward(self, x: torch.Tensor, hook: dict | None = None):
        T, B, C, H, W = x.shape
        identity = x
        x = self.fc1_bn(self.fc1_conv(self.fc1_lif(x).flatten(0, 1))).reshape(T, B, self.c_hidden, H, W)
        x = self.fc2_bn(self.fc2_conv(self.fc2_lif(x).flatten(0, 1))).reshape(T, B, C, H, W)
        return x + identity, hook


class SpikeDrivenBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = SpikeDrivenSelfAttention(dim, num_heads)
        self.mlp = SpikeDrivenMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, hook: dict | None = None):
        x_attn, attn, hook = self.attn(x, hook)
        x, hook = self.mlp(x_attn, hook)
        return x, attn, hook


class SpikingPatchEmbedding(nn.Module):
    """Four 3x3 conv + BN + LIF stages (max-pooled where ``pooling`` says 1), then a relative position
    branch added to the last stage's membrane."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, embed_dims: int = 256,
                 pooling: str = "0011"):
        super().__init__()
        self.image_size, self.patch_size, self.pooling = [image_size, image_size], (patch_size, patch_size), pooling
        self.C = in_channels
        self.H = self.W = image_size // patch_size
        self.num_patches = self.H * self.W  # stored as the original does; the forward never reads it
        widths = [in_channels, embed_dims // 8, embed_dims // 4, embed_dims // 2, embed_dims]
        self.stages = nn.ModuleList()
        for i in range(4):
            conv, bn = conv_bn(widths[i], widths[i + 1], 3)
            self.stages.append(nn.ModuleDict({"conv": conv, "bn": bn, "lif": lif()}))
        self.pools = nn.ModuleList(nn.MaxPool2d(3, 2, 1) for _ in range(4))
        self.rpe_conv, self.rpe_bn = conv_bn(embed_dims, embed_dims, 3)
        self.rpe_lif = lif()  # built, never called

    def forward(self, x: torch.Tensor):
        T, B = x.shape[:2]
        x = x.flatten(0, 1)
        for i, stage in enumerate(self.stages):
            x = stage["bn"](stage["conv"](x))
            if self.pooling[i] == "1":
                x = self.pools[i](x)
            if i < 3:
                x = stage["lif"](x.reshape(T, B, *x.shape[1:])).flatten(0, 1)
        membrane = x
        x = stage["lif"](x.reshape(T, B, *x.shape[1:])).flatten(0, 1)
        x = self.rpe_bn(self.rpe_conv(x)) + membrane
        H, W = x.shape[-2:]
        return x.reshape(T, B, -1, H, W), (H, W)


class SpikeDrivenTransformer(nn.Module):
    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 embed_dims: int = 256, num_heads: int = 8, mlp_ratios: float = 4.0, depths: int = 2, T: int = 4,
                 pooling: str = "0011"):
        super().__init__()
        self.num_classes, self.depths, self.T = num_classes, depths, T
        self.patch_embed = SpikingPatchEmbedding(image_size, patch_size, in_channels, embed_dims, pooling)
        self.block = nn.ModuleList(SpikeDrivenBlock(embed_dims, num_heads, mlp_ratios) for _ in range(depths))
        self.head_lif = lif()
        self.head = nn.Linear(embed_dims, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)  # timm's trunc_normal_(std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, hook: dict | None = None):
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)  # [T, B, C, H, W]
        x, _ = self.patch_embed(x)
        for block in self.block:
            x, _, hook = block(x, hook=hook)
        x = x.flatten(3).mean(3)  # [T, B, C]
        return self.head(self.head_lif(x)).mean(0), hook


def build(**args) -> nn.Module:
    return SpikeDrivenTransformer(**args)
