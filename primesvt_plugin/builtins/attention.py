"""Layouts of the attention blocks SpikingJelly's SViTs ship."""
from __future__ import annotations

from spikingjelly.activation_based.layer import attention as sj_attention
from spikingjelly.activation_based.model import maxformer

from ..plugins import hookimpl
from ..pruning.attention import AttentionLayout


def _set_dim_and_head_dim(module, width: int, inner: int) -> None:
    module.dim = width
    module.head_dim = inner // module.num_heads


def _fused_qkv_layout(m, qkv, proj, chunks: int, tied: bool, width_neuron, inner_neurons,
                      on_resize=_set_dim_and_head_dim) -> AttentionLayout:
    """Blocks with q/k(/v) concatenated in one conv+BN (``qkv``) and a conv+BN projection."""
    return AttentionLayout(
        module=m, num_heads=m.num_heads, tied=tied,
        reads=[qkv[0]], writes=[proj[0], proj[1]],
        inner_out=[(qkv[0], chunks), (qkv[1], chunks)], inner_in=[proj[0]],
        width_neurons=[width_neuron], inner_neurons=inner_neurons, on_resize=on_resize,
    )


def _spiking_self_attention(m: sj_attention.SpikingSelfAttention) -> AttentionLayout:
    # Spikformer's SSA reads the local q/k/v width from the qkv tensor: inner is free.
    return _fused_qkv_layout(m, m.qkv_conv_bn, m.proj_conv_bn, 3, False, m.proj_lif,
                             [(m.qkv_lif, 3), (m.attn_lif, 1)])


def _qk_attention(m: sj_attention.QKAttention) -> AttentionLayout:
    # QKFormer reshapes q/k with the input C: inner is tied to the residual width.
    attn_chunks = 1 if m.qka_type == "channel" else 0  # token attention sums the channels away
    return _fused_qkv_layout(m, m.qk_conv_bn, m.proj_conv_bn, 2, True, m.proj_lif,
                             [(m.qk_lif, 2), (m.attn_lif, attn_chunks)])


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
    return _fused_qkv_layout(m, m.qkv, m.proj, 3, True, m.input_lif, [(m.qkv_lif, 3), (m.attn_lif, 1)],
                             on_resize=None)


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
