"""`fastlm.train(...)`: fine-tune a checkpoint or train a preset from scratch on a text file.

One optimizer step = grad_accum micro-batches of batch_size blocks; micro-batch m of the run is fixed by
(seed, m) (see data.BlockSampler) and the learning rate by the step (schedule.lr_at), so a resumed run
repeats exactly what the uninterrupted run would have done. Under torchrun the run is data-parallel
(fastlm.training.distributed): the same global batches, split across the ranks; rank 0 owns --out.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from fastlm.training import checkpoint as ckpt
from fastlm.training.data import BlockSampler, load_blocks, read_text
from fastlm.training.evaluation import autocast_context, check_block_size, eval_loss, lm_loss
from fastlm.training.distributed import Distributed
from fastlm.training.interrupts import StopRequests, TrainingDiverged, TrainingInterrupted
from fastlm.training.model_setup import build_model_and_tokenizer, make_optimizer
from fastlm.training.options import TrainOptions, autocast_dtype
from fastlm.training.output import prepare_out, publish_model
from fastlm.training.schedule import lr_at

# Saved in trainer_state.json and taken from it on resume: they fix the schedule and the data order.
RUN_FIELDS = ("total_steps", "warmup", "lr", "min_lr_ratio", "batch_size", "grad_accum", "block_size", "seed")


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    tokens: int  # training tokens processed in total
    train_loss: Optional[float]  # mean training loss over the last logging window
    eval_loss: Optional[float]  # final eval loss (None without eval data)
    eval_perplexity: Optional[float]
    initial_eval_loss: Optional[float]  # eval loss before training (None when resuming or without eval)
    tokens_per_second: float  # training throughput of this run (excludes eval and saving)
    train_seconds: float
    out: str  # folder holding the final model

    def to_dict(self):
        return asdict(self)


def train(**kwargs) -> TrainResult:
    """Train and save a model; the keyword arguments are TrainOptions' fields (see `fastlm train -h`).
    Raises ValueError for bad options or an unusable `out` (before training), TrainingDiverged (a
    ValueError) at a non-finite loss, TrainingInterrupted (a KeyboardInterrupt) on SIGINT/SIGTERM once
    a resumable checkpoint is saved."""
    opts = TrainOptions.from_kwargs(**kwargs)
    dist = Distributed.from_env(opts.device, opts.dist_timeout)
    try:
        return Trainer(opts, dist).run()
    finally:
        dist.close()


class Trainer:
    def __init__(self, opts: TrainOptions, dist: Optional[Distributed] = None):
        self.dist = dist or Distributed(device=opts.device)
        self.opts, self.device = opts, self.dist.device
        read_text(opts.data, "data")  # fail on a missing/empty file before any model is built
        if opts.eval is not None:
            read_text(opts.eval, "eval")
        self.resume_from = ckpt.find_resume_checkpoint(opts.out, opts.resume) if opts.resume else None
        self.out = self.dist.on_main(  # only rank 0 creates and checks --out; the others get its answer
            lambda: prepare_out(opts.out, resume=bool(opts.resume), overwrite=opts.overwrite))
        self.model, self.tokenizer = self.dist.main_first(build_model_and_tokenizer, opts, self.out,
                                                          self.resume_from, self.device)
        self.state = self._initial_state()
        self._check_world_size()
        check_block_size(self.run_cfg["block_size"], self.model.config)
        block_size = self.run_cfg["block_size"]
        self.train_blocks = load_blocks(opts.data, self.tokenizer, block_size, "data")
        self.eval_blocks = load_blocks(opts.eval, self.tokenizer, block_size, "eval") if opts.eval else None
        self.sampler = BlockSampler(self.train_blocks, self.run_cfg["batch_size"], self.run_cfg["seed"])
        self._fix_schedule()
        self.train_model = self.dist.wrap(self.model, opts.fsdp)  # the same parameters, synchronized
        self.optimizer = make_optimizer(self.model, opts.weight_decay, self.device)
        if self.resume_from is not None:
            ckpt.load_optimizer_state(self.resume_from, self.optimizer, self.device, self._optimizer_io())
        self.amp_dtype = autocast_dtype(self.device, opts.precision)

    def _initial_state(self):
        if self.resume_from is not None:
            state = ckpt.read_state(self.resume_from)
            missing = [k for k in ("step", "tokens", *RUN_FIELDS) if k not in state]
            if missing:
                raise ValueError(f"resume: {self.resume_from / ckpt.STATE_FILE} lacks {', '.join(missing)}")
            ckpt.check_same_run(self.resume_from, state, self.opts)
            self.run_cfg = {k: state[k] for k in RUN_FIELDS}
            return state
        o = self.opts
        self.run_cfg = dict(total_steps=o.steps, warmup=o.warmup, lr=o.lr, min_lr_ratio=o.min_lr_ratio,
                            batch_size=o.batch_size, grad_accum=o.grad_accum, block_size=o.block_size, seed=o.seed)
        return {"step": 0, "tokens": 0, "eval_history": []}

    def _check_world_size(self):
        batch, world = self.run_cfg["batch_size"], self.dist.world_size
        if batch % world:
            raise ValueError(f"batch_size ({batch}) must be a multiple of the number of ranks ({world}): "
                             "it is the global batch, split evenly across the ranks")

    def _fix_schedule(self):
        """Total steps from epochs when not given, default warmup (a fresh run only: resume keeps them)."""
        cfg = self.run_cfg
        if cfg["total_steps"] is None:
            micro_batches = (self.opts.epochs or 1.0) * self.sampler.batches_per_epoch
            cfg["total_steps"] = max(1, math.ceil(micro_batches / cfg["grad_accum"]))
        if cfg["warmup"] is None:
            cfg["warmup"] = min(100, cfg["total_steps"] // 10)

    def run(self) -> TrainResult:
        initial = None
        if self.eval_blocks is not None and self.resume_from is None:
            initial = self._evaluate()
        self.model.train()
        with StopRequests() as stop:
            train_loss, seconds, tokens_run = self._loop(stop)
        eval_loss_final = self._evaluate() if self.eval_blocks is not None else None
        if eval_loss_final is not None:
            self.state["eval_history"].append({"step": self.state["step"], "eval_loss": eval_loss_final})
            self._append_log({"step": self.state["step"], "eval_loss": eval_loss_final,
                              "eval_perplexity": math.exp(eval_loss_final)})
        self._check_weights()
        model = self._full_model()
        self.dist.on_main(publish_model, self.out, lambda folder: ckpt.write_model_files(
            folder, model, self.tokenizer, self._trainer_state()))
        return TrainResult(
            steps=self.state["step"], tokens=self.state["tokens"], train_loss=train_loss, eval_loss=eval_loss_final,
            eval_perplexity=math.exp(eval_loss_final) if eval_loss_final is not None else None,
            initial_eval_loss=initial, tokens_per_second=tokens_run / seconds if seconds > 0 else 0.0,
            train_seconds=seconds, out=str(self.out))

    def _loop(self, stop):
        cfg, opts = self.run_cfg, self.opts
        tokens_per_step = cfg["batch_size"] * cfg["grad_accum"] * cfg["block_size"]
        bar = tqdm(total=cfg["total_steps"], initial=self.state["step"], unit="step", dynamic_ncols=True,
                   desc="train", disable=not (opts.progress and self.dist.is_main))
        loss_sum = torch.zeros((), device=self.device)
        window, last_loss, tokens_run = 0, None, 0
        watch = _Stopwatch(self.device)
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        while self.state["step"] < cfg["total_steps"]:
            with self.dist.guard("the gradients"):
                lr = self._train_step(self.state["step"], loss_sum)
            self.state["step"] += 1
            self.state["tokens"] += tokens_per_step
            tokens_run += tokens_per_step
            window += 1
            bar.update(1)
            done = self.state["step"] == cfg["total_steps"]
            signum = self.dist.max_int(stop.signum or 0)  # every rank stops at the same step
            if window == opts.log_every or done or self.device.type == "cpu" or signum:
                self._check_losses()  # a device sync: every step on CPU (free), once per window on a GPU
            if window == opts.log_every or done:
                last_loss = self.dist.mean(loss_sum).item() / window
                self._log(bar, lr, last_loss, tokens_run / max(watch.elapsed(), 1e-9))
                loss_sum.zero_()
                window = 0
            if not done and self.eval_blocks is not None and self._periodic(opts.eval_every):
                watch.paused(self._periodic_eval, bar)
            if not done and self._periodic(opts.save_every):
                watch.paused(self._save_checkpoint)
            if signum:
                bar.close()
                raise TrainingInterrupted(signum, self.state["step"], self._save_checkpoint())
        bar.close()
        return last_loss, watch.elapsed(), tokens_run

    def _periodic(self, every):
        return every > 0 and self.state["step"] % every == 0

    def _train_step(self, step, loss_sum):
        cfg = self.run_cfg
        lr = lr_at(step, peak_lr=cfg["lr"], total_steps=cfg["total_steps"], warmup_steps=cfg["warmup"],
                   min_lr_ratio=cfg["min_lr_ratio"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg["grad_accum"]):
            batch = self.dist.shard(self.sampler.batch(step * cfg["grad_accum"] + micro))
            batch = batch.to(self.device, non_blocking=True)
            with self.dist.no_sync(self.train_model, micro == cfg["grad_accum"] - 1):
                with autocast_context(self.device, self.amp_dtype):
                    loss = lm_loss(self.train_model, batch) / cfg["grad_accum"]
                loss.backward()
            loss_sum += loss.detach()
            bad = ~torch.isfinite(loss.detach()) & (self._first_bad_step < 0)  # recorded without a sync
            self._first_bad_step = torch.where(bad, step + 1, self._first_bad_step)
        if self.opts.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _log(self, bar, lr, loss, tokens_per_second):
        if not self.dist.is_main:
            return
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        self._append_log({"step": self.state["step"], "train_loss": loss, "lr": lr,
                          "tokens_per_second": tokens_per_second})

    def _periodic_eval(self, bar):
        loss = self._evaluate()
        self.state["eval_history"].append({"step": self.state["step"], "eval_loss": loss})
        self._append_log({"step": self.state["step"], "eval_loss": loss, "eval_perplexity": math.exp(loss)})
        if self.opts.progress and self.dist.is_main:
            bar.write(f"step {self.state['step']}: eval loss {loss:.4f}, perplexity {math.exp(loss):.2f}",
                      file=sys.stderr)

    def _evaluate(self):
        batch_size = self.opts.eval_batch_size or self.run_cfg["batch_size"]
        loss = eval_loss(self.model, self.eval_blocks, batch_size, self.device, self.amp_dtype)[0]
        if not math.isfinite(loss):
            self._diverged(f"the eval loss is {loss}")
        return loss

    def _check_losses(self):
        step = int(self.dist.max(self._first_bad_step).item())
        if step >= 0:
            self._diverged(f"the training loss is not finite at step {step} (try a lower learning rate)")

    def _check_weights(self):
        finite = all(torch.isfinite(_local(p)).all() for p in self.model.parameters())
        if self.dist.max_int(int(not finite)):
            self._diverged("the model's weights are not finite")

    def _diverged(self, what):
        found = ckpt.list_checkpoints(self.out)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved (see --save-every)"
        raise TrainingDiverged(f"training diverged: {what}; no final model written, {kept}")

    def _append_log(self, record):
        if not self.dist.is_main:
            return
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def _trainer_state(self):
        return {**self.state, **self.run_cfg, "data": str(self.opts.data), "options": self.opts.to_dict()}

    def _save_checkpoint(self):
        """A resumable checkpoint of the current step (losses checked first: never a diverged one)."""
        self._check_losses()
        folder = ckpt.checkpoint_folder(self.out, self.state["step"])
        model, optimizer_state = self._full_model(), self._optimizer_io().full_state()

        def save():
            ckpt.save_model_folder(folder, model, self.tokenizer, self._trainer_state(), optimizer_state)
            ckpt.prune_checkpoints(self.out, self.opts.keep_checkpoints)
        self.dist.on_main(save)
        return folder

    def _full_model(self):
        """The model with all its weights on rank 0 (FSDP gathers the shards; a collective)."""
        if not self.opts.fsdp:
            return self.model
        from fastlm.training.fsdp import gather_model

        return gather_model(self.model, self.dist.is_main)

    def _optimizer_io(self):
        from fastlm.training.fsdp import OptimizerState

        return OptimizerState(self.model, self.optimizer, self.opts.fsdp)


def _local(param):
    """This rank's part of a parameter (FSDP holds DTensors)."""
    return param.to_local() if hasattr(param, "to_local") else param


class _Stopwatch:
    """Training time without evaluation and saving; synchronizes CUDA before reading the clock."""

    def __init__(self, device):
        self.device, self.total, self.t0 = device, 0.0, time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self):
        self._sync()
        return self.total + time.perf_counter() - self.t0

    def paused(self, fn, *args):
        self._sync()
        self.total += time.perf_counter() - self.t0
        fn(*args)
        self.t0 = time.perf_counter()
