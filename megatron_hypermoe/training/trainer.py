"""The pretraining loop: megatron-core model, DeepSpeed engine (ZeRO holds the optimizer state).

Launch with ``deepspeed pretrain_gpt_hypermoe.py``, ``torchrun`` or plain ``python``. One
iteration = gradient-accumulation micro-batches, then one optimizer step. DeepSpeed's ZeRO
optimizer checks gradients for inf/NaN and skips such a step (the iteration is counted as
skipped); too many in a row stop the run.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hypermoe.config import make_config
from megatron_hypermoe.data.corpus import DataError
from megatron_hypermoe.data.gpt_data import (build_data_loader, build_gpt_datasets,
                                             gpt_dataset_config)
from megatron_hypermoe.data.tokenizer import build_tokenizer, tokenizer_fingerprint
from megatron_hypermoe.generation import generate_ids
from megatron_hypermoe.initialization import initialize_from_global_names
from megatron_hypermoe.model import build_gpt_model, causal_attention_mask
from megatron_hypermoe.parallel import destroy_distributed, initialize_distributed
from megatron_hypermoe.sequence_parallel import allreduce_sequence_parallel_grads_in_backward
from megatron_hypermoe.training.arguments import ArgumentError, parse_args
from megatron_hypermoe.training.checkpointing import (CheckpointError, TrainState,
                                                      latest_iteration, load_checkpoint,
                                                      save_checkpoint)
from megatron_hypermoe.training.deepspeed_mpu import MegatronMPU
from megatron_hypermoe.training.ds_config import DeepSpeedConfigError, resolve_config
from megatron_hypermoe.training.expert_parallel import (deepspeed_recognises_megatron_moe,
                                                        register_expert_parallel,
                                                        split_moe_param_groups)
from megatron_hypermoe.training.flops import parameter_counts, training_flops_per_iteration
from megatron_hypermoe.training.lr_schedule import learning_rate
from megatron_hypermoe.training.metrics import (AuxLossesPaused, ExpertLoadCounter,
                                                MetricsWriter, expert_load_scalars,
                                                hyper_output_rms, take_aux_losses)

USER_ERRORS = (ArgumentError, DataError, CheckpointError, DeepSpeedConfigError)


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); one-line message."""


def print_rank0(*values, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*values, **kwargs, flush=True)


def padded_vocab_size(vocab_size: int, args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def model_config(args):
    sizes = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        bf16=args.bf16, fp16=args.fp16,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16
        else torch.float32,
    )
    if args.moe_type != "dense":
        sizes.update(
            num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff, moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            expert_model_parallel_size=args.expert_model_parallel_size,
            hyper_adapter_dim=args.hyper_adapter_dim, hyper_hidden_size=args.hyper_hidden_size,
            hyper_expert_embedding_dim=args.hyper_expert_embedding_dim,
            hyper_selection_hidden_size=args.hyper_selection_hidden_size,
            hyper_selection_output_size=args.hyper_selection_output_size,
            hyper_layer_embedding_dim=args.hyper_layer_embedding_dim,
            hyper_expert_impl=args.hyper_expert_impl,
        )
    return make_config(args.moe_type, **sizes)


def optimizer_param_groups(model, weight_decay: float, expert_parallel: bool):
    """Megatron's rule: no weight decay on biases and norm weights (1-D parameters); with
    expert parallelism, experts in their own groups (DeepSpeed reduces them differently)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_moe_param_groups(groups) if expert_parallel else groups


def masked_lm_loss(model, batch, device):
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    loss_mask = batch["loss_mask"].to(device).float()
    position_ids = batch["position_ids"].to(device)
    mask = causal_attention_mask(tokens.shape[1], device)
    per_token = model(tokens, position_ids, mask, labels=labels).float()
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)


class Trainer:
    def __init__(self, args):
        self.args = args
        self.stop_requested = False
        self.last_eval_iteration = None
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    # Setup ----------------------------------------------------------------------------------------
    def setup(self):
        import deepspeed

        args = self.args
        initialize_distributed(args.tensor_model_parallel_size,
                               args.expert_model_parallel_size, args.seed)
        self.rank = dist.get_rank()
        # Tensor-parallel peers read the same batches; data-parallel ranks read different ones.
        self.data_parallel_rank = parallel_state.get_data_parallel_rank()
        self.tokenizer = build_tokenizer(args)
        args.padded_vocab_size = padded_vocab_size(self.tokenizer.vocab_size, args)
        self.config = model_config(args)
        model = build_gpt_model(self.config, args.padded_vocab_size,
                                args.max_position_embeddings)
        initialize_from_global_names(model, self.config, args.seed)
        # Norms, router and the HyperMoE path see one sequence slice per TP rank: sum their
        # gradients over the TP group (DeepSpeed only reduces over data-parallel ranks).
        allreduce_sequence_parallel_grads_in_backward(model)
        expert_parallel = args.expert_model_parallel_size > 1
        if expert_parallel:
            register_expert_parallel(model, args.num_experts, args.expert_model_parallel_size)
        optimizer = torch.optim.AdamW(
            optimizer_param_groups(model, args.weight_decay, expert_parallel), lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
        with deepspeed_recognises_megatron_moe() if expert_parallel else nullcontext():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model.to(self.device), optimizer=optimizer, config=resolve_config(args),
                mpu=MegatronMPU())
        self.model = self.engine.module
        self.state = TrainState()
        if args.load and args.load == args.save and latest_iteration(args.load) is None:
            # The usual cluster setup (--save D --load D): the first launch finds nothing yet.
            print_rank0(f"no checkpoint in {args.load} yet: starting from iteration 0")
        elif args.load:
            self.state = load_checkpoint(self.engine, args)
            print_rank0(f"loaded {args.load} at iteration {self.state.iteration}")
        self.build_data()
        self.metrics = MetricsWriter(args, is_writer_rank=self.rank == 0)
        self.expert_load = ExpertLoadCounter(self.model)
        self.flops_per_iteration = training_flops_per_iteration(args)
        total, active = parameter_counts(self.model, args)
        self.metrics.record({"parameters": total, "active_parameters": active})
        print_rank0(f"model: {args.moe_type}, {total / 1e6:.2f}M parameters "
                    f"({active / 1e6:.2f}M active per token), "
                    f"{args.world_size} rank(s), TP {args.tensor_model_parallel_size}"
                    f"{' (sequence parallel)' if args.sequence_parallel else ''}, "
                    f"EP {args.expert_model_parallel_size}, DP {args.data_parallel_size}, "
                    f"global batch {args.global_batch_size} "
                    f"({args.gradient_accumulation_steps} micro-batch(es) of "
                    f"{args.micro_batch_size} per rank), ZeRO stage {args.zero_stage}")

    def build_data(self):
        args = self.args
        fingerprint = None if args.mock_data else tokenizer_fingerprint(args, self.tokenizer)
        config = gpt_dataset_config(
            seed=args.seed, seq_length=args.seq_length, tokenizer=self.tokenizer,
            data_path=args.data_path, split=args.split, data_cache_path=args.data_cache_path,
            mock=args.mock_data, fingerprint=fingerprint)
        evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 1
        sizes = [args.train_iters * args.global_batch_size,
                 evals * args.eval_iters * args.global_batch_size, 0]
        # Rank 0 builds megatron's cached sample indices first; the others then read them.
        if self.rank == 0:
            datasets = build_gpt_datasets(config, sizes)
        dist.barrier()
        if self.rank != 0:
            datasets = build_gpt_datasets(config, sizes)
        self.train_dataset, self.valid_dataset, _ = datasets

    def train_loader(self):
        args = self.args
        return build_data_loader(self.train_dataset, self.state.consumed_train_samples,
                                 args.micro_batch_size, self.data_parallel_rank,
                                 args.data_parallel_size, args.num_workers)

    # Evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self):
        """Token-weighted validation loss over --eval-iters global batches (same ones each time)."""
        args = self.args
        if self.valid_dataset is None:
            return None
        loader = build_data_loader(self.valid_dataset, 0, args.micro_batch_size,
                                   self.data_parallel_rank, args.data_parallel_size)
        self.engine.eval()
        self.expert_load.paused = True
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = iter(loader)
        with AuxLossesPaused():
            for _ in range(args.eval_iters * args.gradient_accumulation_steps):
                batch = next(batches, None)
                if batch is None:
                    break
                mask = batch["loss_mask"].to(self.device).float()
                loss = masked_lm_loss(self.engine, batch, self.device)
                totals += torch.stack([loss.double() * mask.sum(), mask.sum().double()])
        self.expert_load.paused = False
        self.engine.train()
        self.last_eval_iteration = self.state.iteration
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        val_loss = float(totals[0] / totals[1].clamp_min(1))
        return val_loss

    def log_evaluation(self, val_loss):
        if val_loss is None:
            return
        iteration = self.state.iteration
        ppl = math.exp(min(val_loss, 50.0))
        print_rank0(f" validation at iteration {iteration} | lm loss {val_loss:.4f} | "
                    f"ppl {ppl:.2f}")
        self.metrics.scalars(iteration, {"lm loss validation": val_loss,
                                         "lm loss validation ppl": ppl})
        self.metrics.record({"iteration": iteration, "val_loss": val_loss, "val_ppl": ppl})

    # Training -------------------------------------------------------------------------------------
    def train_step(self, batches):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        args = self.args
        lr = learning_rate(self.state.iteration, args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        skipped_before = self.engine.skipped_steps
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            batch = next(batches)
            loss = masked_lm_loss(self.engine, batch, self.device)
            if self.state.iteration + 1 in (args.inject_nan_loss_at or ()):
                loss = loss * float("nan")  # fault injection (tests the skip path)
            # DeepSpeed divides the main loss by the accumulation steps (and multiplies by the
            # fp16 loss scale); the aux losses enter backward separately and need the same.
            scale = 1.0 / args.gradient_accumulation_steps
            if args.fp16:
                scale *= float(self.optimizer.cur_scale)
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=self.device))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        skipped = self.engine.skipped_steps > skipped_before
        mean_loss = torch.stack(losses).mean()
        data_parallel = parallel_state.get_data_parallel_group()
        dist.all_reduce(mean_loss, group=data_parallel)
        mean_loss = float(mean_loss) / dist.get_world_size(data_parallel)
        return mean_loss, lr, skipped

    def log_training(self, loss, lr, elapsed, iterations):
        args = self.args
        iteration = self.state.iteration
        ms = 1000.0 * elapsed / iterations
        tokens_per_s = args.global_batch_size * args.seq_length * iterations / elapsed
        tflops = self.flops_per_iteration * iterations / elapsed / args.world_size / 1e12
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        aux = take_aux_losses(iterations * args.gradient_accumulation_steps)
        load = self.expert_load.take()
        rms = hyper_output_rms(self.model)
        aux_loss = aux.get("load_balancing_loss")
        line = (f" iteration {iteration:8d}/{args.train_iters:8d} | lm loss {loss:.4f} | "
                + (f"aux loss {aux_loss:.4f} | " if aux_loss is not None else "")
                + f"lr {lr:.3e} | grad norm {grad_norm:.3f} | {ms:.1f} ms/iter | "
                f"{tokens_per_s:,.0f} tokens/s | {tflops:.4f} TFLOP/s/device | "
                f"skipped {self.state.skipped_iterations}")
        print_rank0(line)
        scalars = {"lm loss": loss, "learning-rate": lr, "grad-norm": grad_norm,
                   "iteration-time": ms / 1000.0, "tokens-per-second": tokens_per_s,
                   "TFLOPs-per-device": tflops,
                   "skipped-iterations": float(self.state.skipped_iterations)}
        scalars.update(aux)
        record = {"iteration": iteration, "lm_loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "ms_per_iter": ms, "tokens_per_s": tokens_per_s,
                  "tflops_per_device": tflops,
                  "skipped_iterations": self.state.skipped_iterations}
        if aux_loss is not None:
            record["aux_loss"] = aux_loss
        if "z_loss" in aux:
            record["z_loss"] = aux["z_loss"]
        if load is not None:
            scalars.update(expert_load_scalars(load))
            fractions = load / load.sum(dim=1, keepdim=True).clamp_min(1)
            record["expert_load"] = fractions.tolist()
            record["max_over_mean_load"] = (fractions.max(1).values /
                                            fractions.mean(1)).tolist()
        for layer, value in enumerate(rms):
            scalars[f"hypermoe/layer_{layer}_hyper_output_rms"] = value
        if rms:
            record["hyper_output_rms"] = rms
        self.metrics.scalars(iteration, scalars)
        self.metrics.record(record)

    def save(self):
        directory = save_checkpoint(self.engine, self.args, self.state,
                                    tokenizer=tokenizer_fingerprint(self.args, self.tokenizer))
        print_rank0(f"saved checkpoint {directory}")

    def train(self):
        args = self.args
        batches = iter(self.train_loader())
        consecutive_skips = 0
        last_log_time, iterations_since_log = time.time(), 0
        progress = _Progress(args.train_iters, self.state.iteration, self.rank == 0)
        while self.state.iteration < args.train_iters:
            loss, lr, skipped = self.train_step(batches)
            self.state.iteration += 1
            self.state.consumed_train_samples += args.global_batch_size
            iterations_since_log += 1
            if skipped:
                self.state.skipped_iterations += 1
                consecutive_skips += 1
                print_rank0(f" iteration {self.state.iteration}: non-finite loss or gradient, "
                            "optimizer step skipped")
                if consecutive_skips >= args.max_consecutive_skipped_iters:
                    raise TrainingStopped(
                        f"{consecutive_skips} iterations in a row had a non-finite loss or "
                        f"gradient (last at iteration {self.state.iteration}); lower --lr or "
                        "check the data, then resume from the last checkpoint")
            else:
                consecutive_skips = 0
            progress.update(self.state.iteration)
            if self.state.iteration % args.log_interval == 0:
                now = time.time()
                self.log_training(loss, lr, now - last_log_time, iterations_since_log)
                last_log_time, iterations_since_log = now, 0
            if args.eval_interval and self.state.iteration % args.eval_interval == 0:
                self.log_evaluation(self.evaluate())
            if args.save and args.save_interval and \
                    self.state.iteration % args.save_interval == 0:
                self.save()
            if self._should_exit():
                if args.save and not (args.save_interval and
                                      self.state.iteration % args.save_interval == 0):
                    self.save()
                print_rank0(f"exiting at iteration {self.state.iteration} "
                            f"({'SIGTERM' if self.stop_requested else '--exit-interval'})")
                return False
        progress.close()
        return True

    def _should_exit(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag)  # every rank stops at the same iteration
        self.stop_requested = bool(flag.item())
        interval = self.args.exit_interval
        return self.stop_requested or bool(interval and self.state.iteration % interval == 0)

    def sample_text(self):
        """Every rank generates in lock-step (tensor and expert parallel forwards are
        collective, and the same seed gives every rank the same samples); rank 0 returns it."""
        args = self.args
        if args.generate_tokens <= 0 or args.mock_data:
            return None
        prompt = self.tokenizer.tokenize(args.generate_prompt) or [self.tokenizer.eod]
        new_ids = generate_ids(self.model, prompt, args.generate_tokens, args.seq_length,
                               greedy=False, top_p=0.9,
                               generator=torch.Generator().manual_seed(args.seed),
                               eod=self.tokenizer.eod, vocab_size=self.tokenizer.vocab_size)
        return self.tokenizer.detokenize(prompt + new_ids) if self.rank == 0 else None


class _Progress:
    """A progress bar with ETA on a terminal; the log lines carry progress otherwise."""

    def __init__(self, total, start, enabled):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="iter", file=sys.stderr)

    def update(self, iteration):
        if self.bar is not None:
            self.bar.n = iteration
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = None
    try:
        args = parse_args(argv, world_size)
        trainer = Trainer(args)
        signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
        trainer.setup()
        if args.eval_only:
            trainer.log_evaluation(trainer.evaluate())
            dist.barrier()
            destroy_distributed()
            return 0
        finished = trainer.train()
        if finished:
            if trainer.last_eval_iteration != trainer.state.iteration:
                trainer.log_evaluation(trainer.evaluate())
            if args.save and not (args.save_interval and
                                  trainer.state.iteration % args.save_interval == 0):
                trainer.save()
            sample = trainer.sample_text()
            if sample is not None:
                print_rank0("---- generated sample ----")
                print_rank0(sample)
                print_rank0("--------------------------")
        # Leave together: a rank that exits while its peer is still inside a gloo collective
        # makes the peer abort.
        dist.barrier()
        destroy_distributed()
        return 0
    except USER_ERRORS + (TrainingStopped,) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None and getattr(trainer, "metrics", None) is not None:
            trainer.metrics.close()
