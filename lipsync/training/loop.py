"""The bookkeeping every train.py stage shares: the run context (device, ranks, metrics, checkpoint paths), the
batches of a step, and the loop with progress, metrics, NaN stop, atomic checkpoints and bit-exact --resume.

A stage supplies `step_fn(step) -> {name: float}` (one optimizer step: batch, loss, backward, `clip_and_step`) and
`train_loop` does the rest.
"""

import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lipsync.checkpoint import atomic_save
from lipsync.training.steps import Objective, lr_lambda, step_generator


class Run:
    """Device, distributed rank, logging and checkpoint paths shared by the stages (cfg: train.py's TrainConfig)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.started = time.time()  # --max_minutes counts from here, over all stages
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        if self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            dist.init_process_group("nccl" if cuda else "gloo")
            self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
            if cuda:
                torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cuda" if cuda else ("cpu" if cfg.device == "auto" else cfg.device))
        gpu = self.device.type == "cuda"
        self.autocast = torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and gpu)) else None
        self.grad_ckpt = cfg.grad_ckpt == "on" or (cfg.grad_ckpt == "auto" and gpu)
        self.main = self.rank == 0
        os.makedirs(os.path.join(cfg.out, "samples"), exist_ok=True)
        self.metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if self.main else None

    def log(self, record: dict):
        if self.main:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def say(self, *a):
        if self.main:
            tqdm.write(" ".join(str(x) for x in a))

    def path(self, stage):
        return os.path.join(self.cfg.out, f"{stage}.pt")

    def amp(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)


def batch_at(dataset, step: int, batch_size: int, seed: int, rank: int) -> dict:
    """The batch of `step` on `rank`: indices drawn from (seed, step, rank) alone, so a resumed run sees exactly
    the batches the uninterrupted run would have seen. The items' own draws (frame, reference, augmentation) follow
    the step too: with a fixed epoch, dataset index i would be the same item all run long, and the ~1/e of the frames
    that no index draws would never be a target."""
    g = step_generator(seed, step, rank)
    dataset.set_epoch(step)
    idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
    items = [dataset[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- the loop shared by every stage


def train_loop(run: Run, stage: str, modules: dict, optims: dict, steps: int, step_fn, extra_state=None):
    """Run `step_fn(step) -> {name: float}` for steps [start, steps), with progress, metrics, NaN stop, periodic
    atomic checkpoints of modules/optimizers/schedulers/step/RNG, and --resume."""
    cfg = run.cfg
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg.optim.warmup, steps, cfg.optim.lr_floor))
              for k, o in optims.items()}
    start = 0
    path = run.path(stage)
    if cfg.resume and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in optims.items():
            o.load_state_dict(state["optims"][k])
            scheds[k].load_state_dict(state["scheds"][k])
        set_rng_state(state["rng"])
        start = state["step"]
        run.say(f"[{stage}] resumed from {path} at step {start}")
    if start >= steps:
        run.say(f"[{stage}] already finished ({steps} steps) in {path}")
        return

    def save(step):
        if run.main:
            atomic_save({"stage": stage, "step": step, "config": dataclasses.asdict(cfg),
                         "modules": {k: m.state_dict() for k, m in modules.items()},
                         "optims": {k: o.state_dict() for k, o in optims.items()},
                         "scheds": {k: s.state_dict() for k, s in scheds.items()}, "rng": rng_state(),
                         **(extra_state() if extra_state else {})}, path)

    for m in modules.values():
        m.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, disable=not run.main, dynamic_ncols=True)
    for step in bar:
        logs = step_fn(step)
        bad = [k for k, v in logs.items() if not torch.isfinite(torch.tensor(v))]
        if bad:
            last = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"
            raise SystemExit(f"[{stage}] loss became {logs[bad[0]]} ({bad[0]}) at step {step}; stopping — {last}")
        for s in scheds.values():
            s.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == steps:
            rate = (done - start) / max(time.time() - t0, 1e-9)
            run.log({"stage": stage, "step": done, "time": round(time.time() - t0, 2), "it_s": round(rate, 3),
                     "lr": scheds[next(iter(scheds))].get_last_lr()[0], **logs})
            bar.set_postfix({k: f"{v:.4f}" for k, v in list(logs.items())[:4]})
        if done % cfg.ckpt_every == 0 or done == steps:
            save(done)
        if cfg.max_minutes and time.time() - run.started > 60 * cfg.max_minutes or done == cfg.stop_at:
            run.say(f"[{stage}] stopping at step {done} of {steps}; continue with --resume")
            save(done)
            break
    bar.close()
    if run.world > 1:
        check_replicas(run, stage, modules)


def check_replicas(run: Run, stage: str, modules: dict):
    """DDP keeps replicas identical by construction; verify it: every rank's parameter checksum must agree."""
    total = torch.stack([p.detach().double().sum() for m in modules.values() for p in m.parameters()]).sum()
    sums = [torch.zeros_like(total) for _ in range(run.world)]
    dist.all_gather(sums, total)
    same = all(torch.equal(s, sums[0]) for s in sums)
    run.log({"stage": stage, "replicas_identical": same, "checksums": [float(s) for s in sums]})
    if not same:
        raise SystemExit(f"[{stage}] replicas diverged: {[float(s) for s in sums]}")


def optimizer(params, lr, cfg):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=tuple(cfg.optim.betas),
                             weight_decay=cfg.optim.weight_decay, eps=1e-8)


def clip_and_step(opt, params, cfg):
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def wrap(module, fn, run):
    """The stage's loss as a module (DDP-wrapped when distributed): calling it runs fn(module, ...)."""
    objective = Objective(module, fn)
    return DDP(objective) if run.world > 1 else objective


def maybe_compile(module, cfg):
    return torch.compile(module) if cfg.compile else module
