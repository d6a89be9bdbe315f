"""One run on several processes: torch.distributed data parallel (DDP), gloo on the CPU, NCCL on CUDA.

Started by `cnnlab train CONFIG --nproc N` (which runs itself under torchrun) or directly under `torchrun`
(WORLD_SIZE / RANK / LOCAL_RANK in the environment). What holds, and how:

- `data.batch_size` is the global batch. Every process holds the whole device-resident split and draws the
  same epoch order (the order generator is seeded by train.seed on every rank); each global batch is dealt
  out rank by rank (positions r, r+N, r+2N, …), so no sample is dropped or seen twice. A last global batch
  smaller than the number of processes is merged into the one before it: no process ever gets an empty
  batch, so uneven data cannot hang a collective.
- Each process's loss is scaled by N × (its share of the global batch), so DDP's average of the gradients is
  exactly the gradient of the global batch's mean loss (class weights included): N processes × batch B
  take the same steps as one process with batch B, to float rounding (without batch norm or dropout).
- Augmentation and dropout differ per process and are re-seeded at every step from (train.seed, rank, step):
  a run resumed at any step draws what the uninterrupted run drew, with nothing per rank in the checkpoint.
- Batch-norm running statistics are averaged over the processes at the end of every epoch (timm's
  `distribute_bn`, reduce mode; buffers are not broadcast during the epoch), so every process evaluates
  the same model: validation figures, early stopping and the best epoch agree everywhere without talking.
- Only rank 0 writes the run folder and checkpoints (the others wait at a barrier after each); every
  rank reads the checkpoint to resume. A stop signal is agreed on at every step (an all-reduce of a flag),
  so all processes stop at the same step; a dead peer turns into an error after train.dist_timeout seconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from dataclasses import dataclass

import torch
from torch import nn


COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or an equivalent launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _attempt_store(world: int, timeout: dt.timedelta):
    """Under torchrun, the agent's TCP store for this restart attempt, its keys under a prefix of their own.

    torchrun keeps one store server for the whole job and its workers connect to it without a prefix, so
    after a restart (``--max-restarts``) the new ranks can read the dead ones' gloo addresses left in it
    and fail with "connection refused". A per-attempt prefix keeps the rounds apart. None outside torchrun.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as d

    store = d.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                       timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return d.PrefixStore(f"cnnlab/attempt_{attempt}", store)


class DistributedError(RuntimeError):
    """A collective failed: a peer process died or stopped answering; the message says what to do."""


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    backend: str
    seed: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ setup
    @classmethod
    def start(cls, device: str, timeout_s: float) -> "Dist":
        import torch.distributed as d

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local)
        if not d.is_initialized():
            timeout = dt.timedelta(seconds=timeout_s)
            store = _attempt_store(world, timeout)
            given = {} if store is None else {"store": store, "rank": rank, "world_size": world}  # else env://
            d.init_process_group(backend, timeout=timeout, **given)
        return cls(rank, world, local, backend)

    def device(self, device: str) -> str:
        """The device this rank uses: its own GPU on CUDA (cuda:LOCAL_RANK)."""
        if self.backend == "nccl":
            return f"cuda:{self.local_rank}"
        return device

    def close(self) -> None:
        import torch.distributed as d

        if d.is_initialized():
            d.destroy_process_group()

    # ------------------------------------------------------------------ collectives (errors made plain)
    def lost_contact(self, e: BaseException, what: str = "training") -> DistributedError | None:
        """A plain error for a failed collective (gloo / NCCL: a peer died, or the timeout passed); None when
        `e` is something else."""
        text = str(e)
        if isinstance(e, DistributedError) or not any(w in text.lower() for w in COMM_WORDS):
            return None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        first = first.split("] ", 1)[-1][:240]  # gloo's "[…/pair.cc:545] Read error …": the source path dropped
        return DistributedError(
            f"the {self.world} training processes lost contact during {what} (this is rank {self.rank}): {first}. "
            "A peer process died or hung (see its own error); once all are stopped, go on with: "
            "cnnlab train --resume RUN_DIR --nproc N")

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except RuntimeError as e:
            raise (self.lost_contact(e, what) or e) from None

    def barrier(self) -> None:
        import torch.distributed as d

        self._call("a barrier", d.barrier)

    def broadcast(self, obj):
        """rank 0's Python object, on every rank."""
        import torch.distributed as d

        box = [obj if self.is_main else None]
        self._call("a broadcast", d.broadcast_object_list, box, src=0)
        return box[0]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as d

        t = t.clone()
        self._call("an all-reduce", d.all_reduce, t)
        return t

    def gather(self, obj) -> list:
        """Every rank's Python object, in rank order, on every rank."""
        import torch.distributed as d

        out = [None] * self.world
        self._call("a gather", d.all_gather_object, out, obj)
        return out

    def any(self, flag: bool, device) -> bool:
        """True on every rank when it is True on any (a stop request, a non-finite loss)."""
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)

    # ------------------------------------------------------------------ training
    def wrap(self, model: nn.Module) -> nn.Module:
        """The DDP module used for the training forward (checkpoints keep the plain module's state_dict)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.backend == "nccl" else None
        # no syncing of parameters or buffers: every rank builds the same model from the same seed (or loads
        # the same checkpoint, with its own batch-norm statistics); buffers meet in average_buffers (timm)
        return DDP(model, device_ids=ids, forward_sync_buffers=False, init_sync=False,
                   find_unused_parameters=any(not p.requires_grad for p in model.parameters()))

    def average_buffers(self, model: nn.Module) -> None:
        """Batch-norm running statistics averaged over the processes (timm's distribute_bn, reduce)."""
        for name, buf in model.named_buffers():
            if buf.dtype.is_floating_point and ("running_mean" in name or "running_var" in name):
                buf.copy_(self.sum(buf) / self.world)

    def rank_state(self, model: nn.Module, acc: dict) -> dict[str, torch.Tensor]:
        """What differs between the processes mid-epoch — batch-norm running statistics, the epoch's running
        sums — gathered from every rank (a collective) as {rank.R.<name>: tensor} for rank 0's checkpoint."""
        import torch.distributed as d

        mine = {f"buffer.{n}": b.detach().cpu() for n, b in model.named_buffers()
                if "running_mean" in n or "running_var" in n}
        mine.update({f"acc.{k}": (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.tensor(float(v))).reshape(1)
                     for k, v in acc.items() if k in ("loss_sum", "correct", "seen")})
        every = [None] * self.world
        self._call("gathering each process's state", d.all_gather_object, every, mine)
        return {f"rank.{r}.{k}": v for r, got in enumerate(every) for k, v in got.items()}

    def restore_rank_state(self, tensors: dict, model: nn.Module, acc: dict) -> None:
        """This rank's own part of a checkpoint written by rank_state (absent: a checkpoint of one process)."""
        prefix = f"rank.{self.rank}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not mine:
            return
        buffers = dict(model.named_buffers())
        for k, v in mine.items():
            if k.startswith("buffer.") and k[7:] in buffers:
                buffers[k[7:]].copy_(v.to(buffers[k[7:]].device))
        for key in ("loss_sum", "correct"):
            if f"acc.{key}" in mine and key in acc:
                acc[key] = mine[f"acc.{key}"].reshape(()).to(acc[key].device, acc[key].dtype)
        if "acc.seen" in mine and "seen" in acc:
            acc["seen"] = int(mine["acc.seen"].item())

    def reseed(self, step: int, loader) -> None:
        """Dropout (torch's generator) and augmentation draws for this rank at this global step."""
        s = (self.seed * 1_000_003 + self.rank * 7_919 + step * 104_729) % 2**63
        torch.manual_seed(s)
        if getattr(loader, "aug_generator", None) is not None:
            loader.aug_generator.manual_seed(s + 1)


class ShardedLoader:
    """A training DeviceLoader seen by one rank: every global batch of the shared order, dealt out by rank."""

    def __init__(self, loader, dist: Dist):
        self.loader, self.dist = loader, dist
        if loader.batch_size < dist.world:
            raise ValueError(f"data.batch_size={loader.batch_size} is the global batch: it must be at least the "
                             f"number of processes ({dist.world})")
        self.epoch = 0

    def __getattr__(self, name):  # labels, generator, aug_generator, batch_size, sample_weights …
        return getattr(self.loader, name)

    def _starts(self) -> list[tuple[int, int]]:
        n, b = len(self.loader.labels), self.loader.batch_size
        spans = [(s, min(s + b, n)) for s in range(0, n, b)]
        if len(spans) > 1 and spans[-1][1] - spans[-1][0] < self.dist.world:  # too small to deal out: merge
            spans[-2:] = [(spans[-2][0], spans[-1][1])]
        return spans

    def __len__(self) -> int:
        return len(self._starts())

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    def new_order(self):
        return self.loader.new_order()

    def iterate(self, order, start_batch: int = 0):
        """(x, y) batches of this rank's share of each global batch, from batch `start_batch`; the global
        batch's labels stay in `global_labels` for the loss scale."""
        L, d = self.loader, self.dist
        spans = self._starts()
        for i in range(start_batch, len(spans)):
            lo, hi = spans[i]
            idx = torch.arange(lo, hi, device=L.labels.device) if order is None else order[lo:hi]
            self.global_labels = L.labels[idx]
            mine = idx[d.rank::d.world]
            d.reseed(self.epoch * len(spans) + i + 1, L)
            yield L._to_input(L.images[mine]), L.labels[mine]


class EvalShard:
    """An evaluation loader (in order, unshuffled) seen by one rank: a contiguous block of its batches — the
    very batches one process forms — so the ranks' predictions, gathered in rank order, are one process's."""

    def __init__(self, loader, dist: Dist):
        self.loader, self.dist = loader, dist

    def _block(self) -> tuple[int, int]:
        n, d = len(self.loader), self.dist
        return n * d.rank // d.world, n * (d.rank + 1) // d.world

    def __len__(self) -> int:
        first, end = self._block()
        return end - first

    def __iter__(self):
        first, end = self._block()
        return itertools.islice(self.loader.iterate(None, first), end - first)


def loss_scale(dist: Dist | None, y: torch.Tensor, loader, class_weights: torch.Tensor | None) -> float:
    """The factor that makes DDP's averaged gradient the global batch's mean-loss gradient: N × this rank's
    share of the global batch (by count, or by class weight when the loss is class-weighted)."""
    if dist is None:
        return 1.0
    g = loader.global_labels
    if class_weights is None:
        share = len(y) / len(g)
    else:
        share = float(class_weights[y].sum() / class_weights[g].sum())
    return dist.world * share
