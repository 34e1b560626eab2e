"""The pretraining loop: megatron-core model, DeepSpeed engine (ZeRO holds the optimizer state).

One iteration = gradient-accumulation micro-batches, then one optimizer step. DeepSpeed's ZeRO
optimizer checks gradients for inf/NaN and skips such a step (the iteration is counted as
skipped); too many in a row stop the run. Everything before the first step (process groups,
model, engine) is ``training/setup.py``; what is logged and how, ``training/metrics/``.
"""

from __future__ import annotations

import gc
import itertools
import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.compat.deepspeed import reduce_gradients_after_external_backward
from megatron_hypermoe.compat.megatron_core import accelerator_summary
from megatron_hypermoe.data.gpt_data import build_data_loader
from megatron_hypermoe.data.tokenizer import build_tokenizer, tokenizer_fingerprint
from megatron_hypermoe.errors import TrainingStopped
from megatron_hypermoe.model.generation import generate_ids
from megatron_hypermoe.model.gpt import causal_attention_mask, kernels_line
from megatron_hypermoe.model.router import finish_router_step
from megatron_hypermoe.model.side_path import record_side_path_statistics
from megatron_hypermoe.parallel.distributed import distributed_timeout, print_rank0
from megatron_hypermoe.parallel.peers import PeerWatch
from megatron_hypermoe.parallel.pipeline import (
    allreduce_shared_grads,
    from_last_stage,
    pipeline_size,
    run_schedule,
)
from megatron_hypermoe.training.checkpoint.files import latest_iteration
from megatron_hypermoe.training.checkpoint.save_load import (
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from megatron_hypermoe.training.config import RunConfig
from megatron_hypermoe.training.flops import parameter_counts, training_flops_per_iteration
from megatron_hypermoe.training.lr_schedule import LRSchedule
from megatron_hypermoe.training.metrics.probes import (
    AUX_LOSS_KEYS,
    AuxLossesPaused,
    ExpertLoadCounter,
    expert_load_values,
    side_path_values,
    take_aux_losses,
)
from megatron_hypermoe.training.metrics.windows import LogWindows
from megatron_hypermoe.training.metrics.writers import MetricsWriter, ProgressBar
from megatron_hypermoe.training.node_storage import build_training_datasets, check_save_is_shared
from megatron_hypermoe.training.setup import (
    build_engine,
    build_model,
    engine_summary_lines,
    initialize_parallel,
    training_device,
)

# Megatron measures --exit-duration-in-mins from the earliest moment it can: program start.
START_TIME = time.time()


def model_output(model, batch, device):
    """The per-token loss (on a pipeline stage before the last: its hidden states) and the
    loss mask."""
    # non_blocking: the loader's batches are pinned on a GPU machine, and a blocking copy would
    # wait for every kernel queued before it
    tokens, labels, position_ids, loss_mask = (
        batch[key].to(device, non_blocking=True)
        for key in ("tokens", "labels", "position_ids", "loss_mask"))
    mask = causal_attention_mask(tokens.shape[1], device)
    return model(tokens, position_ids, mask, labels=labels), loss_mask.float()


def masked_mean(per_token, loss_mask):
    return (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


def masked_lm_loss(model, batch, device):
    return masked_mean(*model_output(model, batch, device))


class StopVote:
    """Every rank's reasons to stop (SIGTERM, --exit-duration-in-mins), agreed by all ranks
    without the host waiting for the device: the vote cast after iteration N is all-reduced
    behind that iteration's work and read after iteration N + 1, by when the device has long
    finished it. Every rank reads the same vote at the same iteration, so all stop together,
    one iteration after the reason arose."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pending = None  # (host copy of the agreed flags, CUDA event or None)

    def cast(self, *reasons: bool):
        """Cast this rank's flags; returns the previous vote's agreed flags (None at first)."""
        agreed = self.read()
        on_cuda = self.device.type == "cuda"
        flags = torch.tensor([1.0 if reason else 0.0 for reason in reasons]).to(
            self.device, non_blocking=True)
        dist.all_reduce(flags)  # (NCCL: the host does not wait for it)
        host = torch.empty(flags.shape, pin_memory=on_cuda)
        host.copy_(flags, non_blocking=True)
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (host, event)
        return agreed

    def read(self):
        if self.pending is None:
            return None
        host, event = self.pending
        if event is not None:
            event.synchronize()  # the previous iteration's work: done by now
        return [value > 0 for value in host.tolist()]


class Trainer:
    def __init__(self, run: RunConfig):
        self.run = run  # with the padded vocabulary once setup() has built the tokenizer
        self.stop_requested = False
        self.last_eval_iteration = None
        self.last_saved_iteration = None
        self.metrics = None
        self.peers = None  # the heartbeat of a multi-process job (parallel/peers.py)
        self.device = training_device()
        self.stop_vote = StopVote(self.device)
        self.aux_loss_scale = None  # megatron's aux-loss gradient scale, on the device

    # Setup ----------------------------------------------------------------------------------------
    def setup(self):
        run = self.run
        initialize_parallel(run)
        self.rank = dist.get_rank()
        if dist.get_world_size() > 1:
            self.peers = PeerWatch(distributed_timeout(run.training.distributed_timeout_minutes))
        check_save_is_shared(run.checkpoint.save)
        if accelerator_summary() is not None:
            print_rank0(accelerator_summary())
        # Tensor-parallel peers read the same batches; data-parallel ranks read different ones.
        self.data_parallel_rank = parallel_state.get_data_parallel_rank()
        self.tokenizer = build_tokenizer(run.tokenizer)
        self.run = run = run.with_vocab(self.tokenizer.vocab_size)
        self.engine, self.optimizer = build_engine(build_model(run), run)
        self.model = self.engine.module
        # megatron-core's scheduler sets every group's lr and weight decay (no schedule to run
        # for --eval-only)
        self.schedule = LRSchedule(self.optimizer, run) if run.training.train_iters else None
        self.state = TrainState()
        checkpoint = run.checkpoint
        if checkpoint.load and checkpoint.load == checkpoint.save and \
                checkpoint.ckpt_step is None and latest_iteration(checkpoint.load) is None:
            # The usual cluster setup (--save D --load D): the first launch finds nothing yet.
            print_rank0(f"no checkpoint in {checkpoint.load} yet: starting from iteration 0")
        elif checkpoint.load:
            self.state = load_checkpoint(self.engine, run, self.schedule)
            print_rank0(f"loaded {checkpoint.load} at iteration {self.state.iteration}")
        self.build_data()
        self.metrics = MetricsWriter(run, is_writer_rank=self.rank == 0)
        self.expert_load = ExpertLoadCounter(self.model)
        self.flops_per_iteration = training_flops_per_iteration(run)
        total, active = parameter_counts(self.model, run)
        self.metrics.record({"parameters": total, "active_parameters": active})
        pp = run.parallel.pp
        pipeline_line = f"PP {pp} ({run.model.num_layers // pp} layers per stage), " \
            if pp > 1 else ""
        print_rank0(f"model: {run.model.moe_type}, {total / 1e6:.2f}M parameters "
                    f"({active / 1e6:.2f}M active per token), "
                    f"{run.parallel.world_size} rank(s), TP {run.parallel.tp}"
                    f"{' (sequence parallel)' if run.parallel.sequence_parallel else ''}, "
                    f"EP {run.parallel.ep}, "
                    f"{pipeline_line}DP {run.parallel.dp}, "
                    f"global batch {run.training.global_batch_size} "
                    f"({run.training.gradient_accumulation_steps} micro-batch(es) of "
                    f"{run.training.micro_batch_size} per rank), ZeRO stage {run.parallel.zero}")
        print_rank0(kernels_line(run.model))
        for line in engine_summary_lines(run, self.engine):
            print_rank0(line)

    def build_data(self):
        self.train_dataset, self.valid_dataset, _ = build_training_datasets(self.run,
                                                                            self.tokenizer)

    def train_loader(self):
        run = self.run
        return build_data_loader(self.train_dataset, self.state.consumed_train_samples,
                                 run.training.micro_batch_size, self.data_parallel_rank,
                                 run.parallel.dp, run.data.num_workers)

    # Evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """Token-weighted validation loss over --eval-iters global batches (same ones each time)."""
        run = self.run
        if self.valid_dataset is None:
            return None
        loader = build_data_loader(self.valid_dataset, 0, run.training.micro_batch_size,
                                   self.data_parallel_rank, run.parallel.dp)
        self.engine.eval()
        self.expert_load.paused = True
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        count = min(run.training.eval_iters * run.training.gradient_accumulation_steps, len(loader))
        with AuxLossesPaused():
            if pipeline_size() > 1:
                for store in self.run_pipeline(iter(loader), count, forward_only=True):
                    totals += torch.stack([store["lm_loss"].double() * store["tokens"],
                                           store["tokens"]])
            else:
                for batch in itertools.islice(loader, count):
                    mask = batch["loss_mask"].to(self.device).float()
                    loss = masked_lm_loss(self.engine, batch, self.device)
                    totals += torch.stack([loss.double() * mask.sum(), mask.sum().double()])
        self.expert_load.paused = False
        self.engine.train()
        self.last_eval_iteration = self.state.iteration
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        from_last_stage(totals)
        val_loss = float(totals[0] / totals[1].clamp_min(1))
        return val_loss

    def log_evaluation(self, val_loss):
        if val_loss is None:
            return
        iteration = self.state.iteration
        values = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        self.metrics.log(iteration, values, prefix=f" validation at iteration {iteration}")

    # Training -------------------------------------------------------------------------------------
    def inject_fault(self, loss):
        if self.state.iteration + 1 in (self.run.training.inject_nan_loss_at or ()):
            return loss * float("nan")  # fault injection (tests the skip path)
        return loss

    def run_pipeline(self, batches, num_microbatches: int, forward_only: bool) -> list:
        """megatron-core's schedule over this stage (parallel/pipeline.py); per micro-batch
        {"lm_loss", "tokens"} on the last stage, [] on the others."""
        run = self.run

        def forward_step(iterator, stage):
            output, loss_mask = model_output(stage, next(iterator), self.device)

            def loss_func(per_token):
                loss = self.inject_fault(masked_mean(per_token, loss_mask))
                # a copy: megatron's schedule divides the returned loss in place
                return loss, {"lm_loss": loss.detach().clone(),
                              "tokens": loss_mask.sum().double()}
            return output, loss_func

        return run_schedule(self.model, forward_step, batches, num_microbatches,
                            run.data.seq_length, run.training.micro_batch_size, forward_only)

    def accumulate_micro_batches(self, batches) -> list:
        """Forward and backward of one step's micro-batches; their losses (this rank's)."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        run = self.run
        if pipeline_size() > 1:
            stores = self.run_pipeline(batches, run.training.gradient_accumulation_steps,
                                       forward_only=False)
            allreduce_shared_grads(self.model)  # the hypernetwork's replicas, summed
            reduce_gradients_after_external_backward(self.engine)
            self.engine.step()
            return [store["lm_loss"] for store in stores] or [torch.zeros((), device=self.device)]
        losses = []
        for micro in range(run.training.gradient_accumulation_steps):
            loss = self.inject_fault(masked_lm_loss(self.engine, next(batches), self.device))
            # DeepSpeed divides the main loss by the accumulation steps (and multiplies by the
            # fp16 loss scale); the aux losses enter backward separately and need the same.
            scale = 1.0 / run.training.gradient_accumulation_steps
            if run.model.fp16:
                scale *= float(self.optimizer.cur_scale)
            self.set_aux_loss_scale(MoEAuxLossAutoScaler, scale)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        return losses

    def set_aux_loss_scale(self, scaler, scale: float):
        """megatron keeps the scale in a tensor: ours is one on the device, filled when the
        scale changes (a new CUDA tensor from a Python float per micro-batch waited for the
        GPU). megatron adopts it, or copies it into the one it holds (device to device)."""
        if self.aux_loss_scale is None:
            self.aux_loss_scale = (torch.full((), scale, device=self.device), scale)
        elif self.aux_loss_scale[1] != scale:
            self.aux_loss_scale[0].fill_(scale)
            self.aux_loss_scale = (self.aux_loss_scale[0], scale)
        scaler.set_loss_scale(self.aux_loss_scale[0])

    def train_step(self, batches):
        run = self.run
        lr = self.schedule.lr  # what this step uses
        skipped_before = self.engine.skipped_steps
        losses = self.accumulate_micro_batches(batches)
        finish_router_step(self.model, self.run.model)  # expert bias, global aux-loss counts
        skipped = self.engine.skipped_steps > skipped_before
        if not skipped:  # as Megatron: a skipped step does not advance the schedule
            self.schedule.step(run.training.global_batch_size)
        # this rank's mean loss, on the device: averaged over ranks and read when logged
        return torch.stack(losses).mean(), lr, skipped

    @staticmethod
    def reduce_loss(local_loss) -> float:
        """The step's loss averaged over data-parallel ranks, from the last pipeline stage, on
        the host. Collective."""
        data_parallel = parallel_state.get_data_parallel_group()
        mean_loss = local_loss.detach().clone()
        dist.all_reduce(mean_loss, group=data_parallel)
        return float(from_last_stage(mean_loss)) / dist.get_world_size(data_parallel)

    def timing_values(self, elapsed, iterations):
        run = self.run
        return {
            "ms_per_iter": 1000.0 * elapsed / iterations,
            "tokens_per_s": (run.training.global_batch_size * run.data.seq_length * iterations
                             / elapsed),
            "tflops_per_device": (self.flops_per_iteration * iterations / elapsed
                                  / run.parallel.world_size / 1e12),
        }

    def training_values(self, loss, lr, elapsed, iterations):
        """The values of the iterations since the last logging event, and which of them are
        aux losses. Collective (aux losses and expert loads are reduced over ranks)."""
        run = self.run
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "lm_loss": self.reduce_loss(loss), "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            **self.timing_values(elapsed, iterations),
            "batch_size": run.training.global_batch_size,
            "skipped_iterations": self.state.skipped_iterations,
        }
        aux = take_aux_losses(iterations * run.training.gradient_accumulation_steps,
                              per_layer=run.logging.moe_per_layer_logging)
        aux = {AUX_LOSS_KEYS.get(name, name): value for name, value in aux.items()}
        values.update(aux)
        load = self.expert_load.take()
        if load is not None:
            values.update(expert_load_values(load))
        values.update(side_path_values(self.model))
        # The console averages the scalar losses (per-layer lists go to the writers only).
        return values, {name: value for name, value in aux.items() if isinstance(value, float)}

    def log_training(self, log, loss, lr, console, scalars):
        """A logging event: TensorBoard/W&B get the values since the last event (Megatron
        writes per --tensorboard-log-interval); the console line averages timing and aux losses
        over the iterations since the last line (per --log-interval). Collective."""
        now = time.time()
        elapsed, iterations = log.take_event(now)
        values, aux = self.training_values(loss, lr, elapsed, iterations)
        log.add_event_aux(aux, iterations)
        console_values = None
        if console:
            elapsed, iterations, mean_aux = log.take_console(now)
            console_values = {**values, **self.timing_values(elapsed, iterations), **mean_aux}
        iteration = self.state.iteration
        prefix = f" iteration {iteration:8d}/{self.run.training.train_iters:8d}"
        self.metrics.log(iteration, values, prefix, console_values=console_values,
                         console=console, scalars=scalars)

    def save(self):
        directory = save_checkpoint(self.engine, self.run, self.state,
                                    tokenizer=tokenizer_fingerprint(self.run.tokenizer,
                                                                    self.tokenizer),
                                    schedule=self.schedule)
        self.last_saved_iteration = self.state.iteration
        print_rank0(f"saved checkpoint {directory}")

    def save_unless_just_saved(self):
        if self.run.checkpoint.save and self.last_saved_iteration != self.state.iteration:
            self.save()

    def train(self):
        """Train to --train-iters; False if it stopped early (SIGTERM or --exit-interval)."""
        run = self.run
        batches = iter(self.train_loader())
        consecutive_skips = 0
        log = LogWindows(run.logging.log_interval, run.logging.tensorboard_log_interval,
                         run.logging.writes_scalars)
        progress = ProgressBar(run.training.train_iters, self.state.iteration, self.rank == 0)
        if run.training.manual_gc:
            # Python's collector pauses each rank at a different moment, and the others wait
            # for it at the next collective; collect at the same iteration everywhere instead.
            gc.disable()
        while self.state.iteration < run.training.train_iters:
            record_side_path_statistics(self.model, any(log.due(self.state.iteration + 1)))
            loss, lr, skipped = self.train_step(batches)
            self.state.iteration += 1
            if run.training.manual_gc and run.training.manual_gc_interval and \
                    self.state.iteration % run.training.manual_gc_interval == 0:
                gc.collect()
            self.state.consumed_train_samples += run.training.global_batch_size
            log.count_iteration()
            if skipped:
                self.state.skipped_iterations += 1
                consecutive_skips += 1
                print_rank0(f" iteration {self.state.iteration}: non-finite loss or gradient, "
                            "optimizer step skipped")
                if consecutive_skips >= run.training.max_consecutive_skipped_iters:
                    raise TrainingStopped(
                        f"{consecutive_skips} iterations in a row had a non-finite loss or "
                        f"gradient (last at iteration {self.state.iteration}); lower --lr or "
                        "check the data, then resume from the last checkpoint")
            else:
                consecutive_skips = 0
            progress.update(self.state.iteration)
            console, scalars = log.due(self.state.iteration)
            if console or scalars:
                self.log_training(log, loss, lr, console, scalars)
            eval_interval = run.training.eval_interval
            if eval_interval and self.state.iteration % eval_interval == 0:
                self.log_evaluation(self.evaluate())
            if run.checkpoint.save and run.checkpoint.save_interval and \
                    self.state.iteration % run.checkpoint.save_interval == 0:
                self.save()
            reason = self._exit_reason()
            if reason:
                self.save_unless_just_saved()
                print_rank0(f"exiting at iteration {self.state.iteration} ({reason})")
                return False
        progress.close()
        return True

    def finish(self):
        """After a completed run: a last evaluation and checkpoint unless just done, a sample."""
        if self.last_eval_iteration != self.state.iteration:
            self.log_evaluation(self.evaluate())
        self.save_unless_just_saved()
        sample = self.sample_text()
        if sample is not None:
            print_rank0("---- generated sample ----")
            print_rank0(sample)
            print_rank0("--------------------------")

    def _exit_reason(self):
        """Why to stop now (SIGTERM, --exit-duration-in-mins, --exit-interval), or None; every
        rank gets the same answer."""
        run = self.run
        minutes = (time.time() - START_TIME) / 60.0
        limit = run.training.exit_duration_in_mins
        over_time = bool(limit) and minutes > limit
        # any rank's signal or clock stops all at the same iteration (StopVote: one later)
        agreed = self.stop_vote.cast(self.stop_requested, over_time)
        if agreed is not None:
            signalled, over_time = agreed
            if signalled:
                return "SIGTERM"
            if over_time:
                return f"--exit-duration-in-mins {run.training.exit_duration_in_mins}"
        interval = run.training.exit_interval
        if interval and self.state.iteration % interval == 0:
            return "--exit-interval"
        return None

    def sample_text(self):
        """Every rank generates in lock-step (tensor and expert parallel forwards are
        collective, and the same seed gives every rank the same samples); rank 0 returns it."""
        run = self.run
        if run.training.generate_tokens <= 0 or run.data.mock_data:
            return None
        prompt = self.tokenizer.tokenize(run.training.generate_prompt) or [self.tokenizer.eod]
        new_ids = generate_ids(self.model, prompt, run.training.generate_tokens,
                               run.data.seq_length,
                               greedy=False, top_p=0.9,
                               generator=torch.Generator().manual_seed(run.training.seed),
                               eod=self.tokenizer.eod, vocab_size=self.tokenizer.vocab_size)
        return self.tokenizer.detokenize(prompt + new_ids) if self.rank == 0 else None

    def close(self):
        if self.metrics is not None:
            self.metrics.close()
