"""The Mixture-of-Experts layer: a drop-in replacement for a transformer's feed-forward block.

Legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token, M kept token-slots.

The forward pass reads as the six steps of DESIGN.md: flatten, route, plan, run experts, combine (+ shared
experts), attach losses and statistics. The layer returns only the output tensor; everything else of the last
forward is in `layer.last` (an `MoEStats`), and `collect_stats(model)` / `total_aux_loss(model)` gather them from
every MoE layer of a model in one call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moekit.config import MoEConfig
from moekit.layers import balance, dispatch, kernels
from moekit.layers.experts import FFN, Experts
from moekit.layers.routing import RouterOutput, build_router


_FEW_SLOTS = 16  # token-slots at or below which an inference call takes the decode path (T=1 up to K=16)
# ... and with the fused decode kernel (layers/kernels), at or below this many slots and this many per expert on
# average: it streams each touched expert's weights once, so it wins while few tokens share an expert (it is
# ~1.3x faster than the grouped path at 1-8 tokens per expert, 2x slower at 16: ad-hoc timings, one 2-core CPU).
_DECODE_KERNEL_SLOTS, _DECODE_KERNEL_SLOTS_PER_EXPERT = 512, 8


@dataclass
class MoEStats:
    """What one MoE forward produced besides its output.

    Attributes:
        aux_loss: scalar, the sum of every enabled balance loss times its coefficient (differentiable; 0 if none).
        losses: the unweighted value of each enabled loss ("switch", "cv2", "z", "seq"), detached.
        tokens_per_expert: [E] slots each expert processed (after capacity).
        routed_per_expert: [E] slots the router assigned to each expert (before capacity).
        dropped: slots dropped for lack of capacity.
        rerouted: slots moved to a next-best expert.
        entropy: mean router entropy over real tokens, in nats (a property, computed from router_probs and mask
            on first access).
        router_logits: [T, E] router logits (float32, detached).
        capacity: slots per expert, or None when dropless.
    """

    aux_loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    tokens_per_expert: Tensor | None = None
    routed_per_expert: Tensor | None = None
    dropped: Tensor | None = None
    rerouted: Tensor | None = None
    router_logits: Tensor | None = None
    capacity: int | None = None
    router_probs: Tensor | None = field(default=None, repr=False)  # [T, E] detached, for `entropy`
    mask: Tensor | None = field(default=None, repr=False)  # [T] bool, True for real tokens, for `entropy`

    @functools.cached_property
    def entropy(self) -> Tensor | None:
        """Mean router entropy over real tokens, in nats (computed on first access: decoding never pays for it)."""
        return None if self.router_probs is None else balance.router_entropy(self.router_probs, self.mask)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Args:
        config: the layer's MoEConfig.

    Call it like an FFN: `y = moe(x)` with x [B, S, D] or [T, D]. Optional keyword arguments: `token_ids` ([B, S]
    or [T] integers; required by the hash router) and `mask` ([B, S] or [T] bool, True for real tokens: padding is
    not routed and does not count in losses or statistics).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = build_router(config)
        oai = dict(swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)
        self.experts = Experts(
            config.num_experts, config.d_model, config.d_ff, config.activation, config.expert_bias, config.expert_impl,
            **oai,
        )
        self.shared_experts = None
        self.shared_gate = None
        if config.num_shared_experts:
            shared_width = config.num_shared_experts * (config.shared_d_ff or config.d_ff)
            # n shared experts summed == one FFN n times as wide (DeepSeekMoE §3.2), so they run as one.
            self.shared_experts = FFN(config.d_model, shared_width, config.activation, config.expert_bias, **oai)
            if config.shared_expert_gate:
                self.shared_gate = nn.Linear(config.d_model, 1, bias=False)
        # Load accumulated over the micro-batches of one optimizer step, for the aux-loss-free bias update.
        self.register_buffer("step_load", torch.zeros(config.num_experts), persistent=False)
        self.last: MoEStats | None = None
        # Set by moekit.parallel.shard_experts: the experts live on several ranks, reached by all-to-all.
        self.expert_parallel = None

    def forward(self, x: Tensor, token_ids: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, S, D] or [T, D] -> same shape. Statistics and losses of this call go to `self.last`."""
        cfg = self.config
        lead_shape = self._check_input(x, token_ids, mask)
        x_TD = x.reshape(-1, cfg.d_model)
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        mask_T = None if mask is None else mask.reshape(-1).to(torch.bool)

        route = self.router(x_TD, token_ids_T, mask_T)
        if mask_T is not None and not route.expert_choice:
            route.indices = route.indices.masked_fill(~mask_T.unsqueeze(1), -1)

        capacity = None
        if cfg.capacity_factor is not None and not route.expert_choice:
            num_real = x_TD.shape[0] if mask_T is None else int(mask_T.sum())
            capacity = dispatch.expert_capacity(
                num_real, cfg.top_k, cfg.num_experts, cfg.capacity_factor, cfg.min_capacity
            )
        if self._few_slots(route, capacity, x_TD):
            y_TD, plan = self._forward_few_slots(x_TD, route)
        else:
            plan = dispatch.plan(route, cfg.num_experts, capacity, cfg.overflow, cfg.capacity_priority)
            if self.expert_parallel is not None:
                y_MD = self.expert_parallel.run_experts(dispatch.gather(x_TD, plan), plan.counts, plan.weights)
                y_TD = dispatch.combine(y_MD, plan)
            elif cfg.checkpoint_experts and torch.is_grad_enabled():
                y_MD = checkpoint(self.experts, dispatch.gather(x_TD, plan), plan.counts, plan.weights,
                                  use_reentrant=False)
                y_TD = dispatch.combine(y_MD, plan)
            else:  # gather, experts (combine weights applied inside: y = w * E(x)), combine
                y_TD = self.experts.forward_tokens(x_TD, plan)

        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        if self.expert_parallel is not None:  # losses, statistics and the bias update see the global batch
            plan = self.expert_parallel.global_plan(plan)
        self.last = self._stats(route, plan, mask_T, lead_shape)
        if self.training and cfg.bias_update_rate > 0:
            self.step_load += plan.routed_counts.to(self.step_load.dtype)
        return y_TD.view(*lead_shape, cfg.d_model)

    def _few_slots(self, route: RouterOutput, capacity: int | None, x_TD: Tensor) -> bool:
        # Decode (a handful of tokens, no autograd, CPU): sorting, planning and grouped kernels cost more than the
        # few expert multiplies themselves, so those run directly (gpt-fast keeps its decode path apart likewise).
        if (
            capacity is not None
            or self.expert_parallel is not None
            or route.expert_choice
            or torch.is_grad_enabled()
            or x_TD.device.type != "cpu"
        ):
            return False
        slots = route.indices.numel()
        few_per_expert = slots <= min(_DECODE_KERNEL_SLOTS, _DECODE_KERNEL_SLOTS_PER_EXPERT * self.config.num_experts)
        return slots <= _FEW_SLOTS or (few_per_expert and self._decode_kernel(x_TD))

    def _decode_kernel(self, x_TD: Tensor) -> bool:
        """Whether the fused decode kernel takes this call: plain SwiGLU experts (no biases) in x's dtype, float32
        or bfloat16, on the CPU, kernels built."""
        ex = self.experts
        return (
            ex.plain_swiglu
            and x_TD.dtype in (torch.float32, torch.bfloat16)
            and ex.w_in.dtype == x_TD.dtype
            and ex.w_in.device.type == "cpu"
            and ex.w_in.is_contiguous()  # (a copy of every expert's weights per call would cost more than it saves)
            and ex.w_out.is_contiguous()
            and kernels.cpu_kernels() is not None
        )

    def _forward_few_slots(self, x_TD: Tensor, route: RouterOutput) -> tuple[Tensor, dispatch.DispatchPlan]:
        T, K = route.indices.shape
        E = self.config.num_experts
        experts = self.experts
        zero = torch.zeros((), dtype=torch.long, device=x_TD.device)
        empty = torch.zeros(0, dtype=torch.long, device=x_TD.device)
        if self._decode_kernel(x_TD):  # one call: each touched expert's weights streamed once for all its tokens
            y_TD, counts_E = kernels.cpu_kernels().moe_decode(
                x_TD.contiguous(), route.indices.contiguous(), route.weights.float().contiguous(),
                experts.w_in, experts.w_out,
            )
            plan = dispatch.DispatchPlan(empty, empty, route.weights.new_zeros(0), counts_E, counts_E, T, K, None,
                                         zero, zero)
            return y_TD, plan
        plain_swiglu = experts.plain_swiglu
        w_in, w_out = experts.weights_as(x_TD.dtype)
        weights_N = route.weights.reshape(-1).to(x_TD.dtype)
        y_ND = x_TD.new_zeros(T * K, x_TD.shape[1])  # one row per slot; empty slots stay zero
        counts = [0] * E
        for slot, e in enumerate(route.indices.reshape(-1).tolist()):
            if e < 0:
                continue
            counts[e] += 1
            x_1D = x_TD[slot // K : slot // K + 1]
            if plain_swiglu:  # the common case, spelled out: no autograd nodes, no temporaries beyond two rows
                h_1X = x_1D @ w_in[e]
                gate_1F, up_1F = h_1X.chunk(2, dim=-1)
                a_1F = torch.nn.functional.silu(gate_1F).mul_(up_1F).mul_(weights_N[slot])
                torch.mm(a_1F, w_out[e], out=y_ND[slot : slot + 1])
            else:
                y_ND[slot : slot + 1] = experts.expert_forward(e, x_1D, weights_N[slot : slot + 1])
        # Summed per token in slot order with the same kernel as the main path.
        y_TD = torch.nn.functional.embedding_bag(torch.arange(T * K, device=x_TD.device).view(T, K), y_ND, mode="sum")
        counts_E = torch.tensor(counts, dtype=torch.long, device=x_TD.device)
        plan = dispatch.DispatchPlan(empty, empty, weights_N[:0], counts_E, counts_E, T, K, None, zero, zero)
        return y_TD, plan

    def _check_input(self, x: Tensor, token_ids: Tensor | None, mask: Tensor | None) -> tuple[int, ...]:
        cfg = self.config
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"MoE input must be a floating-point tensor (hidden states), got {got}")
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"MoE input has shape {tuple(x.shape)}: expected [B, S, {cfg.d_model}] or [T, {cfg.d_model}]"
            )
        lead_shape = tuple(x.shape[:-1])
        for name, t in (("token_ids", token_ids), ("mask", mask)):
            if t is not None and tuple(t.shape) != lead_shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {lead_shape} to match the input tokens")
        if token_ids is not None and (token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool):
            raise TypeError(f"token_ids must be integers, got dtype {token_ids.dtype}")
        return lead_shape

    def _stats(self, route: RouterOutput, plan: dispatch.DispatchPlan, mask_T: Tensor | None, lead_shape) -> MoEStats:
        cfg = self.config
        losses: dict[str, Tensor] = {}
        aux = route.logits.new_zeros(())
        if cfg.aux_loss_coef:
            losses["switch"] = balance.switch_loss(route.probs, plan.routed_counts, mask_T)
            aux = aux + cfg.aux_loss_coef * losses["switch"]
        if cfg.cv2_loss_coef:
            gates_TE = self._gates(route)
            load = route.load_probs if route.load_probs is not None else plan.routed_counts
            cv2_mask_T = mask_T
            if self.expert_parallel is not None:  # CV^2 of the global importance and load: [1, E] sums over ranks
                gates_TE, load, cv2_mask_T = self._global_sums(gates_TE, load, mask_T)
            losses["cv2"] = balance.cv2_loss(gates_TE, load, cv2_mask_T)
            aux = aux + cfg.cv2_loss_coef * losses["cv2"]
        if cfg.z_loss_coef:
            losses["z"] = balance.z_loss(route.logits, mask_T)
            aux = aux + cfg.z_loss_coef * losses["z"]
        if cfg.seq_aux_loss_coef:
            if route.expert_choice:
                raise ValueError("the sequence-wise balance loss needs token-choice routing, not expert_choice")
            B, S = lead_shape if len(lead_shape) == 2 else (1, lead_shape[0])
            mask_BS = None if mask_T is None else mask_T.view(B, S)
            losses["seq"] = balance.sequence_balance_loss(
                route.probs.view(B, S, -1), route.indices.view(B, S, -1), mask_BS
            )
            aux = aux + cfg.seq_aux_loss_coef * losses["seq"]
        return MoEStats(
            aux_loss=aux,
            losses={k: v.detach() for k, v in losses.items()},
            tokens_per_expert=plan.counts,
            routed_per_expert=plan.routed_counts,
            dropped=plan.dropped,
            rerouted=plan.rerouted,
            router_logits=route.logits.detach(),
            capacity=plan.capacity,
            router_probs=route.probs.detach(),
            mask=mask_T,
        )

    def _global_sums(self, gates_TE: Tensor, load: Tensor, mask_T: Tensor | None):
        weight_T1 = None if mask_T is None else mask_T.unsqueeze(1).to(gates_TE.dtype)
        gates_TE = gates_TE if weight_T1 is None else gates_TE * weight_T1
        gates_1E = self.expert_parallel.sum_over_ranks(gates_TE.sum(0, keepdim=True))
        if load.dim() == 2:
            load = (load if weight_T1 is None else load * weight_T1.to(load.dtype)).sum(0, keepdim=True)
            load = self.expert_parallel.sum_over_ranks(load)
        return gates_1E, load, None

    def _gates(self, route: RouterOutput) -> Tensor:
        """The sparse gates [T, E]: each slot's combine weight at its expert."""
        T, E = route.logits.shape
        gates = route.logits.new_zeros(T, E + 1)
        if route.expert_choice:
            tokens = route.indices.reshape(-1)
            experts = torch.arange(E, device=tokens.device).repeat_interleave(route.indices.shape[1])
            return gates[:, :E].index_put((tokens, experts), route.weights.reshape(-1).to(gates.dtype), accumulate=True)
        cols = torch.where(route.indices >= 0, route.indices, E)
        return gates.scatter_add(1, cols, route.weights.to(gates.dtype))[:, :E]

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply one aux-loss-free bias update from the load accumulated since the last call, then reset it.

        Call once per optimizer step (after `optimizer.step()`); `update_biases(model)` does it for every layer.
        """
        rate = self.config.bias_update_rate
        if rate > 0 and self.router.selection_bias is not None and bool(self.step_load.sum() > 0):
            balance.aux_free_bias_update(self.router.selection_bias, self.step_load, rate)
        self.step_load.zero_()


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def collect_stats(model: nn.Module) -> list[MoEStats]:
    """The last forward's MoEStats of every MoE layer that has run, in module order."""
    return [m.last for m in moe_layers(model) if m.last is not None]


def total_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of every MoE layer's last forward (a 0-d tensor; 0 if none)."""
    stats = collect_stats(model)
    if not stats:
        return torch.zeros(())
    return torch.stack([s.aux_loss for s in stats]).sum()


def update_biases(model: nn.Module) -> None:
    """The aux-loss-free balancer's once-per-optimizer-step update, for every MoE layer of a model."""
    for layer in moe_layers(model):
        layer.update_bias()
