"""The one training loop. Steps are the unit of time; epochs are converted at the edge.

The loop does not know which optimizer or pruner it runs: both come from the
registries, "no pruning" is a real null object, and the optimizer's step budget
factor and the pruner's buffers are read through their common interface.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..run import checkpoint as ckpt
from . import signals
from ..run.atomic import write_text_atomic
from ..config.kconfig import ConfigError
from ..report.costs import final_costs
from .distributed import DistContext
from .lr import lr_at
from ..memory import memory_report
from ..config.notes import ramp_warning
from ..optim.clipping import clip_grad_norm_
from ..params import param_groups, prunable_parameters
from .console import Progress, print_summary
from ..registry import PRUNERS, PruneSchedule, build_optimizer, build_pruner, pattern_of, target_of
from ..run import segments
from ..run.rundir import RunDir, environment, read_json

STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED = "completed", "diverged", "failed"
STATUS_INTERRUPTED = "interrupted"  # a stop signal: last.pt saved, no final.json


class DivergedError(RuntimeError):
    pass


class LossReadback:
    """The training loss, read on the host one step late.

    Reading a GPU loss with ``.item()`` right after backward makes the host wait
    for the device before it may queue the optimizer step and the next batch, and
    short steps then leave the device idle between launches. Instead each step's
    loss is copied to pinned host memory asynchronously (an event marks the copy)
    and checked at the next step, after that step's forward and backward are
    queued; the engine also reads it before anything that needs it (an
    evaluation row, the progress line, a checkpoint). On the CPU the copy is the
    tensor itself. A non-finite loss raises :class:`DivergedError` naming its step.
    """

    def __init__(self) -> None:
        self.value: Optional[float] = None  # the newest loss read
        self._pending: Optional[tuple[int, torch.Tensor, Any]] = None
        self._host: Optional[torch.Tensor] = None

    def put(self, step: int, loss: torch.Tensor) -> None:
        """Queue step ``step``'s loss (a 0-dim tensor); the previous one must have been read."""
        assert self._pending is None, "the previous loss was not read"
        event = None
        if loss.device.type == "cuda":
            if self._host is None:
                self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._host.copy_(loss.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            loss = self._host
        self._pending = (step, loss, event)

    def read(self) -> Optional[float]:
        """The newest loss (waits only for its own copy); raises on NaN/inf."""
        if self._pending is not None:
            step, loss, event = self._pending
            self._pending = None
            if event is not None:
                event.synchronize()
            self.value = float(loss)
            if not math.isfinite(self.value):
                raise DivergedError(f"loss is {self.value} at step {step}")
        return self.value


# ------------------------------------------------------------------ set-up
def select_device(choice: str, dist: DistContext) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("DEVICE=cuda but no CUDA device is visible; use DEVICE=cpu or DEVICE=auto")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # The CPU kernels this project uses are deterministic already, and the switch
    # costs ~3 s of imports per process, which a matrix of small cells would pay.
    if deterministic and device.type == "cuda":
        # cuBLAS needs this before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Budget:
    """Optimizer steps of the run and the shared pruning ramp, in steps."""

    steps_per_epoch: int
    base_steps: int
    schedule: PruneSchedule

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int) -> "Budget":
        base = cfg.max_iters if cfg.max_iters > 0 else cfg.epochs * steps_per_epoch
        info = PRUNERS[cfg.pruning]
        if bool(cfg.prune_dynamic) != info.dynamic:  # Kconfig's PRUNING_DYNAMIC mirrors the registry
            raise ConfigError(f"PRUNING={cfg.pruning}: Kconfig says PRUNING_DYNAMIC={'y' if cfg.prune_dynamic else 'n'}, "
                              f"the registry says dynamic={info.dynamic}; make the two agree in Kconfig.pruning")
        pattern = pattern_of(cfg)
        if not info.prunes:
            start = end = 0
        elif info.dynamic:  # sparse from step 0, masks move until T_end
            start, end = 0, max(1, round((cfg.regrow_end or 0.0) * base))
        elif not info.ramps:  # SR-STE: the N:M mask of every forward
            start = end = 0
        else:
            start = round((cfg.ramp_start or 0.0) * base)
            end = max(start, round((cfg.ramp_end or 0.0) * base))
        sched = PruneSchedule(
            target=target_of(cfg), start=start, end=end,
            interval=cfg.prune_interval or 1, schedule=cfg.prune_schedule or "cubic",
            scope=cfg.prune_scope or "global", prune_embeddings=bool(cfg.prune_embeddings),
            pattern=pattern, distribution=cfg.prune_distribution or "erk",
            drop_fraction=0.3 if cfg.drop_fraction is None else cfg.drop_fraction,
            srste_decay=2e-4 if cfg.srste_decay is None else cfg.srste_decay, seed=cfg.seed)
        return cls(steps_per_epoch, base, sched)


@dataclass
class Best:
    val_metric: Optional[float] = None
    step: Optional[int] = None
    test_metric: Optional[float] = None
    val_loss: Optional[float] = None

    def improved(self, value: float, higher_is_better: bool) -> bool:
        if self.val_metric is None:
            return True
        return value > self.val_metric if higher_is_better else value < self.val_metric


# ---------------------------------------------------------------- training
class Trainer:
    """Owns one run: model, optimizer, pruner, data, run directory."""

    def __init__(self, task, cfg, run_dir: Path, dist: Optional[DistContext] = None,
                 config_text: Optional[str] = None, overrides: Optional[dict] = None):
        self.task, self.cfg = task, cfg
        self.dist = dist or DistContext.from_env()
        self.run = RunDir(run_dir, enabled=self.dist.is_main)
        self.config_text, self.overrides = config_text, overrides or {}
        self.sampler = None
        self.tracker = None
        self.cuda_peaks: dict[str, int] = {}

    # -- construction
    def setup(self) -> None:
        cfg, task = self.cfg, self.task
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = select_device(cfg.device, self.dist)
        self.dist.init(self.device)
        self._start_sampler()
        seed_everything(cfg.seed, cfg.deterministic, self.device)
        self.data = task.build_data(cfg)
        self.model = task.build_model(cfg).to(self.device)
        groups = param_groups(self.model, cfg.weight_decay or 0.0, bool(cfg.prune_embeddings))
        self.budget = Budget.from_config(cfg, self.data.train.steps_per_epoch(cfg.batch_size))
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg, self.budget.schedule, cfg.pruning)
        self.pruner = build_pruner(cfg.pruning, self.model, self.optimizer, self.budget.schedule,
                                   cfg.optimizer)
        self.total_steps = round(self.budget.base_steps * getattr(self.optimizer, "step_budget_factor", 1.0))
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.train_model = self._wrap(self.model)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if cfg.amp and self.device.type == "cuda" else contextlib.nullcontext())
        self.eval_every = cfg.eval_interval or self.budget.steps_per_epoch
        self.step, self.best = 0, Best()
        self.loss = LossReadback()
        self._earlier_segments, self._from_step, self._train_time, self._steps_run = [], 0, 0.0, 0

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def _start_sampler(self) -> None:
        if not self.dist.is_main:
            return
        from ..monitor import MemorySampler

        # A CPU run on a GPU machine must not report the GPU's memory as its own.
        backend = "psutil" if self.device.type == "cpu" else None
        self.sampler = MemorySampler(self.run / "memory.jsonl", interval_s=self.cfg.monitor_interval,
                                     backend=backend)
        self.sampler.start()
        self.sampler.set_phase("setup")

    def _set_phase(self, name: str) -> None:
        """Tell the sampler, and close the CUDA allocator's peak of the phase that ends."""
        if self.sampler is not None:
            self.sampler.set_phase(name)
        if getattr(self, "device", None) is not None and self.device.type == "cuda":
            ended = getattr(self, "_phase", None)
            if ended is not None:
                peak = torch.cuda.max_memory_allocated(self.device)
                self.cuda_peaks[ended] = max(self.cuda_peaks.get(ended, 0), peak)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._phase = name

    # -- checkpoints
    def _checkpoint_state(self) -> dict:
        state = {
            "format": 1,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "pruner": self.pruner.state_dict(),
            "best": vars(self.best).copy(),
            "config": self.cfg.to_dict(),
            "segments": self._segments(),
            # Batches are a function of (seed, step); only dropout-style randomness needs this.
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }
        return state

    def save_last(self) -> None:
        if self.dist.is_main:
            ckpt.save_atomic(self._checkpoint_state(), self.run / "last.pt")

    def save_best(self) -> None:
        if self.dist.is_main:
            from ..pruning import export_state_dict

            ckpt.save_atomic({"format": 1, "step": self.step, "model": export_state_dict(self.model),
                              "config": self.cfg.to_dict(), "val_metric": self.best.val_metric,
                              "metric_name": self.task.metric_name}, self.run / "best.pt")

    def resume(self) -> bool:
        """Restore from last.pt if present; returns whether it resumed."""
        path = self.run / "last.pt"
        if not path.exists():
            return False
        state = ckpt.load(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pruner.load_state_dict(state["pruner"])
        self.step = int(state["step"])
        self.best = Best(**state["best"])
        self._earlier_segments = list(state.get("segments", []))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all([t.cpu() for t in state["rng"]["cuda"]])
        self.run.truncate_metrics(self.step)
        return True

    def _segments(self, peak: Optional[int] = None) -> list[dict]:
        """The earlier segments of this run and this one up to now (see segments.py)."""
        if peak is None and self.sampler is not None:
            peak = self.sampler.summary("train").get("peak_bytes")
        env = getattr(self, "_env", {})
        return self._earlier_segments + [segments.current(
            self._started, self._from_step, self.step, self._train_time, self._steps_run, peak, env)]

    # -- one step
    def _lr(self) -> float:
        c = self.cfg
        return lr_at(self.step, self.total_steps, c.lr, c.lr_schedule, c.warmup_steps, c.min_lr_ratio)

    def train_step(self) -> None:
        """One optimizer step; its loss is read later (``self.loss.read()``)."""
        cfg, model = self.cfg, self.train_model
        lr = self._lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["initial_lr"] / cfg.lr
        x, y = self.data.train.train_batch(self.step, cfg.batch_size, cfg.seed,
                                           self.dist.rank, self.dist.world_size)
        micro = list(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum)))
        total = torch.zeros((), device=self.device)
        for i, (xb, yb) in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else model.no_sync()
            with sync:
                with self.amp:
                    loss = self.task.loss(model, (xb.to(self.device, non_blocking=True),
                                                  yb.to(self.device, non_blocking=True)))
                (loss / len(micro)).backward()
            total += loss.detach()
        # The previous step's loss, now that this step's work is queued (a NaN stops
        # the run before this step's update); then this step's, read next time. The
        # mean over ranks: what one process with the same global batch would see, and
        # a NaN on any rank stops every rank.
        self.loss.read()
        self.loss.put(self.step + 1, self.dist.mean(total) / len(micro))
        try:
            if cfg.grad_clip:
                clip_grad_norm_(self.optimizer, cfg.grad_clip)  # sees the masked gradient
            self.optimizer.step()
            self.pruner.step()
        except Exception:
            self.loss.read()  # a NaN loss behind the failure: DivergedError, not a crash
            raise
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # -- evaluation
    @torch.no_grad()
    def eval_sums(self, split) -> dict[str, float]:
        """The task's evaluation sums over every rank's batches (a rank may have
        none), plus `_examples`, the number of examples evaluated."""
        self.model.eval()
        sums: dict[str, float] = {"_examples": 0.0}
        for xb, yb in self.task.eval_batches(split, self.cfg, self.dist.rank, self.dist.world_size):
            with self.amp:
                out = self.task.eval_sums(self.model, (xb.to(self.device), yb.to(self.device)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["_examples"] += xb.shape[0]
        self.model.train()
        return self.dist.all_reduce_sum(sums, self.device)

    def evaluate(self, split) -> tuple[float, float]:
        return self.task.finish_eval(self.eval_sums(split))

    def evaluate_checkpoint(self, weights: dict, where: Path) -> dict[str, float]:
        """Evaluate saved weights (best.pt's "model") on the test split of this trainer's
        config, without building an optimizer, a pruner or a sampler (`make evaluate`):
        the task's evaluation sums (with ``_examples``)."""
        from ..run.checkpoint import load_weights

        self.device = select_device("auto", self.dist)
        self.data = self.task.build_data(self.cfg)
        self.model = self.task.build_model(self.cfg)
        load_weights(self.model, weights, where)
        self.model.to(self.device)
        self.amp = contextlib.nullcontext()
        return self.eval_sums(self.data.test)

    def _pattern_record(self) -> dict:
        """What final.json says about the mask's shape: the pattern ("unstructured" or
        "N:M"), the layer distribution of dynamic sparse training, and the prunable
        tensors an N:M pattern left dense (their reduction dimension M does not divide)."""
        sched, info = self.budget.schedule, PRUNERS[self.cfg.pruning]
        dense = getattr(self.pruner, "dense_tensors", None)
        return {"pattern": sched.pattern if info.prunes else None,
                "distribution": sched.distribution if info.dynamic else None,
                "dense_tensors": dense() if dense is not None and info.prunes else []}

    def sparsity(self) -> float:
        return float(self.pruner.current_sparsity())

    def _eval_and_log(self, train_loss: Optional[float], started: float) -> dict:
        self._set_phase("eval")
        val_loss, val_metric = self.evaluate(self.data.val)
        test_loss, test_metric = self.evaluate(self.data.test)
        self._set_phase("train")
        row = {"step": self.step, "epoch": self.step / self.budget.steps_per_epoch,
               "train_loss": train_loss, "val_loss": val_loss, "val_metric": val_metric,
               "test_loss": test_loss, "test_metric": test_metric, "sparsity": self.sparsity(),
               "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": time.time() - started}
        # Only a model at its final sparsity may be "best": an evaluation during the
        # ramp would report a denser model's accuracy as the pruned model's.
        at_target = self.step >= self.budget.schedule.end
        if at_target and self.best.improved(val_metric, self.task.higher_is_better):
            self.best = Best(val_metric, self.step, test_metric, val_loss)
            self.save_best()
        self.run.append_metrics(row)
        if self.tracker is not None:
            from ..report.tracking import row_to_metrics

            extra = {"step_time_s": self._train_time / max(1, self._steps_run)}
            extra.update(self._memory_now())
            self.tracker.log({**row_to_metrics(row), **extra}, self.step)
        return row

    def _memory_now(self) -> dict:
        if self.device.type == "cuda":
            return {"memory/allocated_bytes": torch.cuda.memory_allocated(self.device)}
        from ..monitor import process_family, rss_bytes

        return {"memory/rss_bytes": rss_bytes(process_family(os.getpid()))}

    def _start_tracker(self, resumed: bool) -> None:
        cfg = self.cfg
        names = [n for n, on in (("trackio", cfg.tracker_trackio), ("wandb", cfg.tracker_wandb)) if on]
        if not names or not self.dist.is_main:
            return
        from ..config.kconfig import resolve_path
        from ..report.tracking import build_trackers, project_name

        in_matrix = (self.run.path.parent / "matrix.json").exists()
        self.tracker = build_trackers(
            names, project=project_name(cfg.model), run_name=self.run.path.name,
            group=self.run.path.parent.name if in_matrix else self.run.path.name,
            config={**cfg.to_dict(), "metric_name": self.task.metric_name}, directory=self.run.path,
            trackio_directory=resolve_path(cfg.results_dir) / "trackio", resume=resumed)

    # -- the loop
    def fit(self, resume: bool = False) -> dict:
        started = self._started = time.time()
        self.setup()
        resumed = self.resume() if resume else False
        self._from_step = self.step
        if self.dist.is_main:
            (self.run / "stopped.json").unlink(missing_ok=True)  # the stop it resumes from is over
        self._write_start_files(resumed)
        self._start_tracker(resumed)
        self._banner(resumed)
        progress = Progress(self.total_steps, self.step, self.dist.is_main,
                            max(1, self.cfg.log_interval))
        if not resumed:
            self.run.truncate_metrics(0)  # rows of an attempt that died before its first checkpoint
        # torch.compile compiles on the first step: keep that out of the training figures.
        self._set_phase("compile" if self.cfg.compile else "train")
        status, message = STATUS_COMPLETED, None
        self._train_time, self._steps_run = 0.0, 0
        stopping = contextlib.ExitStack()
        stop = stopping.enter_context(signals.catching())  # SIGTERM/SIGUSR2/Ctrl-C: a flag only
        try:
            while self.step < self.total_steps:
                t = time.perf_counter()
                self.train_step()
                if self._phase == "compile":  # the compiling step is not a training step's time
                    self.loss.read()  # waits for the device: compilation ends here
                    self._set_phase("train")
                else:
                    self._train_time += time.perf_counter() - t
                    self._steps_run += 1
                due_eval = self.step % self.eval_every == 0 or self.step == self.total_steps
                due_save = self.step % self.cfg.checkpoint_interval == 0
                due_line = self.step % progress.every == 0
                # The loss is read (a device synchronisation) only where something needs
                # it; a NaN is caught before any checkpoint could hold its step.
                loss = self.loss.read() if due_eval or due_save or due_line else None
                metric = {}
                if due_eval:
                    row = self._eval_and_log(loss, started)
                    self.save_last()
                    metric = {"metric": row["val_metric"], "metric_name": self.task.metric_name}
                elif due_save:
                    self.save_last()
                progress.update(self.step, loss=loss, lr=self.optimizer.param_groups[0]["lr"],
                                sparsity=self.sparsity() if due_eval or due_line else None,
                                **metric)
                if stop.agreed(self.dist, self.device, due_eval or due_save or due_line):
                    return self._stopped(stop)
        except DivergedError as exc:
            status, message = STATUS_DIVERGED, f"training diverged: {exc}; lower LR= or enable TRAIN_GRAD_CLIP"
        except BaseException:
            if self.tracker is not None:
                self.tracker.finish("failed")
            raise
        finally:
            progress.close()
            stopping.close()
        final = self._final(status, message, started, self._train_time, self._steps_run)
        if self.tracker is not None:
            from ..report.tracking import final_to_metrics

            self.tracker.log(final_to_metrics(final), final["steps"])
            self.tracker.finish(status)
        return final

    def _stopped(self, stop) -> dict:
        """A stop signal came: last.pt at this step, no final.json (the run is unfinished)."""
        self.loss.read()  # a NaN step is divergence, never checkpointed
        self.save_last()
        self.run.write_json("stopped.json", {"signal": stop.name, "step": self.step})
        self.dist.barrier()  # no rank exits (and makes torchrun stop the rest) before rank 0 saved
        if self.sampler is not None:
            self.sampler.stop()
        if self.tracker is not None:
            self.tracker.finish(STATUS_INTERRUPTED)
        if self.dist.is_main:
            print(f"[adamwprune] stopped by {stop.name} at step {self.step}/{self.total_steps}: last.pt saved "
                  f"in {self.run.path}; resume with `{signals.resume_hint(self.run.path)}`", flush=True)
        return {"status": STATUS_INTERRUPTED, "signal": stop.name, "steps": self.step,
                "total_steps": self.total_steps}

    # -- files
    def _write_start_files(self, resumed: bool) -> None:
        if not self.dist.is_main:
            return
        if self.config_text is not None and not (self.run / ".config").exists():
            write_text_atomic(self.run / ".config", self.config_text)
        # Keys written before (the configuration pinned at creation, accepted changes) are kept.
        self.run.write_json("config.json", {**(read_json(self.run / "config.json") or {}),
                                            "config": self.cfg.to_dict(), "overrides": self.overrides,
                                            "task": self.task.name, "total_steps": self.total_steps,
                                            "schedule": vars(self.budget.schedule)})
        env = environment(self.device)
        env["world_size"] = self.dist.world_size
        env["resumed_at_step"] = self.step if resumed else None
        self._env = env
        self.run.write_json("env.json", segments.env_with_history(self.run / "env.json", env, resumed))

    def param_counts(self) -> tuple[int, int]:
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        prunable = sum(p.numel() for _, _, p in prunable_parameters(self.model, bool(self.cfg.prune_embeddings)))
        return total, prunable

    def _banner(self, resumed: bool) -> None:
        if not self.dist.is_main:
            return
        total, prunable = self.param_counts()
        s = self.budget.schedule
        info = PRUNERS[self.cfg.pruning]
        shape = (f", {s.pattern}" if info.prunes and s.pattern != "unstructured" else "") + \
            (f", {s.distribution} layer densities" if info.dynamic else "")
        steps = ("masks updated" if info.dynamic else "ramp steps") if info.ramps else "mask at every forward from step"
        when = f"{steps} {s.start}-{s.end}, every {s.interval}" if info.ramps else f"{steps} {s.start}"
        print(f"[adamwprune] {self.task.name}: {total:,} parameters ({prunable:,} prunable) | "
              f"{self.cfg.optimizer} + {self.cfg.pruning} pruning to {100 * s.target:.1f}%{shape} "
              f"({when}) | {self.total_steps} steps on "
              f"{self.device} x{self.dist.world_size} | run dir {self.run.path}"
              + (f" | resumed at step {self.step}" if resumed else ""), flush=True)
        warning = ramp_warning(s, info.dynamic, info.ramps)
        if warning:
            print(f"[adamwprune] {warning}", flush=True)

    def _final(self, status: str, message: Optional[str], started: float, train_time: float,
               steps_run: int) -> dict:
        total, prunable = self.param_counts()
        self._set_phase("done")  # closes the last phase's allocator peak
        mem = self.sampler.summary("train") if self.sampler is not None else {}
        if self.sampler is not None:
            self.sampler.stop()
        cuda_peak = self.cuda_peaks.get("train") if self.device.type == "cuda" else None
        peak = cuda_peak if cuda_peak is not None else mem.get("peak_bytes")
        run_totals = segments.totals(self._segments(peak))
        final = {
            "status": status, "message": message, "task": self.task.name,
            "metric_name": self.task.metric_name, "higher_is_better": self.task.higher_is_better,
            "best_val_metric": self.best.val_metric, "best_val_loss": self.best.val_loss,
            "best_step": self.best.step,
            "test_metric_at_best": self.best.test_metric, "final_sparsity": self.sparsity(),
            "target_sparsity": self.budget.schedule.target, **self._pattern_record(),
            "params_total": total,
            "params_prunable": prunable, "steps": self.step, "total_steps": self.total_steps,
            # Totals over every segment of a resumed run (segments.py); this one's alone in `segments`.
            **run_totals,
            "cuda_allocator_peak_bytes": cuda_peak,
            "cuda_allocator_peak_bytes_by_phase": self.cuda_peaks or None,
            "sampled_memory": mem,
            "memory": memory_report(self.model, self.optimizer, self.pruner),
            **final_costs(self),
            "config": {"model": self.cfg.model, "optimizer": self.cfg.optimizer,
                       "update_rule": self.cfg.update_rule, "pruning": self.cfg.pruning,
                       "seed": self.cfg.seed},
        }
        self.run.write_json("final.json", final)
        if self.dist.is_main:
            print_summary(final, self.run.path)
        return final
