"""Layouts of the attention blocks SpikingJelly's SViTs ship."""
from __future__ import annotations

from spikingjelly.activation_based.layer import attention as sj_attention
from spikingjelly.activation_based.model import maxformer

from ..attention import AttentionLayout
from ..plugins import hookimpl


def _set_dim_and_head_dim(module, width: int, inner: int) -> None:
    module.dim = width
    module.head_dim = inner // module.num_heads


def _spiking_self_attention(m: sj_attention.SpikingSelfAttention) -> AttentionLayout:
    # Spikformer's SSA reads the local q/k/v width from the qkv tensor: inner is free.
    qkv_conv, qkv_bn = m.qkv_conv_bn[0], m.qkv_conv_bn[1]
    proj_conv, proj_bn = m.proj_conv_bn[0], m.proj_conv_bn[1]
    return AttentionLayout(
        module=m, num_heads=m.num_heads, tied=False,
        reads=[qkv_conv], writes=[proj_conv, proj_bn],
        inner_out=[(qkv_conv, 3), (qkv_bn, 3)], inner_in=[proj_conv],
        width_neurons=[m.proj_lif], inner_neurons=[(m.qkv_lif, 3), (m.attn_lif, 1)],
        on_resize=_set_dim_and_head_dim,
    )


def _qk_attention(m: sj_attention.QKAttention) -> AttentionLayout:
    # QKFormer reshapes q/k with the input C: inner is tied to the residual width.
    qk_conv, qk_bn = m.qk_conv_bn[0], m.qk_conv_bn[1]
    proj_conv, proj_bn = m.proj_conv_bn[0], m.proj_conv_bn[1]
    attn_chunks = 1 if m.qka_type == "channel" else 0  # token attention sums the channels away
    return AttentionLayout(
        module=m, num_heads=m.num_heads, tied=True,
        reads=[qk_conv], writes=[proj_conv, proj_bn],
        inner_out=[(qk_conv, 2), (qk_bn, 2)], inner_in=[proj_conv],
        width_neurons=[m.proj_lif], inner_neurons=[(m.qk_lif, 2), (m.attn_lif, attn_chunks)],
        on_resize=_set_dim_and_head_dim,
    )


def _spike_driven_self_attention(m: sj_attention.SpikeDrivenSelfAttention) -> AttentionLayout:
    return AttentionLayout(
        module=m, num_heads=m.num_heads, tied=True,
        reads=[m.q_conv, m.k_conv, m.v_conv], writes=[m.proj_conv, m.proj_bn],
        inner_out=[(m.q_conv, 1), (m.q_bn, 1), (m.k_conv, 1), (m.k_bn, 1), (m.v_conv, 1), (m.v_bn, 1)],
        inner_in=[m.proj_conv],
        width_neurons=[m.shortcut_lif],
        inner_neurons=[(m.q_lif, 1), (m.k_lif, 1), (m.v_lif, 1), (m.attn_lif, 1)],
        on_resize=_set_dim_and_head_dim,
    )


def _maxformer_cifar_ssa(m) -> AttentionLayout:
    qkv_conv, qkv_bn = m.qkv[0], m.qkv[1]
    proj_conv, proj_bn = m.proj[0], m.proj[1]
    return AttentionLayout(
        module=m, num_heads=m.num_heads, tied=True,
        reads=[qkv_conv], writes=[proj_conv, proj_bn],
        inner_out=[(qkv_conv, 3), (qkv_bn, 3)], inner_in=[proj_conv],
        width_neurons=[m.input_lif], inner_neurons=[(m.qkv_lif, 3), (m.attn_lif, 1)],
    )


_LAYOUTS = [
    (sj_attention.SpikingSelfAttention, _spiking_self_attention),
    (sj_attention.QKAttention, _qk_attention),
    (sj_attention.SpikeDrivenSelfAttention, _spike_driven_self_attention),
    (maxformer._MaxCifarSSA, _maxformer_cifar_ssa),
]


@hookimpl
def primesvt_attention_layout(module):
    for cls, layout in _LAYOUTS:
        if isinstance(module, cls):
            return layout(module)
    return None
