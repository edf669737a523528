"""``RecurrentMemory``: MALT Diffusion's fixed-size recurrent memory, with a gated update.

A latent of ``M`` slots of the model dimension ``D`` summarises every segment written so
far. Writing a finished segment updates it by attention from the latent over
``[latent; segment]`` followed by a learned gate (Block-Recurrent Transformer style);
reading hands the latent to attention as ``M`` extra keys/values. Its size never depends
on the length of the video.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from memkit.errors import StateError
from memkit.memories.frames import check_chunk, check_layout, check_query, check_state
from memkit.memories.registry import register_memory
from memkit.protocol import Chunk, Context, Query, ReadLayout, ReadPlan
from memkit.state import MemoryState, check_init_args, check_state_matches, memory_state
from memkit.typing import Float, check_shape, typechecked

__all__ = ["RecurrentMemory", "RecurrentState"]


@memory_state
class RecurrentState(MemoryState):
    """State of :class:`RecurrentMemory`.

    Attributes:
        latent: ``(b M D)`` the memory after every write so far.
        read_k, read_v: ``(b h M d)`` the latent projected to the attention layer's head
            space, computed once per write so that ``read`` (called at every denoising
            step) does no arithmetic.
        partial: ``K - 1`` tensors ``(b M D)`` for ``truncation=K`` (empty otherwise): the
            same values as ``latent`` whose autograd history reaches back only ``1 .. K-1``
            writes (see :class:`RecurrentMemory`, "Truncated backprop").
        writes: ``(b,)`` segments written so far.
        slot_pos: ``(b M)`` float, with ``slot_positions="written"`` only (None otherwise): the
            frame position each slot's content was seen at (the attention-weighted position of
            the segment tokens it absorbed, averaged over writes by how much each write took in).
        slot_mass: ``(b M)`` float in ``[0, 1]``, with ``slot_positions="written"`` only: the share
            of each slot's content that came from written segments (0: still the initial latent,
            never read).
    """

    #: each field's layout: how a state of another configuration is reported
    layouts: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("latent", "partial"), "b m D"),
        **dict.fromkeys(("read_k", "read_v"), "b h m d"),
        "writes": "b",
        **dict.fromkeys(("slot_pos", "slot_mass"), "b m"),
    }

    latent: Tensor
    read_k: Tensor
    read_v: Tensor
    partial: tuple[Tensor, ...]
    writes: Tensor
    # last and optional: None adds no pytree leaf, so states of the default configuration keep
    # their tensors, names and saved files
    slot_pos: Tensor | None = None
    slot_mass: Tensor | None = None


class RecurrentMemory(nn.Module):
    """A fixed-size latent memory updated recurrently from each clean segment (MALT Diffusion).

    The module holds parameters only (the learned initial latent and the update/read
    projections); the latent itself flows through :class:`RecurrentState`.

    **Write** (once per finished segment, from its clean hidden states ``X (b n D)``; in
    training mode ``X`` is first noised, ``X <- X + noise_std * rms(X) * eps`` with
    ``eps ~ N(0, 1)`` and ``rms`` the detached per-token root mean square)::

        A  = L + W_o MHA(query = LN_l(L), keys/values = [LN_l(L); LN_x(X)])
        C  = LN_c(A + MLP(LN_m(A)))              (no MLP when mlp_ratio = 0)
        G  = sigmoid(W_g [L; C] + b_g)            per slot and channel
        L' = G * C + (1 - G) * L

    Every ``L'`` is a per-channel convex combination of the initial latent and layer-normed
    candidates, so ``|L'| <= max(|L_0|, sqrt(D - 1) |gamma_c| + |beta_c|)`` channel-wise
    however many segments are written (without ``LN_c`` the residual ``A = L + ...`` lets
    the latent grow linearly with the number of writes, and each new segment matter less).

    ``W_g`` starts at zero and ``b_g`` at ``gate_bias`` (default -2), so an untrained gate
    is ``sigmoid(-2) ~ 0.12`` everywhere: mostly closed, the latent keeps ~88% of its old
    content per write. As with an LSTM's forget bias, information then survives many writes
    from the first step of training (0.88^4 ~ 0.6 after four writes) and training opens
    the gate where new content is worth taking in.

    **Read** (every denoising step)::

        K_mem = W_k LN_r(L),  V_mem = W_v LN_r(L)        (b h M d), mask all True
        position of every slot = min(query.frame_positions) - 1

    The latent summarises the whole past, so it has no frame of its own. Placing every
    slot one frame before the current segment makes its rotary offset to the segment's
    queries ``1 .. f`` frames, the same at frame 10 as at frame 10 000: the distance never
    grows with the length of the video, so a model never meets offsets it was not trained
    on.

    **Slots at the place they saw** (``slot_positions="written"``). With rotary positions
    that measure where the camera is (``MALTConfig(positions="pose")``) a memory key is found
    by its rotation, and slots that all sit one frame before the query cannot be told apart
    that way. In this mode each slot carries a position, written from what it absorbed::

        s_m  = sum over segment tokens j of a_mj          (write attention, mean over heads)
        p*_m = sum_j a_mj pos_j / s_m                      (where that content was seen)
        w_m  = s_m * mean_c G_mc                           (how much of the slot was replaced)
        p_m' = p_m + w_m (p*_m - p_m),  p_m' = p*_m for a slot never written before

    and ``read`` rotates slot ``m`` at ``round(p_m)``, so a query taken at a place meets the
    slots that absorbed that place at its own rotation, however long ago. Slots never written
    (``slot_mass`` 0) are masked. With ``place_groups=G`` the write is also addressed by place
    (a Neural Map-style write, Parisotto & Salakhutdinov 2017): the slots form ``G`` groups of
    ``M / G``; a frame at position ``p`` is written only into group
    ``round(p / place_size) mod G``, whose slots attend to their own group's latent and that
    frame's tokens; the other groups keep their latent, position and mass. Up to ``G`` places
    then never overwrite one another; more places share groups (the gate mixes them).

    **Truncated backprop** (``truncation=K``, MALT's stop-gradient training): a loss at
    segment ``s`` reads the latent after writes ``1 .. s-1``; its gradient reaches writes
    ``s-1 .. s-K`` (their segments and the parameters used there) and nothing older. The
    window slides, so every loss needs its own cut. The state carries ``K`` copies of the
    latent (same values) whose histories reach back ``1 .. K`` writes: on a write, copy
    ``j`` is the update of copy ``j-1``, and copy ``0`` is the detached latent. The
    segment's keys/values are projected once and shared by the ``K`` updates, the state
    does not depend on the segment length, and each copy's autograd graph is at most ``K``
    writes deep, so nothing older is kept alive. With grad disabled the latent is updated
    once and copied (same values). The latent ``K`` writes back (the initial latent
    during the first writes) is a constant to the loss. ``truncation=None`` is full
    backprop through every write (call ``state.detach()`` to cut it yourself).

    Cost: ``read`` O(M h d) (returns the stored projections and builds positions; the host
    attention then pays O(n M h d) for the ``M`` extra keys). ``write``: O(n D^2) to
    project the segment, plus per latent update O((M + n) M D) for attention and
    O(M D^2 (4 + 2 mlp_ratio + 2)) for projections, MLP and gate; ``K`` updates with
    grad enabled and ``truncation=K``, otherwise one.

    State bytes: ``b (K M D + 2 h M d) itemsize + 8 b`` with ``K = truncation or 1``.

    Args:
        dim: model dimension ``D`` (``chunk.hidden``'s last dimension).
        heads, head_dim: the host attention layer's ``h`` and ``d`` (``head_dim`` defaults
            to ``dim // heads``).
        slots: ``M``, latent tokens.
        write_heads: heads of the write attention (default ``heads``; must divide ``dim``).
        mlp_ratio: hidden width of the update MLP in units of ``D`` (0 disables it).
        gate_bias: initial bias ``b_g`` of the update gate.
        truncation: ``K``, writes a gradient flows through, or None for all of them.
        noise_std: noise added to written segments in training mode, relative to each
            token's RMS (0 disables it; never applied in eval mode).
        slot_positions: ``"before"`` (every slot one frame before the query, the default) or
            ``"written"`` (each slot at the position of what it absorbed; see above).
        place_groups: ``G`` (needs ``slot_positions="written"``, must divide ``slots``): write
            each frame only into the group of slots of its place; ``None`` = every slot.
        place_size: positions per place for ``place_groups`` (8 for the demo's 8-pixel places).

    Example:
        >>> import torch, memkit
        >>> mem = memkit.RecurrentMemory(dim=16, heads=2, slots=4, truncation=2)
        >>> state = mem.init_state(1)
        >>> k = torch.randn(1, 2, 6, 8)  # 3 frames of 2 tokens, 2 heads of dim 8
        >>> state = mem.write(state, memkit.Chunk(k, k, torch.randn(1, 6, 16), torch.tensor([[0, 1, 2]]), 2))
        >>> ctx = mem.read(state, memkit.Query(torch.randn(1, 2, 4, 8), torch.tensor([[3, 4]]), 2))
        >>> ctx.k.shape, ctx.positions[0, 0].tolist()
        (torch.Size([1, 2, 4, 8]), [2, 2, 2, 2])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        *,
        slots: int = 16,
        write_heads: int | None = None,
        mlp_ratio: float = 2.0,
        gate_bias: float = -2.0,
        truncation: int | None = None,
        noise_std: float = 0.0,
        slot_positions: str = "before",
        place_groups: int | None = None,
        place_size: float = 1.0,
        align_tokens: bool = False,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if heads < 1 or dim % heads:
                raise ValueError(
                    f"RecurrentMemory: dim ({dim}) must be divisible by heads ({heads}) unless head_dim is given"
                )
            head_dim = dim // heads
        write_heads = heads if write_heads is None else write_heads
        if min(dim, heads, head_dim, slots, write_heads) < 1:
            raise ValueError(
                f"RecurrentMemory: dim, heads, head_dim, slots and write_heads must be positive, got "
                f"{dim}, {heads}, {head_dim}, {slots}, {write_heads}"
            )
        if dim % write_heads:
            raise ValueError(f"RecurrentMemory: dim ({dim}) must be divisible by write_heads ({write_heads})")
        if truncation is not None and (isinstance(truncation, bool) or truncation < 1):
            raise ValueError(f"RecurrentMemory: truncation must be None or a positive int, got {truncation!r}")
        if noise_std < 0 or mlp_ratio < 0:
            raise ValueError(f"RecurrentMemory: noise_std and mlp_ratio must be >= 0, got {noise_std}, {mlp_ratio}")
        if slot_positions not in ("before", "written"):
            raise ValueError(f"RecurrentMemory: slot_positions must be 'before' or 'written', got {slot_positions!r}")
        if place_groups is not None:
            if slot_positions != "written":
                raise ValueError("RecurrentMemory: place_groups needs slot_positions='written'")
            if isinstance(place_groups, bool) or place_groups < 1 or slots % place_groups:
                raise ValueError(
                    f"RecurrentMemory: place_groups must be a positive divisor of slots ({slots}), got {place_groups!r}"
                )
        if align_tokens and place_groups is None:
            raise ValueError("RecurrentMemory: align_tokens needs place_groups")
        if not place_size > 0:
            raise ValueError(f"RecurrentMemory: place_size must be > 0, got {place_size}")
        self.slot_positions, self.place_groups, self.place_size = slot_positions, place_groups, float(place_size)
        self.align_tokens = bool(align_tokens)
        self.dim, self.heads, self.head_dim, self.slots = dim, heads, head_dim, slots
        self.write_heads, self.mlp_ratio, self.gate_bias = write_heads, mlp_ratio, gate_bias
        self.truncation, self.noise_std = truncation, noise_std

        self.init_latent = nn.Parameter(torch.randn(slots, dim) * 0.02)
        # write: one transformer-style block from the latent over [latent; segment], then the gate
        self.norm_latent = nn.LayerNorm(dim)
        self.norm_segment = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        hidden = round(mlp_ratio * dim)
        self.mlp: nn.Module | None = None
        if hidden > 0:
            self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_candidate = nn.LayerNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)
        # read: the latent in the host attention's head space
        self.norm_read = nn.LayerNorm(dim)
        self.to_read_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)

    @property
    def _name(self) -> str:
        return type(self).__name__

    @property
    def _copies(self) -> int:
        return 1 if self.truncation is None else self.truncation

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RecurrentState:
        """The learned initial latent for ``batch_size`` streams (keeps its autograd link to the parameter)."""
        batch_size = check_init_args(f"{self._name}.init_state", batch_size, device, dtype)
        device = self.init_latent.device if device is None else device
        dtype = dtype or self.init_latent.dtype
        # contiguous like every written latent, so a compiled write sees the same strides throughout
        latent = self.init_latent.to(device=device, dtype=dtype)[None].expand(batch_size, -1, -1).contiguous()
        if latent.device.type == "meta":  # shapes only (what state checks compare): no arithmetic with parameters
            read_k = read_v = latent.new_empty((batch_size, self.heads, self.slots, self.head_dim))
        else:
            read_k, read_v = self._read_kv(latent)
        written = self.slot_positions == "written"
        if written:  # a written state's read_k/v come from a scatter: contiguous, so a compiled write keeps one graph
            read_k, read_v = read_k.contiguous(), read_v.contiguous()
        return RecurrentState(
            latent=latent,
            read_k=read_k,
            read_v=read_v,
            partial=tuple(latent.clone() for _ in range(self._copies - 1)),
            writes=torch.zeros((batch_size,), device=device, dtype=torch.long),
            # float32 whatever the latent's dtype: positions in the thousands keep their precision
            slot_pos=torch.zeros((batch_size, self.slots), device=device) if written else None,
            slot_mass=torch.zeros((batch_size, self.slots), device=device) if written else None,
        )

    def _check_state(self, owner: str, state: RecurrentState) -> None:
        check_state(owner, state, RecurrentState)
        if len(state.partial) != self._copies - 1:
            raise StateError(
                f"{owner}: the state holds {len(state.partial) + 1} latent copies but this memory has "
                f"truncation={self.truncation} (made by a RecurrentMemory with another truncation?)"
            )
        check_state_matches(owner, state, self)

    @typechecked
    def read(self, state: RecurrentState, query: Query) -> Context:
        """The latent as ``M`` keys/values ``(b h M d)``, all valid, one frame before the query's first frame."""
        self._check_state(f"{self._name}.read", state)
        check_query(self._name, query, state.batch_size, self.heads, self.head_dim, state.latent.device)
        return self._context(state, query.frame_positions)

    @typechecked
    def plan(self, state: RecurrentState, layout: ReadLayout) -> ReadPlan:
        """The whole read, prepared once per segment: it depends on the segment's positions only."""
        self._check_state(f"{self._name}.plan", state)
        check_layout(self._name, layout, state.batch_size, state.latent.device)
        return ReadPlan(parts=(self._context(state, layout.frame_positions),), state=state)

    def read_dynamic(self, plan: ReadPlan, query: Query) -> tuple[Context, ...]:
        return ()

    def _context(self, state: RecurrentState, frame_positions: Tensor) -> Context:
        b = int(state.latent.shape[0])
        shape = (b, self.heads, self.slots)
        if state.slot_pos is not None and state.slot_mass is not None:
            return Context(
                k=state.read_k,
                v=state.read_v,
                mask=(state.slot_mass > 0)[:, None, :].expand(shape),
                positions=state.slot_pos.round().long()[:, None, :].expand(shape),
                places=torch.full(shape, -1, dtype=torch.long, device=state.latent.device),  # no place in a frame
            )
        before = frame_positions.long().min(dim=1).values - 1  # (b,)
        return Context(
            k=state.read_k,
            v=state.read_v,
            mask=torch.ones(shape, dtype=torch.bool, device=state.latent.device),
            positions=before[:, None, None].expand(shape),
            places=torch.full(shape, -1, dtype=torch.long, device=state.latent.device),  # no place in a frame
        )

    @typechecked
    def write(self, state: RecurrentState, chunk: Chunk) -> RecurrentState:
        """Update the latent from the finished segment's hidden states ``chunk.hidden (b n D)``."""
        owner = f"{self._name}.write"
        self._check_state(owner, state)
        check_chunk(self._name, chunk, state.batch_size, self.heads, self.head_dim, state.latent.device)
        check_shape(f"{owner}: chunk.hidden", chunk.hidden, "b n D", D=self.dim)
        x = chunk.hidden.to(self.init_latent.dtype)
        if self.training and self.noise_std > 0:
            rms = x.detach().pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt()
            x = x + self.noise_std * rms * torch.randn_like(x)
        seg_k, seg_v = self._segment_kv(x)
        if self.slot_positions == "written":
            return self._write_placed(state, chunk, seg_k, seg_v)
        if self.truncation is None:
            latent = self._update(state.latent, seg_k, seg_v)
            partial: tuple[Tensor, ...] = ()
        elif not torch.is_grad_enabled():
            # every copy holds the same values; without autograd there is nothing to tell them apart.
            # Copies, not aliases: a compiled write guards on aliasing and would recompile.
            latent = self._update(state.latent, seg_k, seg_v)
            partial = tuple(latent.clone() for _ in range(self.truncation - 1))
        else:
            # copy j after this write = copy j-1 before it, updated; copy 0 is the detached latent
            olds = (state.latent.detach(), *state.partial)
            news = [self._update(old, seg_k, seg_v) for old in olds]
            latent, partial = news[-1], tuple(news[:-1])
        read_k, read_v = self._read_kv(latent)
        return RecurrentState(latent=latent, read_k=read_k, read_v=read_v, partial=partial, writes=state.writes + 1)

    def _write_placed(self, state: RecurrentState, chunk: Chunk, seg_k: Tensor, seg_v: Tensor) -> RecurrentState:
        """``write`` with ``slot_positions="written"``: the same updates, plus each slot's position and mass."""
        assert state.slot_pos is not None and state.slot_mass is not None
        token_pos = chunk.frame_positions.float().repeat_interleave(chunk.tokens_per_frame, dim=1)  # (b n)
        olds = [state.latent]
        if self.truncation is not None and torch.is_grad_enabled():
            olds = [state.latent.detach(), *state.partial]
        pos, mass, read_k, read_v = state.slot_pos, state.slot_mass, state.read_k, state.read_v
        if self.place_groups is not None and chunk.num_frames == 1:
            # one frame: only its place's group changes. Update those M / G slots alone (the
            # same values as masking all M, G times less work) and put them back in place
            b, size = state.batch_size, self.slots // self.place_groups
            group = self._place_group(chunk.frame_positions[:, 0])  # (b,)
            index = group[:, None] * size + torch.arange(size, device=group.device)  # (b S)

            def take_rows(x: Tensor) -> Tensor:
                return x.gather(1, index.view(b, size, *([1] * (x.ndim - 2))).expand(b, size, *x.shape[2:]))

            def put_rows(x: Tensor, rows: Tensor) -> Tensor:
                return x.scatter(1, index.view(b, size, *([1] * (x.ndim - 2))).expand_as(rows), rows)

            hit = torch.ones((b, size), dtype=torch.bool, device=group.device)
            allowed = None
            if self.align_tokens:
                slot = torch.arange(size, device=group.device)
                allowed = self._aligned(slot, seg_k.shape[2], chunk.tokens_per_frame)[None, None]
            news = [self._update_placed(take_rows(old), seg_k, seg_v, allowed, hit, token_pos) for old in olds]
            sub_pos, sub_mass = self._move_slots(take_rows(pos), take_rows(mass), *news[-1][1:])
            pos, mass = put_rows(pos, sub_pos), put_rows(mass, sub_mass)
            updated = [put_rows(old, n[0]) for old, n in zip(olds, news, strict=True)]
            sub_k, sub_v = self._read_kv(news[-1][0])  # (b h S d)
            heads_index = index[:, None, :, None].expand(b, self.heads, size, self.head_dim)
            read_k, read_v = read_k.scatter(2, heads_index, sub_k), read_v.scatter(2, heads_index, sub_v)
        else:
            allowed, hit = self._write_mask(chunk.frame_positions, chunk.tokens_per_frame)
            news = [self._update_placed(old, seg_k, seg_v, allowed, hit, token_pos) for old in olds]
            pos, mass = self._move_slots(pos, mass, *news[-1][1:])
            updated = [n[0] for n in news]
            read_k, read_v = (x.contiguous() for x in self._read_kv(updated[-1]))
        latent = updated[-1]
        if self.truncation is None:
            partial: tuple[Tensor, ...] = ()
        elif len(updated) == 1:
            partial = tuple(latent.clone() for _ in range(self.truncation - 1))
        else:
            partial = tuple(updated[:-1])
        return RecurrentState(
            latent=latent,
            read_k=read_k,
            read_v=read_v,
            partial=partial,
            writes=state.writes + 1,
            slot_pos=pos,
            slot_mass=mass,
        )

    @staticmethod
    def _move_slots(
        old_pos: Tensor, old_mass: Tensor, share: Tensor, seen_sum: Tensor, take: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Each slot's position moves to where its new content was seen, as far as the content was replaced."""
        # bookkeeping, not learned: no gradient flows through positions and masses
        share, take = share.detach().float(), take.detach().float()
        seen_at = seen_sum.detach().float() / share.clamp_min(1e-12)
        fresh = (old_mass <= 0) & (take > 0)
        pos = torch.where(fresh, seen_at, old_pos + take * (seen_at - old_pos))
        pos = torch.where(take > 0, pos, old_pos)
        return pos, old_mass + take * (1 - old_mass)

    def _place_group(self, frame_positions: Tensor) -> Tensor:
        """The slot group written by a frame at each position: ``round(p / place_size) mod G``."""
        assert self.place_groups is not None
        return torch.round(frame_positions.double() / self.place_size).long().remainder(self.place_groups)

    def _segment_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.to_kv(self.norm_segment(x))
        k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=self.write_heads)
        return k, v

    def _update(self, latent: Tensor, seg_k: Tensor, seg_v: Tensor) -> Tensor:
        old = latent.to(self.init_latent.dtype)
        normed = self.norm_latent(old)
        q = rearrange(self.to_q(normed), "b m (h d) -> b h m d", h=self.write_heads)
        own_k, own_v = rearrange(self.to_kv(normed), "b m (two h d) -> two b h m d", two=2, h=self.write_heads)
        out = F.scaled_dot_product_attention(q, torch.cat([own_k, seg_k], dim=2), torch.cat([own_v, seg_v], dim=2))
        new, _ = self._gated(old, out)
        return new.to(latent.dtype)

    def _gated(self, old: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """The candidate from the write attention's output ``out (b h M d)`` and the gated mix; returns (new, gate)."""
        candidate = old + self.to_out(rearrange(out, "b h m d -> b m (h d)"))
        if self.mlp is not None:
            candidate = candidate + self.mlp(candidate)
        # normed, so the gated mix below keeps the latent bounded however long the video
        candidate = self.norm_candidate(candidate)
        gate = torch.sigmoid(self.gate(torch.cat([old, candidate], dim=-1)))
        return gate * candidate + (1 - gate) * old, gate

    def _write_mask(self, frame_positions: Tensor, tokens_per_frame: int) -> tuple[Tensor | None, Tensor]:
        """Which keys each slot's write may attend to ``(b 1 M M+n)`` (None: all) and which slots update ``(b M)``."""
        b, m = frame_positions.shape[0], self.slots
        if self.place_groups is None:
            return None, torch.ones((b, m), dtype=torch.bool, device=frame_positions.device)
        slot_group = torch.arange(m, device=frame_positions.device) // (m // self.place_groups)  # (M,)
        token_group = self._place_group(frame_positions).repeat_interleave(tokens_per_frame, dim=1)  # (b n)
        own = (slot_group[:, None] == slot_group[None, :]).expand(b, m, m)
        seg = slot_group[None, :, None] == token_group[:, None, :]  # (b M n)
        hit = seg.any(dim=2)
        if self.align_tokens:
            slot = torch.arange(m, device=frame_positions.device) % (m // self.place_groups)
            aligned = self._aligned(slot, seg.shape[2], tokens_per_frame)
            own, seg = own & aligned[:, :m], seg & aligned[:, m:]
        return torch.cat([own, seg], dim=2)[:, None], hit

    @staticmethod
    def _aligned(slot_in_group: Tensor, tokens: int, tokens_per_frame: int) -> Tensor:
        """``align_tokens``: slot ``i`` of a group reads itself and token ``i mod t`` of each frame: ``(M, M+n)``."""
        m, device = slot_in_group.shape[0], slot_in_group.device
        token = torch.arange(tokens, device=device) % tokens_per_frame
        match = (slot_in_group % tokens_per_frame)[:, None] == token[None, :]
        return torch.cat([torch.eye(m, dtype=torch.bool, device=device), match], dim=1)

    def _update_placed(
        self, latent: Tensor, seg_k: Tensor, seg_v: Tensor, allowed: Tensor | None, hit: Tensor, token_pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``_update`` with explicit attention weights (and the place mask); returns the new latent,
        each slot's attention share on the segment ``(b M)``, the share-weighted sum of the positions
        it attended to ``(b M)``, and how much of the slot was replaced ``(b M)``."""
        old = latent.to(self.init_latent.dtype)
        normed = self.norm_latent(old)
        q = rearrange(self.to_q(normed), "b m (h d) -> b h m d", h=self.write_heads)
        own_k, own_v = rearrange(self.to_kv(normed), "b m (two h d) -> two b h m d", two=2, h=self.write_heads)
        scores = q @ torch.cat([own_k, seg_k], dim=2).transpose(-1, -2) * q.shape[-1] ** -0.5
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1)  # every row keeps its own group's latent: never all masked
        out = probs @ torch.cat([own_v, seg_v], dim=2)
        new, gate = self._gated(old, out)
        new = torch.where(hit[..., None], new, old)
        on_segment = probs[..., old.shape[1] :].mean(dim=1)  # (b M n)
        share = on_segment.sum(dim=-1)
        seen_sum = (on_segment * token_pos.to(on_segment.dtype)[:, None, :]).sum(dim=-1)
        take = share * gate.mean(dim=-1) * hit
        return new.to(latent.dtype), share, seen_sum, take

    def _read_kv(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        kv = self.to_read_kv(self.norm_read(latent.to(self.init_latent.dtype)))
        k, v = rearrange(kv, "b m (two h d) -> two b h m d", two=2, h=self.heads)
        return k.to(latent.dtype), v.to(latent.dtype)

    @typechecked
    def diversity_loss(self, state: RecurrentState) -> Float[Tensor, ""]:
        """Redundancy between memory slots: mean squared off-diagonal cosine similarity.

        ``mean_{i != j} cos(L_i, L_j)^2`` over the ``M`` slots of each stream, averaged over
        the batch: 0 when the slots are orthogonal, 1 when they are all parallel, 0 for a
        single slot. Add ``weight * mem.diversity_loss(state)`` to a training loss to push
        slots to hold different things.

        Example:
            >>> import torch, memkit
            >>> mem = memkit.RecurrentMemory(dim=4, heads=1, slots=3)
            >>> state = mem.init_state(1)
            >>> float(mem.diversity_loss(state.replace(latent=torch.eye(4)[None, :3])))
            0.0
        """
        self._check_state(f"{self._name}.diversity_loss", state)
        m = self.slots
        if m < 2:
            return state.latent.new_zeros(())
        unit = F.normalize(state.latent.float(), dim=-1, eps=1e-8)
        gram = unit @ unit.transpose(1, 2)  # (b M M)
        off = gram.pow(2).sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).pow(2).sum(dim=1)
        return (off / (m * (m - 1))).mean().to(state.latent.dtype)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, slots={self.slots}, "
            f"write_heads={self.write_heads}, mlp_ratio={self.mlp_ratio}, gate_bias={self.gate_bias}, "
            f"truncation={self.truncation}, noise_std={self.noise_std}"
            + (f", slot_positions={self.slot_positions!r}" if self.slot_positions != "before" else "")
            + (f", place_groups={self.place_groups}, place_size={self.place_size}" if self.place_groups else "")
        )


register_memory("recurrent", RecurrentMemory)
