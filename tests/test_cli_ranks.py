"""``memkit train`` under torchrun: only rank 0 prints the summary and the checkpoint line."""

import contextlib
import io
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from memkit.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, out: str) -> None:
    # what torchrun --nproc_per_node=2 sets for each process
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["train", "--config", "tiny", "--steps", "1", "--out", f"{out}/ckpt", "--no-progress",
                         "--device", "cpu"])  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(f"{code}\n{stdout.getvalue()}\n---\n{stderr.getvalue()}")


def test_only_rank_zero_speaks(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    code0, _, rest0 = (tmp_path / "rank0.txt").read_text().partition("\n")
    code1, _, rest1 = (tmp_path / "rank1.txt").read_text().partition("\n")
    assert code0 == code1 == "0"
    out0, out1 = rest0.split("\n---\n")[0], rest1.split("\n---\n")[0]
    assert "trained to step 1" in out0 and f"checkpoint: {tmp_path}/ckpt" in out0
    assert out1.strip() == "", out1
