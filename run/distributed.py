"""Data-parallel training under torchrun, with PyTorch's FSDP2: the only file that knows about it.

    torchrun --nproc_per_node=2 train_sft.py --checkpoint DIR --data alpaca.json

Full fine-tuning: every rank (one process per GPU, or per CPU process with gloo) holds 1/world of
each parameter, gradient and AdamW moment. `fully_shard` on each block makes FSDP gather a block's
weights just before the block runs and free them right after, and reduce-scatter its gradients
in backward. LoRA: every rank holds the whole model and the adapters' gradients are averaged.
The training loop stays the same; it only deals each optimizer step's micro-batches out across
ranks (`share`), averages the logged loss over them (`mean`), and at the end rank 0 writes the
results from an unsharded copy of the model (`gather_model`).

train_sft.py imports this module only when torchrun started it (RANK/WORLD_SIZE are set: see
run/processes.py, whose OneProcess has the same methods for a run without torchrun).
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method


class Distributed:
    averages_gradients = False  # LoRA: sync_gradients averages them (FSDP does it itself)

    def __init__(self):
        cuda = torch.cuda.is_available()
        self.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=torch.device(self.device))
        else:
            dist.init_process_group("gloo")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def parallelize(self, model, shard: bool):
        """shard=True (full fine-tuning): FSDP2 shards every weight, gradient and AdamW moment
        (an 8B model's 16 bytes a parameter do not fit one GPU). One FSDP unit per block, plus
        the root (embedding, final norm, head); parameters keep their dtypes and autocast does
        the compute casts, exactly as in a single-GPU run. FSDP reduces the gradients itself.

        shard=False (LoRA, QLoRA): every rank keeps the whole model, as on one GPU (the frozen
        base fits), and `sync_gradients` averages the adapters' gradients once a step.
        Sharding the base instead would mean gathering all of it over the network twice a step
        (forward and backward) to save memory a LoRA run rarely needs: half the speed on 2 GPUs."""
        if not shard:
            self.averages_gradients = True
            return
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        register_fsdp_forward_method(model, "loss")  # training calls model.loss, not model(...)

    def sync_gradients(self, params):
        """LoRA: every rank's gradients → their mean, on every rank (one all-reduce of all of
        them). Full fine-tuning: nothing (FSDP reduced them in backward)."""
        if not self.averages_gradients:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten().float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))

    def share(self, micro_batches: list, n_targets: int) -> tuple[list, float]:
        """This rank's part of an optimizer step (every world-th micro-batch, from its rank on),
        and what to divide its summed loss by. A single process divides by n_targets, the target
        tokens of the whole step. FSDP averages the ranks' gradients, so each rank divides by
        n_targets / world instead: the average of the ranks' Σ loss_r / (n_targets / world) is
        Σ over all ranks / n_targets, the gradient one process computes over the same batches."""
        return micro_batches[self.rank::self.world], n_targets / self.world

    def mean(self, value: float) -> float:
        """The average of a number over the ranks (the logged loss: see share)."""
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def training_state(self, model, optimizer) -> tuple[dict, dict]:
        """Trainable weights and AdamW state gathered whole (on rank 0, in CPU memory), keyed by
        parameter name, so a checkpoint does not depend on how many ranks wrote it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=True)
        return get_state_dict(model, optimizer, options=options)

    def load_training_state(self, model, optimizer, model_state: dict, optimizer_state: dict):
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state, options=options)

    def gather_model(self, model, optimizer, build):
        """On rank 0, a plain (unsharded, CPU) copy of the trained model, built by `build()` and
        given the gathered weights; None on the other ranks. Closes the process group."""
        trained, _ = self.training_state(model, optimizer)
        self.close()
        if not self.is_main:
            return None
        copy = build()
        copy.load_state_dict(trained, strict=False)
        return copy

    def rng_states(self, local: dict) -> list:
        """Every rank's RNG state (dropout differs per rank), gathered so rank 0 can save them."""
        states = [None] * self.world
        dist.all_gather_object(states, local)
        return states

    def close(self):
        dist.barrier()  # nobody hangs up while another rank still reads its last message
        dist.destroy_process_group()

    @staticmethod
    def exit():
        """End the process here, once everything is written. The interpreter's own teardown can
        abort (SIGABRT, "terminate called without an active exception") while it destroys the
        communication threads that FSDP's device mesh still holds: seen here about one run in five
        with gloo, after a run that had done everything right. Skipping that teardown loses nothing:
        files are written atomically and the output is flushed first."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
