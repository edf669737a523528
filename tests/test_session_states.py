"""A MemorySession's states: the one per-layer container (issue 13, item 5).

``tests/data/session_states_named*.safetensors`` were saved by ``MemorySession.save_states``
as it was before the session moved onto :class:`memkit.state.LayerStates` (commit 89fe1e1),
when a session's file named its tensors by layer name (``['blocks.0'].window.k``). They must
keep loading bit-identically. Do not re-record them: ``python tests/test_session_states.py
--record`` exists to show how they were made, with the code of that commit.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

import memkit
from memkit.integrations import multihead_attention_adapter
from memkit.state import tensor_paths

DATA = Path(__file__).parent / "data"
NAMED = DATA / "session_states_named.safetensors"  # both layers written
NAMED_PARTIAL = DATA / "session_states_named_partial.safetensors"  # blocks.1 had no state yet (None)
EMBED, HEADS, TOKENS = 16, 2, 4


class Host(nn.Module):
    """Two self-attention layers, ``blocks.0`` and ``blocks.1``; no memkit inside."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.MultiheadAttention(EMBED, HEADS, batch_first=True) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x, x, x, need_weights=False)[0]
        return x


def memories() -> dict[str, memkit.Memory]:
    head_dim = EMBED // HEADS
    return {
        "blocks.0": memkit.FIFOMemory(HEADS, head_dim, TOKENS, frames=2),
        "blocks.1": memkit.SinkWindowMemory(HEADS, head_dim, TOKENS, sink_frames=1, window_frames=2),
    }


def attach(host: nn.Module, **kw):
    return memkit.attach(host, memories(), adapter=multihead_attention_adapter, **kw)


def stream(segments: int = 3, batch: int = 2):
    """A seeded host and a session that committed ``segments`` segments of 2 frames."""
    torch.manual_seed(0)
    host = Host().eval()
    session = attach(host)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(segments):
            session.set_segment([2 * i, 2 * i + 1])
            session.commit(torch.randn(batch, 2 * TOKENS, EMBED, generator=g))
    return host, session


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state file under their names in the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = json.loads(f.metadata()["memkit"])["keys"]
        return {name: f.get_tensor(f"t{i:05d}") for i, name in enumerate(keys)}


def test_session_files_that_name_layers_load_bit_identically() -> None:
    for path, present in ((NAMED, {"blocks.0", "blocks.1"}), (NAMED_PARTIAL, {"blocks.0"})):
        saved = file_tensors(path)
        session = attach(Host().eval())
        session.load_states(path)
        loaded = {}
        for name in ("blocks.0", "blocks.1"):
            state = session.states[name]
            assert (state is not None) == (name in present), (path.name, name)
            if state is not None:
                loaded.update({f"[{name!r}]{p}": x for p, x in tensor_paths(state)})
        assert list(loaded) == list(saved)
        assert all(torch.equal(loaded[n], saved[n]) and loaded[n].dtype == saved[n].dtype for n in saved)
        assert saved["['blocks.0'].window.valid"].any()  # real stream contents, not an empty state
        session.detach()


def record() -> None:  # pragma: no cover - run by hand, once, with the code of commit 89fe1e1
    _, session = stream()
    session.save_states(NAMED)
    states = session.states
    session.set_states({"blocks.0": states["blocks.0"], "blocks.1": None})
    session.save_states(NAMED_PARTIAL)


if __name__ == "__main__" and "--record" in sys.argv:
    record()
