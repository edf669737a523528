"""An auxiliary retrieval loss for :class:`memkit.PromptBankMemory`: train the prompt's relevance.

A prompt bank returns its top-``B`` candidates by :meth:`memkit.PromptBankMemory.relevance`.
That choice is discrete, so the flow-matching loss gives the prompt projection (the network's
``prompt_proj``, or the bank's own) no gradient, and nothing makes a prompt score the frames
written under it above the others. This loss does, from what a training step already has:
the keys each bank wrote (its newest prototype after every write) and the prompt each segment
was generated with. Two segments of a clip with the same prompt show the same scene, which is
the only label used.

For segment ``s`` of a clip, its prompt's relevance to the frames written at segments
``j < s`` (what a read at ``s`` chooses from) is a softmax share ``r_j`` (``score="softmax"``:
the shares sum to 1). With ``P_s`` the past frames written under the same prompt,

    loss_s = -log(sum_{j in P_s} r_j + eps)

(InfoNCE with several positives), averaged over the ``(clip, s)`` that have at least one past
frame of the same prompt and one of another, and over the bank layers.
"""

from typing import Any

import torch
from torch import Tensor

from memkit.memories.prompt_bank import PromptBankMemory, PromptBankState

__all__ = ["newest_prototype", "same_prompt", "bank_retrieval_loss", "bank_precision", "collect_bank_keys"]

_EPS = 1e-6


def newest_prototype(state: PromptBankState) -> tuple[Tensor, Tensor]:
    """The frame the last write recorded: keys ``(b h t d)`` and whether it recorded one ``(b,)``.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PromptBankMemory(heads=2, head_dim=4, tokens_per_frame=3, bank_frames=2)
        >>> k = torch.randn(1, 2, 3, 4)
        >>> state = mem.write(mem.init_state(1), memkit.Chunk(k, k, torch.randn(1, 3, 8), torch.tensor([[5]]), 3))
        >>> keys, ok = newest_prototype(state)
        >>> torch.equal(keys, k.reshape(1, 2, 1, 3, 4)[:, :, 0]), ok.tolist()
        (True, [True])
    """
    newest = (state.stamp == state.writes[:, None]) & state.pool.valid  # (b P)
    slot = newest.long().argmax(dim=1)  # (b,)
    k = state.pool.k
    index = slot[:, None, None, None, None].expand(k.shape[0], k.shape[1], 1, k.shape[3], k.shape[4])
    return k.gather(2, index)[:, :, 0], newest.any(dim=1)


def same_prompt(prompt: Tensor, prompt_mask: Tensor | None = None) -> Tensor:
    """``(b S S)`` whether segments ``i`` and ``j`` of a clip have the same prompt ``(b S p e)``.

    Example:
        >>> import torch
        >>> a, b = torch.ones(4, 3), torch.zeros(4, 3)
        >>> same_prompt(torch.stack([a, b, a])[None])[0].int().tolist()
        [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    """
    flat = prompt.flatten(2)
    same = (flat[:, :, None, :] == flat[:, None, :, :]).all(dim=-1)
    if prompt_mask is not None:
        same = same & (prompt_mask[:, :, None, :] == prompt_mask[:, None, :, :]).all(dim=-1)
    return same


def _past_relevance(
    mem: PromptBankMemory, keys: Tensor, written: Tensor, prompt: Tensor, mask: Tensor | None
) -> Tensor:
    """``(b S W)``: segment ``s``'s prompt's relevance to the ``W`` written frames ``j < s``."""
    segments, w = prompt.shape[1], keys.shape[2]
    j = torch.arange(w, device=keys.device)
    rows = []
    for s in range(segments):
        valid = written & (j < s)[None, :]
        rows.append(mem.relevance(keys, valid, prompt[:, s], None if mask is None else mask[:, s]))
    return torch.stack(rows, dim=1)


def bank_retrieval_loss(
    banks: list[tuple[PromptBankMemory, Tensor, Tensor]], prompt: Tensor, prompt_mask: Tensor | None, same: Tensor
) -> Tensor:
    """The retrieval loss above, averaged over bank layers; 0 (with a graph) where nothing qualifies.

    Args:
        banks: per bank layer ``(memory, keys (b h W t d), written (b W))``: the keys of the
            frame written at segment ``j`` (``W`` writes, ``j = 0 .. W-1``) and whether one was.
        prompt: ``(b S p e)`` each segment's prompt as the bank sees it (after the network's
            projection), ``S >= W``.
        prompt_mask: ``(b S p)`` or ``None``.
        same: ``(b S S)`` bool, :func:`same_prompt` of the clip's raw prompts.

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PromptBankMemory(heads=1, head_dim=2, tokens_per_frame=1)
        >>> keys = torch.tensor([[4.0, 0.0], [0.0, 4.0]]).reshape(1, 1, 2, 1, 2)   # scene A, then scene B
        >>> prompt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).reshape(1, 3, 1, 2)  # A, B, A
        >>> same = same_prompt(prompt)
        >>> good = bank_retrieval_loss([(mem, keys, torch.ones(1, 2, dtype=torch.bool))], prompt, None, same)
        >>> bad = bank_retrieval_loss([(mem, keys.flip(2), torch.ones(1, 2, dtype=torch.bool))], prompt, None, same)
        >>> bool(good < bad)
        True
    """
    total: Tensor | None = None
    for mem, keys, written in banks:
        w = keys.shape[2]
        rel = _past_relevance(mem, keys, written, prompt, prompt_mask)  # (b S W)
        s = torch.arange(prompt.shape[1], device=keys.device)
        past = written[:, None, :] & (torch.arange(w, device=keys.device)[None, :] < s[:, None])[None]
        pos = same[:, :, :w] & past
        neg = ~same[:, :, :w] & past
        use = pos.any(dim=2) & neg.any(dim=2)  # (b S)
        hit = torch.where(pos, rel, torch.zeros_like(rel)).sum(dim=2)
        nll = -torch.log(hit + _EPS)
        layer = torch.where(use, nll, torch.zeros_like(nll)).sum() / use.sum().clamp(min=1)
        total = layer if total is None else total + layer
    if total is None:
        return prompt.sum() * 0.0
    return total / len(banks)


def bank_precision(
    banks: list[tuple[PromptBankMemory, Tensor, Tensor]], prompt: Tensor, prompt_mask: Tensor | None, same: Tensor
) -> float:
    """Share of the top-``B`` past frames (per bank's ``bank_frames``) that were written under the reading
    segment's prompt, over the reads that have a frame of the same prompt and one of another in the past.

    What :func:`bank_retrieval_loss` trains for, measured as a read chooses (no cut-off; without the pool's
    limit of ``B + 1`` candidates: every past frame competes).

    Example:
        >>> import torch, memkit
        >>> mem = memkit.PromptBankMemory(heads=1, head_dim=2, tokens_per_frame=1, bank_frames=1)
        >>> keys = torch.tensor([[4.0, 0.0], [0.0, 4.0]]).reshape(1, 1, 2, 1, 2)
        >>> prompt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).reshape(1, 3, 1, 2)
        >>> bank_precision([(mem, keys, torch.ones(1, 2, dtype=torch.bool))], prompt, None, same_prompt(prompt))
        1.0
    """
    hits = returned = 0
    with torch.no_grad():
        for mem, keys, written in banks:
            w = keys.shape[2]
            rel = _past_relevance(mem, keys, written, prompt, prompt_mask)
            s = torch.arange(prompt.shape[1], device=keys.device)
            past = written[:, None, :] & (torch.arange(w, device=keys.device)[None, :] < s[:, None])[None]
            pos = same[:, :, :w] & past
            use = pos.any(dim=2) & (~same[:, :, :w] & past).any(dim=2)
            k = min(mem.bank_frames, w)
            top = rel.masked_fill(~past, float("-inf")).topk(k, dim=2).indices  # (b S k)
            chosen_ok = past.gather(2, top)
            chosen_pos = pos.gather(2, top) & chosen_ok
            hits += int((chosen_pos & use[..., None]).sum())
            returned += int((chosen_ok & use[..., None]).sum())
    return hits / max(returned, 1)


def collect_bank_keys(
    net: Any, states_per_write: list[tuple[Any, ...]]
) -> list[tuple[PromptBankMemory, Tensor, Tensor]]:
    """Per :class:`PromptBankMemory` layer of ``net``, the keys each write recorded, stacked over writes.

    ``states_per_write[j]``: the network's states after the write of segment ``j``. Returns
    ``(memory, keys (b h W t d), written (b W))`` per bank layer (none for other memories).

    Example:
        >>> import torch
        >>> from memkit.models.malt import MALTConfig, MALTNetwork
        >>> net = MALTNetwork(MALTConfig.preset("tiny", prompt_dim=6, memory="prompt_bank"))
        >>> states, after = net.init_states(1), []
        >>> for s in range(3):
        ...     states = net.write(torch.randn(1, 2, 3, 8, 8), states, net.segment_positions(s, 1))
        ...     after.append(states)
        >>> [(keys.shape, ok.tolist()) for _, keys, ok in collect_bank_keys(net, after)][0]
        (torch.Size([1, 2, 3, 4, 16]), [[True, True, True]])
    """
    out = []
    for i, block in enumerate(net.block_list):
        mem = block.attn.memory
        if not isinstance(mem, PromptBankMemory) or not states_per_write:
            continue
        keys, ok = zip(*(newest_prototype(states[i]) for states in states_per_write), strict=True)
        out.append((mem, torch.stack(keys, dim=2), torch.stack(ok, dim=1)))
    return out
