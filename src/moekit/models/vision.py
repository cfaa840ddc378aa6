"""A vision MoE: a ViT whose feed-forward blocks are MoE layers on every other layer (V-MoE).

Legend: B batch, C channels, H = W image size, P patch size, N patches, S = N + 1 tokens (class token first when
pool="cls"), D model dim, H_ heads, X head dim.

Riquelme et al. 2021 ("Scaling Vision with Sparse Mixture of Experts") replace the MLP of every other ViT block
(Dosovitskiy et al. 2021) with an MoE layer: softmax routing over E experts, top-k (k = 1 or 2), the softmax
probabilities as combine weights, a capacity per expert with *batch prioritized routing* (the tokens with the
largest routing weight keep their experts when capacity runs out, `capacity_priority="score"`) and the importance
and load losses of Shazeer et al. 2017 (`cv2_loss_coef`). The MoE layer is moekit's, unchanged: patch tokens are
just tokens. Attention is bidirectional (every patch sees every patch), so nothing here is causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import VisionConfig
from moekit.layers import MoE, total_aux_loss
from moekit.layers.experts import FFN, Experts
from moekit.layers.routing import Router


@dataclass
class VisionOutput:
    """logits [B, num_classes]; loss = cross-entropy + aux_loss when labels were given (else None); aux_loss is
    the sum of the MoE layers' weighted balance losses (0 for a dense model)."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attention(LN(x)), then x + FFN(LN(x)) where the FFN is an MoE layer or a GELU MLP."""

    def __init__(self, config: VisionConfig, layer: int) -> None:
        super().__init__()
        D = config.d_model
        self.n_heads = config.n_heads
        self.attn_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ffn_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.ffn = MoE(config.moe) if self.is_moe else FFN(D, config.dense_d_ff, "gelu", bias=True)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        qkv_BS3HX = self.qkv(self.attn_norm(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads)
        qkv_3BHSX = qkv_BS3HX.permute(2, 0, 3, 1, 4)
        a_BHSX = F.scaled_dot_product_attention(qkv_3BHSX[0], qkv_3BHSX[1], qkv_3BHSX[2])  # not causal
        x_BSD = x_BSD + self.proj(a_BHSX.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class VisionMoE(nn.Module):
    """Image classifier: patch embedding, class token, position embeddings, ViT blocks (MoE on every
    `moe_every`-th), a final LayerNorm and a linear head.

    Args:
        config: the VisionConfig (a dense ViT when config.moe is None).

    `model(images)` with images [B, C, H, W] float gives a VisionOutput; with `labels` [B] class ids its `loss` is
    the cross-entropy plus the MoE balance losses. Per-layer routing statistics: `moekit.collect_stats(model)`.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        D = config.d_model
        self.patch_embed = nn.Conv2d(config.channels, D, kernel_size=config.patch_size, stride=config.patch_size)
        extra = 1 if config.pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if extra else None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + extra, D))
        self.blocks = nn.ModuleList(VisionBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.head = nn.Linear(D, config.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ViT init: matrices, position embeddings and experts ~ N(0, init_std); biases and the head 0 (so the
        first logits are uniform); LayerNorms 1, 0; routers N(0, init_std)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.trunc_normal_(module.w_in, 0.0, std, -2 * std, 2 * std)
                nn.init.trunc_normal_(module.w_out, 0.0, std, -2 * std, 2 * std)
                for bias in (module.b_in, module.b_out):
                    if bias is not None:
                        nn.init.zeros_(bias)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, 0.0, std, -2 * std, 2 * std)
        nn.init.zeros_(self.head.weight)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> VisionOutput:
        cfg = self.config
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if not isinstance(images, Tensor) or not images.dtype.is_floating_point:
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor [B, C, H, W], got {got}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}: expected [B, {', '.join(map(str, expected))}]")
        x_BND = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(x_BND.shape[0], -1, -1), x_BND], dim=1)
        x_BSD = x_BND + self.pos_embed
        for block in self.blocks:
            x_BSD = block(x_BSD)
        x_BSD = self.norm(x_BSD)
        pooled_BD = x_BSD[:, 0] if self.cls_token is not None else x_BSD.mean(dim=1)
        logits = self.head(pooled_BD)
        aux = total_aux_loss(self).to(logits.device)  # every MoE layer ran in this forward
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:1] or labels.dtype.is_floating_point:
                raise ValueError(
                    f"labels must be integer class ids of shape [{logits.shape[0]}], got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            loss = F.cross_entropy(logits.float(), labels) + aux
        return VisionOutput(logits, loss, aux)

    def num_params(self, active: bool = False) -> int:
        """Parameters; with `active`, those one image token uses (k of E experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        unused = 0
        for block in self.blocks:
            if block.is_moe:
                moe = block.ffn.config
                per_expert = sum(p.numel() for p in block.ffn.experts.parameters()) // moe.num_experts
                unused += (moe.num_experts - moe.top_k) * per_expert
        return total - unused
