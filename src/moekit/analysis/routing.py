"""Routing analysis: where a model's tokens go, how evenly, with which other experts, and what each expert prefers.

Legend: N tokens analysed, B batch, S sequence, T tokens of one forward, K slots per token, E experts, V vocabulary,
G groups (domains, or token ids when token identity is the label).

Two halves:

* statistics: pure functions on tensors (`expert_load`, `load_imbalance`, `coefficient_of_variation`,
  `coactivation`, `mutual_information`, `shuffled_mutual_information`, `conditional_mutual_information`, `consistency`, `repeat_rate`,
  `top_tokens_by_lift`, `domain_shares`, `collapse_warning`), each checked against a hand-computed case in
  `tests/analysis/test_routing.py`;
* recording: `RoutingRecorder` hooks the router of every MoE layer of any model (forward hooks: the MoE layer's own
  path is untouched and costs nothing when no recorder is attached), and `analyze_routing(model, ids, domains)` runs
  a model over a token stream (batched, no grad) and returns a `RoutingAnalysis` of every MoE layer.

Routing decisions are the router's (before capacity): `indices [N, K]` with -1 for an empty slot. For top-k routers
slot 0 is the first choice (highest score). Expert-choice routing is turned token-major (each token's experts,
ascending, padded with -1), so it has no first choice. What capacity did to the slots is reported from the layers'
own statistics (`MoEStats.dropped`, `.rerouted`, `.tokens_per_expert`).

Mutual information is computed over slots: every (token, slot) pair is one draw of (label, expert), so a top-2 token
counts twice, once per expert. Its plug-in estimate is biased upwards by about (G-1)(E-1) / (2 N ln 2) bits (Miller
1955), which is large for token identity (G = V), so every MI is reported beside a baseline: the same MI with the
labels shuffled across tokens (mean and standard deviation over several shuffles). The excess over the baseline is
the evidence of specialisation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.balance import router_entropy
from moekit.layers.moe import MoE, moe_layers
from moekit.layers.routing import RouterOutput

# The collapse warning fires when the busiest expert is chosen by more than COLLAPSE_TOKEN_SHARE of the tokens AND
# its load is at least COLLAPSE_MAX_OVER_MEAN times the mean load. The first condition alone would fire on a healthy
# top-2-of-4 router (balanced share 50%), the second alone on a mildly uneven top-1-of-32 one.
COLLAPSE_TOKEN_SHARE = 0.5
COLLAPSE_MAX_OVER_MEAN = 2.0


# ---------------------------------------------------------------------------------------------------- statistics


def _check_indices(indices_NK: Tensor, num_experts: int) -> Tensor:
    if indices_NK.dim() != 2 or indices_NK.dtype.is_floating_point or indices_NK.dtype == torch.bool:
        raise ValueError(f"indices must be an [N, K] integer tensor, got {tuple(indices_NK.shape)} {indices_NK.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if indices_NK.numel() and (int(indices_NK.max()) >= num_experts or int(indices_NK.min()) < -1):
        raise ValueError(
            f"indices hold experts {int(indices_NK.min())}..{int(indices_NK.max())}: expected -1 (empty slot) or "
            f"0..{num_experts - 1}"
        )
    return indices_NK.long()


def _check_labels(labels_N: Tensor, num_labels: int, num_tokens: int, name: str = "labels") -> Tensor:
    if labels_N.dim() != 1 or labels_N.numel() != num_tokens:
        raise ValueError(f"{name} has shape {tuple(labels_N.shape)}, expected [{num_tokens}] (one per token)")
    labels_N = labels_N.long()
    if labels_N.numel() and (int(labels_N.min()) < 0 or int(labels_N.max()) >= num_labels):
        raise ValueError(
            f"{name} hold values {int(labels_N.min())}..{int(labels_N.max())}: expected 0..{num_labels - 1}"
        )
    return labels_N


def expert_load(indices_NK: Tensor, num_experts: int) -> Tensor:
    """Slots routed to each expert.

    Args:
        indices_NK: [N, K] expert of each slot, -1 for an empty slot.
        num_experts: E.
    Returns:
        [E] int64 counts (empty slots not counted). With distinct experts per token, also the tokens per expert.
    """
    flat = _check_indices(indices_NK, num_experts).reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


def load_imbalance(load_E: Tensor) -> float:
    """max / mean of the load: 1.0 is perfect balance, E/K means one expert is in every token's choice."""
    load_E = load_E.double()
    mean = load_E.mean()
    return float(load_E.max() / mean) if mean > 0 else float("nan")


def coefficient_of_variation(load_E: Tensor) -> float:
    """std / mean of the load (population std, as in Shazeer et al. 2017's CV importance loss): 0 is balanced."""
    load_E = load_E.double()
    mean = load_E.mean()
    return float(load_E.std(unbiased=False) / mean) if mean > 0 else float("nan")


def coactivation(indices_NK: Tensor, num_experts: int) -> Tensor:
    """How often two experts are chosen by the same token.

    Args:
        indices_NK: [N, K] expert of each slot, -1 for an empty slot.
        num_experts: E.
    Returns:
        [E, E] int64, symmetric: entry (i, j), i != j, counts the tokens whose slots include both i and j; the
        diagonal (i, i) counts the tokens that chose i (a token listing an expert twice counts once).
        Divide by N for the share of tokens; for K distinct uniform-random choices the off-diagonal share is
        K(K-1) / (E(E-1)) (`chance_coactivation`).
    """
    indices_NK = _check_indices(indices_NK, num_experts)
    N = indices_NK.shape[0]
    chosen_NE = torch.zeros(N, num_experts + 1, dtype=torch.float64)
    chosen_NE.scatter_(1, torch.where(indices_NK >= 0, indices_NK, num_experts), 1.0)
    chosen_NE = chosen_NE[:, :num_experts]
    return (chosen_NE.T @ chosen_NE).round().long()


def chance_coactivation(num_experts: int, top_k: int) -> float:
    """Share of tokens choosing a given pair of experts when each picks top_k distinct experts uniformly."""
    if num_experts < 2:
        return 0.0
    return top_k * (top_k - 1) / (num_experts * (num_experts - 1))


def _slot_pairs(labels_N: Tensor, indices_NK: Tensor) -> tuple[Tensor, Tensor]:
    K = indices_NK.shape[1]
    labels_M = labels_N.repeat_interleave(K)
    experts_M = indices_NK.reshape(-1)
    keep = experts_M >= 0
    return labels_M[keep], experts_M[keep]


def _mi_from_counts(joint_GE: Tensor) -> float:
    joint = joint_GE.double()
    total = joint.sum()
    if total <= 0:
        return 0.0
    p_GE = joint / total
    p_G = p_GE.sum(1, keepdim=True)
    p_E = p_GE.sum(0, keepdim=True)
    nz = p_GE > 0
    return float((p_GE[nz] * torch.log2(p_GE[nz] / (p_G * p_E).expand_as(p_GE)[nz])).sum().clamp_min(0.0))


def joint_counts(labels_N: Tensor, indices_NK: Tensor, num_labels: int, num_experts: int) -> Tensor:
    """[G, E] int64: slots with label g routed to expert e (each token's label repeated over its K slots)."""
    indices_NK = _check_indices(indices_NK, num_experts)
    labels_N = _check_labels(labels_N, num_labels, indices_NK.shape[0])
    labels_M, experts_M = _slot_pairs(labels_N, indices_NK)
    flat = torch.bincount(labels_M * num_experts + experts_M, minlength=num_labels * num_experts)
    return flat.view(num_labels, num_experts)


def mutual_information(labels_N: Tensor, indices_NK: Tensor, num_labels: int, num_experts: int) -> float:
    """I(label; expert) in bits, over slots (the plug-in estimate from the [G, E] contingency table).

    Args:
        labels_N: [N] label of each token in 0..G-1 (a domain, or the token id).
        indices_NK: [N, K] expert of each slot, -1 for an empty slot.
        num_labels: G.
        num_experts: E.
    Returns:
        MI in bits: 0 for routing independent of the label, H(label) when the label fixes the expert set
        (disjoint sets per label).
    """
    return _mi_from_counts(joint_counts(labels_N, indices_NK, num_labels, num_experts))


def entropy_bits(counts: Tensor) -> float:
    """Shannon entropy in bits of the distribution proportional to `counts`."""
    p = counts.double().flatten()
    p = p[p > 0] / p.sum() if p.sum() > 0 else p[:0]
    return float(-(p * torch.log2(p)).sum())


@dataclass
class Baseline:
    """A statistic beside the same statistic with the labels shuffled across tokens.

    Attributes:
        value: on the real labels.
        baseline_mean, baseline_std: over the shuffles (std with N-1; 0 for one shuffle).
        excess: value - baseline_mean.
        shuffles: how many shuffles.
    """

    value: float
    baseline_mean: float
    baseline_std: float
    excess: float
    shuffles: int


def _baseline(value: float, shuffled: list[float]) -> Baseline:
    t = torch.tensor(shuffled, dtype=torch.float64)
    mean = float(t.mean()) if len(shuffled) else float("nan")
    std = float(t.std()) if len(shuffled) > 1 else 0.0
    return Baseline(value, mean, std, value - mean, len(shuffled))


def shuffled_mutual_information(
    labels_N: Tensor,
    indices_NK: Tensor,
    num_labels: int,
    num_experts: int,
    shuffles: int = 5,
    generator: torch.Generator | None = None,
) -> Baseline:
    """`mutual_information` beside its shuffled-label baseline.

    Each shuffle permutes the labels across tokens (a token's K slots keep one label), which keeps both marginals
    and destroys any dependence: what remains is the estimator's bias at this N, G and E.

    Args:
        labels_N, indices_NK, num_labels, num_experts: as in `mutual_information`.
        shuffles: number of permutations (>= 1).
        generator: seeds the permutations (default: seed 0), so reports are reproducible.
    Returns:
        Baseline with MI values in bits.
    """
    if shuffles < 1:
        raise ValueError(f"shuffles must be >= 1, got {shuffles}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    value = mutual_information(labels_N, indices_NK, num_labels, num_experts)
    N = labels_N.numel()
    shuffled = [
        mutual_information(labels_N[torch.randperm(N, generator=generator)], indices_NK, num_labels, num_experts)
        for _ in range(shuffles)
    ]
    return _baseline(value, shuffled)


def conditional_mutual_information(
    labels_N: Tensor, indices_NK: Tensor, given_N: Tensor, num_labels: int, num_experts: int, num_given: int
) -> float:
    """I(label; expert | given) in bits, over slots: what the label tells about the expert beyond `given`.

    With the domain as label and the token id as `given`, this separates domain specialisation from the fact that
    code and prose use different tokens: it is 0 when, token by token, code and prose occurrences of the same token
    go to the same experts. Computed as sum_z p(z) I(label; expert | given = z).

    Args:
        labels_N: [N] label of each token (0..num_labels-1).
        indices_NK: [N, K] experts, -1 for empty slots.
        given_N: [N] the conditioning variable (0..num_given-1).
        num_labels, num_experts, num_given: the ranges.
    Returns:
        The conditional MI in bits (>= 0).
    """
    indices_NK = _check_indices(indices_NK, num_experts)
    N = indices_NK.shape[0]
    labels_N = _check_labels(labels_N, num_labels, N)
    given_N = _check_labels(given_N, num_given, N, "given")
    K = indices_NK.shape[1]
    z_M = given_N.repeat_interleave(K)
    labels_M, experts_M = labels_N.repeat_interleave(K), indices_NK.reshape(-1)
    keep = experts_M >= 0
    z_M, labels_M, experts_M = z_M[keep], labels_M[keep], experts_M[keep]
    cells = (z_M * num_labels + labels_M) * num_experts + experts_M
    joint = torch.bincount(cells, minlength=num_given * num_labels * num_experts).double()
    joint = joint.view(num_given, num_labels, num_experts)
    total = joint.sum()
    if total <= 0:
        return 0.0
    n_Z = joint.sum((1, 2), keepdim=True)
    p_XE_given_Z = joint / n_Z.clamp_min(1)
    p_X = p_XE_given_Z.sum(2, keepdim=True)
    p_E = p_XE_given_Z.sum(1, keepdim=True)
    nz = joint > 0
    terms = joint[nz] / total * torch.log2(p_XE_given_Z[nz] / (p_X * p_E).expand_as(joint)[nz])
    return float(terms.sum().clamp_min(0.0))


def shuffled_conditional_mutual_information(
    labels_N: Tensor,
    indices_NK: Tensor,
    given_N: Tensor,
    num_labels: int,
    num_experts: int,
    num_given: int,
    shuffles: int = 5,
    generator: torch.Generator | None = None,
) -> Baseline:
    """`conditional_mutual_information` beside its baseline with the labels shuffled within each `given` group
    (which keeps the label-given association and destroys only the label's own link to the expert)."""
    if shuffles < 1:
        raise ValueError(f"shuffles must be >= 1, got {shuffles}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    args = (num_labels, num_experts, num_given)
    value = conditional_mutual_information(labels_N, indices_NK, given_N, *args)
    grouped = torch.argsort(given_N, stable=True)  # positions grouped by `given`, in order within a group
    shuffled = []
    for _ in range(shuffles):
        jitter = torch.rand(given_N.numel(), generator=generator, dtype=torch.float64)
        within = torch.argsort(given_N.double() + jitter)  # the same groups, each in a random order
        permuted = labels_N.clone()
        permuted[grouped] = labels_N[within]
        shuffled.append(conditional_mutual_information(permuted, indices_NK, given_N, *args))
    return _baseline(value, shuffled)


def consistency(keys_N: Tensor, experts_N: Tensor, num_keys: int, num_experts: int) -> float:
    """How well a key predicts the expert: the share of tokens whose expert is the most frequent one for its key.

    With the token id as key this is the "same token, same expert" consistency; with a constant key it is the
    busiest expert's share (the accuracy of always guessing it). A key seen once is trivially consistent, so compare
    with the shuffled-key value (`shuffled_consistency`).

    Args:
        keys_N: [N] key of each token in 0..num_keys-1.
        experts_N: [N] one expert per token (e.g. the first choice, `indices_NK[:, 0]`), -1 to skip a token.
        num_keys, num_experts: the ranges.
    Returns:
        A share in [0, 1] (NaN without tokens).
    """
    experts_N = _check_indices(experts_N.reshape(-1, 1), num_experts).reshape(-1)
    keys_N = _check_labels(keys_N, num_keys, experts_N.numel(), "keys")
    keep = experts_N >= 0
    keys_N, experts_N = keys_N[keep], experts_N[keep]
    if keys_N.numel() == 0:
        return float("nan")
    counts = torch.bincount(keys_N * num_experts + experts_N, minlength=num_keys * num_experts)
    return int(counts.view(num_keys, num_experts).max(dim=1).values.sum()) / keys_N.numel()


def shuffled_consistency(
    keys_N: Tensor,
    experts_N: Tensor,
    num_keys: int,
    num_experts: int,
    shuffles: int = 5,
    generator: torch.Generator | None = None,
) -> Baseline:
    """`consistency` beside its value with the keys shuffled across tokens (mean and std over `shuffles`)."""
    if shuffles < 1:
        raise ValueError(f"shuffles must be >= 1, got {shuffles}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    value = consistency(keys_N, experts_N, num_keys, num_experts)
    N = keys_N.numel()
    shuffled = [
        consistency(keys_N[torch.randperm(N, generator=generator)], experts_N, num_keys, num_experts)
        for _ in range(shuffles)
    ]
    return _baseline(value, shuffled)


def repeat_rate(indices_BSK: Tensor, first_choice: bool = True) -> float:
    """Share of consecutive token pairs (within a sequence) routed alike (Mixtral paper, Jiang et al. 2024, §5).

    Args:
        indices_BSK: [B, S, K] experts of each token's slots, slot 0 the first choice; -1 for empty slots.
        first_choice: True: pairs whose first choices are equal; False: pairs whose expert sets share at least one
            expert ("first or second choice" for top-2).
    Returns:
        A share in [0, 1]; NaN if no sequence has two tokens. Uniform-random routing gives `chance_repeat_rate`.
    """
    same, pairs = _repeat_counts(indices_BSK, first_choice)
    return same / pairs if pairs else float("nan")


def _repeat_counts(indices_BSK: Tensor, first_choice: bool) -> tuple[int, int]:
    if indices_BSK.dim() != 3:
        raise ValueError(f"indices must be [B, S, K], got shape {tuple(indices_BSK.shape)}")
    a, b = indices_BSK[:, :-1], indices_BSK[:, 1:]
    if first_choice:
        valid = (a[..., 0] >= 0) & (b[..., 0] >= 0)
        same = (a[..., 0] == b[..., 0]) & valid
    else:
        match = (a.unsqueeze(-1) == b.unsqueeze(-2)) & (a.unsqueeze(-1) >= 0)  # [B, S-1, K, K]
        same = match.flatten(-2).any(-1)
        valid = (a >= 0).any(-1) & (b >= 0).any(-1)
    return int(same.sum()), int(valid.sum())


def chance_repeat_rate(num_experts: int, top_k: int, first_choice: bool = True) -> float:
    """`repeat_rate` of uniform-random routing: 1/E for the first choice, 1 - C(E-K, K)/C(E, K) for any overlap
    (Mixtral §5: 12.5% and 46% for 8 experts, top-2)."""
    if first_choice:
        return 1 / num_experts
    return 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


@dataclass
class TokenLift:
    """One of an expert's preferred tokens. Attributes: token (id), text (decoded), lift, count (tokens of this id
    routed to the expert), total (tokens of this id)."""

    token: int
    text: str
    lift: float
    count: int
    total: int


def top_tokens_by_lift(
    ids_N: Tensor,
    indices_NK: Tensor,
    vocab_size: int,
    num_experts: int,
    top: int = 10,
    min_count: int = 5,
    decode: Callable[[int], str] | None = None,
) -> list[list[TokenLift]]:
    """The tokens each expert takes more often than the corpus has them.

    lift(v, e) = P(token v | routed to e) / P(token v) = (n_ve / n_e) / (n_v / N): 1 for an expert that takes v as
    often as any token, up to N / n_e (= E/K when balanced) for an expert that takes every v. Tokens routed to e
    fewer than `min_count` times are skipped (a token seen once has a huge, meaningless lift).

    Args:
        ids_N: [N] token ids.
        indices_NK: [N, K] experts, -1 for empty slots.
        vocab_size: V.
        num_experts: E.
        top: tokens per expert.
        min_count: minimum n_ve.
        decode: token id -> text (default: the id as text).
    Returns:
        For each expert, up to `top` TokenLift by decreasing lift (ties: more frequent first).
    """
    joint_VE = joint_counts(ids_N, indices_NK, vocab_size, num_experts).double()
    n_V = torch.bincount(ids_N.long(), minlength=vocab_size).double()
    n_E = joint_VE.sum(0)
    N = ids_N.numel()
    decode = decode or str
    out = []
    for e in range(num_experts):
        if n_E[e] == 0:
            out.append([])
            continue
        lift_V = (joint_VE[:, e] / n_E[e]) / (n_V / N).clamp_min(1e-300)
        lift_V = torch.where(joint_VE[:, e] >= min_count, lift_V, torch.full_like(lift_V, -1.0))
        by_count = torch.argsort(joint_VE[:, e], descending=True, stable=True)  # ties in lift: more frequent first
        order = by_count[torch.argsort(lift_V[by_count], descending=True, stable=True)][:top].tolist()
        out.append([
            TokenLift(v, decode(v), float(lift_V[v]), int(joint_VE[v, e]), int(n_V[v])) for v in order if lift_V[v] >= 0
        ])
    return out


def domain_shares(labels_N: Tensor, indices_NK: Tensor, num_labels: int, num_experts: int) -> Tensor:
    """[E, G] float64: the share of each expert's slots that come from each domain (rows sum to 1; 0 if unused)."""
    joint_GE = joint_counts(labels_N, indices_NK, num_labels, num_experts).double()
    per_E = joint_GE.sum(0, keepdim=True)
    return (joint_GE / per_E.clamp_min(1)).T


def collapse_warning(load_E: Tensor, num_tokens: int) -> str | None:
    """A warning when the router sends most tokens to one expert, else None.

    Fires when the busiest expert is chosen by more than COLLAPSE_TOKEN_SHARE (50%) of the tokens and its load is
    at least COLLAPSE_MAX_OVER_MEAN (2x) the mean load.

    Args:
        load_E: [E] tokens (= slots, for distinct experts per token) routed to each expert.
        num_tokens: N.
    """
    if num_tokens <= 0 or load_E.sum() <= 0:
        return None
    busiest = int(load_E.argmax())
    share = float(load_E[busiest]) / num_tokens
    ratio = load_imbalance(load_E)
    if share > COLLAPSE_TOKEN_SHARE and ratio >= COLLAPSE_MAX_OVER_MEAN:
        return (
            f"router collapse: expert {busiest} takes {share:.0%} of tokens (> {COLLAPSE_TOKEN_SHARE:.0%}) at "
            f"{ratio:.2f}x the mean load (>= {COLLAPSE_MAX_OVER_MEAN:g}x)"
        )
    return None


# ----------------------------------------------------------------------------------------------------- recording


def token_major(route: RouterOutput, num_tokens: int, num_experts: int) -> Tensor:
    """The router's decisions as [T, K] experts per token (-1 for empty slots), whatever the router.

    Token choice: `route.indices` itself. Expert choice ([E, C] tokens per expert): each token's experts in
    ascending order, padded with -1 to the largest number any token got (at least 1).
    """
    if not route.expert_choice:
        return route.indices.detach()
    tokens_EC = route.indices.detach()
    chosen_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=tokens_EC.device)
    experts_EC = torch.arange(num_experts, device=tokens_EC.device).unsqueeze(1).expand_as(tokens_EC)
    chosen_TE[tokens_EC.reshape(-1), experts_EC.reshape(-1)] = True
    width = max(1, int(chosen_TE.sum(1).max())) if num_tokens else 1
    ranked_TE = torch.where(chosen_TE, torch.arange(num_experts, device=tokens_EC.device), num_experts)
    ranked_TE = ranked_TE.sort(dim=1).values[:, :width]
    return torch.where(ranked_TE < num_experts, ranked_TE, -1)


class RoutingRecorder:
    """Records every MoE layer's routing decisions while attached (a context manager).

    Forward hooks on the routers see each `RouterOutput`; `pop()` after a model forward returns, per MoE layer, the
    [T, K] decisions (after the layer masked padding), the summed router entropy and the layer's `MoEStats`.
    Nothing is kept between `pop()` calls, and the hooks are removed on exit, so a model without a recorder runs
    exactly as before.

    Args:
        model: any module containing `MoE` layers (a `MoELM`, or an MoE layer itself).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[MoE] = moe_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no MoE layers: nothing to analyse")
        self._routes: list[RouterOutput | None] = [None] * len(self.layers)
        self._handles: list[Any] = []

    def __enter__(self) -> "RoutingRecorder":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, i: int):
        def hook(module, args, output):
            self._routes[i] = output  # the layer masks padding in this same object after the hook returns

        return hook

    def pop(self, num_tokens: int) -> list[dict[str, Any]]:
        """Per MoE layer of the last forward: {"indices": [T, K] int64 CPU, "entropy_sum": router entropy (nats)
        summed over the tokens, "stats": the layer's MoEStats}. The model is run without padding."""
        records = []
        for i, layer in enumerate(self.layers):
            route = self._routes[i]
            if route is None:
                raise RuntimeError(f"MoE layer {i} did not run in the last forward")
            indices_TK = token_major(route, num_tokens, layer.config.num_experts).cpu()
            entropy = float(router_entropy(route.probs.detach())) * num_tokens
            records.append({"indices": indices_TK.long(), "entropy_sum": entropy, "stats": layer.last})
            self._routes[i] = None
        return records


# ------------------------------------------------------------------------------------------------------ analysis


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer over the analysed tokens.

    Attributes:
        layer: the block index of this layer in the model (MoE layers only are listed).
        num_experts, top_k: E and K of the layer.
        tokens_per_expert: [E] slots the router assigned to each expert (before capacity).
        processed_per_expert: [E] slots each expert processed (after capacity).
        load_share: [E] tokens_per_expert / N: the share of tokens that chose each expert.
        imbalance: max/mean of tokens_per_expert. cv: its coefficient of variation.
        entropy: mean router entropy (nats) over tokens; entropy_normalised: divided by ln E (1 = uniform).
        dropped, rerouted: slots dropped / moved to another expert for lack of capacity.
        coactivation: [E, E] tokens choosing both experts (diagonal: tokens choosing the expert).
        coactivation_share: coactivation / N. coactivation_chance: the off-diagonal share of uniform routing.
        domain_mi: I(domain; expert) in bits vs shuffled domains; None with fewer than two domains.
        domain_mi_fraction: domain_mi.excess / H(expert): share of the expert-choice entropy explained.
        domain_shares: [E][G] share of each expert's slots from each domain.
        domain_mi_given_token: I(domain; expert | token id) vs domains shuffled within each token id: the domain's
            information beyond the tokens it uses; None with fewer than two domains.
        token_mi: I(token id; expert) in bits vs shuffled token ids. token_mi_fraction: excess / H(expert).
        token_consistency: share of tokens whose first choice is the most frequent first choice of their token id,
            vs shuffled ids; None without a first choice (expert choice).
        domain_consistency: the same with the domain as key.
        repeat_first, repeat_any: consecutive tokens with the same first choice / overlapping expert sets, with
            the uniform-routing chance values repeat_first_chance, repeat_any_chance, and the same rates with the
            tokens' order shuffled (repeat_first_shuffled, repeat_any_shuffled: mean over the shuffles), the fair
            chance level when the load is uneven.
        top_tokens: per expert, the tokens it prefers most by lift.
        collapse: the collapse warning, or None.
    """

    layer: int
    num_experts: int
    top_k: int
    tokens_per_expert: list[int]
    processed_per_expert: list[int]
    load_share: list[float]
    imbalance: float
    cv: float
    entropy: float
    entropy_normalised: float
    dropped: int
    rerouted: int
    coactivation: list[list[int]]
    coactivation_share: list[list[float]]
    coactivation_chance: float
    expert_entropy_bits: float
    domain_mi: Baseline | None
    domain_mi_fraction: float | None
    domain_shares: list[list[float]] | None
    domain_mi_given_token: Baseline | None
    token_mi: Baseline
    token_mi_fraction: float
    token_consistency: Baseline | None
    domain_consistency: Baseline | None
    repeat_first: float | None
    repeat_any: float
    repeat_first_chance: float
    repeat_any_chance: float
    repeat_first_shuffled: float | None
    repeat_any_shuffled: float
    top_tokens: list[list[TokenLift]] = field(default_factory=list)
    collapse: str | None = None


@dataclass
class RoutingAnalysis:
    """The routing of every MoE layer of a model over a token stream. `to_dict()` is JSON-able.

    Attributes:
        num_tokens: N tokens analysed.
        seq_len: window length the model was run on.
        domain_names: the domain of each domain index ([] when the text has no domains).
        domain_tokens: tokens of each domain.
        layers: one LayerRouting per MoE layer, in model order.
        warnings: the collapse warnings of all layers ("layer i: ...").
        thresholds: the collapse thresholds used.
        source: free-form description of the model and data (set by the caller).
    """

    num_tokens: int
    seq_len: int
    domain_names: list[str]
    domain_tokens: list[int]
    layers: list[LayerRouting]
    warnings: list[str]
    thresholds: dict[str, float]
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(ids_N: Tensor, seq_len: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(start, rows, length) of each batch: full windows of seq_len in batches, then the tail as its own window."""
    N = ids_N.numel()
    full = N // seq_len
    out = [(i * seq_len, min(batch_size, full - i), seq_len) for i in range(0, full, batch_size)]
    if N - full * seq_len > 0:
        out.append((full * seq_len, 1, N - full * seq_len))
    return out


def _progress_enabled() -> bool:
    import os

    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")


@torch.no_grad()
def analyze_routing(
    model: nn.Module,
    ids_N: Tensor,
    domains_N: Tensor | None = None,
    domain_names: Sequence[str] = (),
    seq_len: int = 128,
    batch_size: int = 16,
    shuffles: int = 5,
    top_tokens: int = 10,
    min_count: int = 5,
    decode: Callable[[int], str] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> RoutingAnalysis:
    """Run a model over a token stream and measure the routing of each of its MoE layers.

    Args:
        model: a `MoELM` (from a checkpoint, Hugging Face, or built in code) or any module whose forward takes
            [B, S] token ids and contains MoE layers. Put in eval mode for the duration; its mode is restored.
        ids_N: [N] token ids, cut into consecutive windows of seq_len (the tail as a shorter window).
        domains_N: [N] domain index of each token, or None.
        domain_names: the name of each domain index.
        seq_len: tokens per window (at most the model's max_seq_len).
        batch_size: windows per forward.
        shuffles: shuffled-label baselines per MI / consistency.
        top_tokens: preferred tokens listed per expert; min_count: minimum count for a token to be listed.
        decode: token id -> text for the token lists.
        seed: seeds the shuffles.
        progress: tqdm bar over batches; None = when stderr is a terminal (and not CI).
    Returns:
        The RoutingAnalysis.
    """
    ids_N = ids_N.reshape(-1).long().cpu()
    N = ids_N.numel()
    if N < 2:
        raise ValueError(f"need at least 2 tokens to analyse, got {N}")
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if seq_len < 1 or (max_len is not None and seq_len > max_len):
        raise ValueError(f"seq_len must be in 1..{max_len or 'max_seq_len'}, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    domain_names = list(domain_names)
    if domains_N is not None:
        domains_N = _check_labels(domains_N.reshape(-1).cpu(), max(1, len(domain_names)), N, "domains")
    vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or int(ids_N.max()) + 1)
    if int(ids_N.max()) >= vocab_size or int(ids_N.min()) < 0:
        raise ValueError(f"token ids span {int(ids_N.min())}..{int(ids_N.max())}: the model's vocabulary is {vocab_size}")

    device = next(model.parameters()).device
    batches = _windows(ids_N, seq_len, batch_size)
    show = _progress_enabled() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=N, unit="tok", desc="routing", dynamic_ncols=True, file=sys.stderr)
    was_training = model.training
    model.eval()
    with RoutingRecorder(model) as recorder:
        L = len(recorder.layers)
        indices: list[list[Tensor]] = [[] for _ in range(L)]
        shapes: list[tuple[int, int]] = []
        entropy_sum = [0.0] * L
        processed = [torch.zeros(layer.config.num_experts, dtype=torch.long) for layer in recorder.layers]
        dropped, rerouted = [0] * L, [0] * L
        try:
            for start, rows, length in batches:
                x_BS = ids_N[start : start + rows * length].view(rows, length).to(device)
                model(x_BS)
                for i, rec in enumerate(recorder.pop(rows * length)):
                    indices[i].append(rec["indices"])
                    entropy_sum[i] += rec["entropy_sum"]
                    stats = rec["stats"]
                    processed[i] += stats.tokens_per_expert.long().cpu()
                    dropped[i] += int(stats.dropped)
                    rerouted[i] += int(stats.rerouted)
                shapes.append((rows, length))
                if bar is not None:
                    bar.update(rows * length)
        finally:
            if bar is not None:
                bar.close()
            model.train(was_training)
        layer_blocks = _block_indices(model, recorder.layers)

    generator = torch.Generator().manual_seed(seed)
    layers, warnings = [], []
    for i, layer in enumerate(recorder.layers):
        width = max(t.shape[1] for t in indices[i])
        padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in indices[i]]
        result = _layer_routing(
            layer_blocks[i], layer, torch.cat(padded), padded, shapes, ids_N, domains_N, len(domain_names),
            vocab_size, entropy_sum[i], processed[i], dropped[i], rerouted[i], shuffles, top_tokens, min_count,
            decode, generator,
        )
        if result.collapse:
            warnings.append(f"layer {result.layer}: {result.collapse}")
        layers.append(result)
    domain_tokens = [] if domains_N is None else torch.bincount(domains_N, minlength=len(domain_names)).tolist()
    return RoutingAnalysis(
        num_tokens=N,
        seq_len=seq_len,
        domain_names=domain_names if domains_N is not None else [],
        domain_tokens=domain_tokens,
        layers=layers,
        warnings=warnings,
        thresholds={"collapse_token_share": COLLAPSE_TOKEN_SHARE, "collapse_max_over_mean": COLLAPSE_MAX_OVER_MEAN},
    )


def _block_indices(model: nn.Module, layers: list[MoE]) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return list(range(len(layers)))
    where = {id(getattr(b, "ffn", None)): j for j, b in enumerate(blocks)}
    return [where.get(id(layer), i) for i, layer in enumerate(layers)]


def _layer_routing(
    block: int,
    layer: MoE,
    indices_NK: Tensor,
    per_batch: list[Tensor],
    shapes: list[tuple[int, int]],
    ids_N: Tensor,
    domains_N: Tensor | None,
    num_domains: int,
    vocab_size: int,
    entropy_sum: float,
    processed_E: Tensor,
    dropped: int,
    rerouted: int,
    shuffles: int,
    top: int,
    min_count: int,
    decode: Callable[[int], str] | None,
    generator: torch.Generator,
) -> LayerRouting:
    cfg = layer.config
    E, N = cfg.num_experts, indices_NK.shape[0]
    load_E = expert_load(indices_NK, E)
    co_EE = coactivation(indices_NK, E)
    expert_entropy = entropy_bits(load_E)
    has_first = cfg.router != "expert_choice"
    first_N = indices_NK[:, 0] if has_first else None

    domain_mi = domain_fraction = shares = domain_cons = domain_given_token = None
    if domains_N is not None and num_domains >= 2:
        domain_mi = shuffled_mutual_information(domains_N, indices_NK, num_domains, E, shuffles, generator)
        domain_fraction = domain_mi.excess / expert_entropy if expert_entropy > 0 else 0.0
        shares = domain_shares(domains_N, indices_NK, num_domains, E).tolist()
        domain_given_token = shuffled_conditional_mutual_information(
            domains_N, indices_NK, ids_N, num_domains, E, vocab_size, shuffles, generator
        )
        if has_first:
            domain_cons = shuffled_consistency(domains_N, first_N, num_domains, E, shuffles, generator)
    token_mi = shuffled_mutual_information(ids_N, indices_NK, vocab_size, E, shuffles, generator)
    token_cons = shuffled_consistency(ids_N, first_N, vocab_size, E, shuffles, generator) if has_first else None

    seqs = [t.view(rows, length, -1) for t, (rows, length) in zip(per_batch, shapes)]
    repeat_first = _mean_rate(seqs, True) if has_first else None
    repeat_any = _mean_rate(seqs, False)
    shuffled_first, shuffled_any = [], []
    for _ in range(shuffles):
        order = torch.randperm(N, generator=generator)
        parts = indices_NK[order].split([rows * length for rows, length in shapes])
        mixed = [t.view(rows, length, -1) for t, (rows, length) in zip(parts, shapes)]
        shuffled_first.append(_mean_rate(mixed, True) if has_first else float("nan"))
        shuffled_any.append(_mean_rate(mixed, False))
    # K for the chance values: the router's top_k, or the mean experts per token for expert choice.
    k_eff = max(1, round(float(load_E.sum()) / N)) if not has_first else cfg.top_k
    return LayerRouting(
        layer=block,
        num_experts=E,
        top_k=k_eff,
        tokens_per_expert=load_E.tolist(),
        processed_per_expert=processed_E.tolist(),
        load_share=(load_E.double() / N).tolist(),
        imbalance=load_imbalance(load_E),
        cv=coefficient_of_variation(load_E),
        entropy=entropy_sum / N,
        entropy_normalised=(entropy_sum / N) / math.log(E) if E > 1 else 0.0,
        dropped=dropped,
        rerouted=rerouted,
        coactivation=co_EE.tolist(),
        coactivation_share=(co_EE.double() / N).tolist(),
        coactivation_chance=chance_coactivation(E, k_eff),
        expert_entropy_bits=expert_entropy,
        domain_mi=domain_mi,
        domain_mi_fraction=domain_fraction,
        domain_shares=shares,
        domain_mi_given_token=domain_given_token,
        token_mi=token_mi,
        token_mi_fraction=token_mi.excess / expert_entropy if expert_entropy > 0 else 0.0,
        token_consistency=token_cons,
        domain_consistency=domain_cons,
        repeat_first=repeat_first,
        repeat_any=repeat_any,
        repeat_first_chance=chance_repeat_rate(E, k_eff, True),
        repeat_any_chance=chance_repeat_rate(E, k_eff, False),
        repeat_first_shuffled=sum(shuffled_first) / shuffles if has_first else None,
        repeat_any_shuffled=sum(shuffled_any) / shuffles,
        top_tokens=top_tokens_by_lift(ids_N, indices_NK, vocab_size, E, top, min_count, decode),
        collapse=collapse_warning(load_E, N),
    )


def _mean_rate(seqs: list[Tensor], first_choice: bool) -> float:
    """repeat_rate pooled over batches of different shapes."""
    counts = [_repeat_counts(s, first_choice) for s in seqs]
    pairs = sum(p for _, p in counts)
    return sum(same for same, _ in counts) / pairs if pairs else float("nan")
