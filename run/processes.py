"""How many processes train: one (OneProcess, below), or one per GPU under torchrun
(run/distributed.py's Distributed). Both have the same methods, so the training loop calls them
without asking which it has: with one process each is the identity, or does nothing.

    processes.share(micro_batches, n_targets)   this process's part of a step, and its divisor
    processes.mean(loss)                        the logged loss, averaged over the processes
    processes.sync_gradients(params)            torchrun's LoRA: average the adapters' gradients
"""
import os


def start_processes(device: str):
    """A run/distributed.Distributed when torchrun started this process (it sets RANK and
    WORLD_SIZE; the device is then this rank's GPU), else OneProcess on `device`.
    run/distributed.py is imported only then."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return OneProcess(device)
    from run.distributed import Distributed
    return Distributed()


class OneProcess:
    """The usual case: this process trains alone, on `device`."""
    rank = 0
    world = 1
    is_main = True  # the process that prints and writes the run directory

    def __init__(self, device: str | None = None):
        self.device = device

    def parallelize(self, model, shard: bool):
        pass

    def share(self, micro_batches: list, n_targets: int) -> tuple[list, int]:
        return micro_batches, n_targets

    def mean(self, value: float) -> float:
        return value

    def sync_gradients(self, params):
        pass

    def training_state(self, model, optimizer) -> tuple[dict, dict]:
        """The trainable weights (not the frozen base: the checkpoint of a LoRA run stays small)
        and AdamW's state, for checkpoint.pt."""
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in model.state_dict().items() if k in trainable}
        return weights, optimizer.state_dict()

    def load_training_state(self, model, optimizer, model_state: dict, optimizer_state: dict):
        model.load_state_dict(model_state, strict=False)
        optimizer.load_state_dict(optimizer_state)

    def rng_states(self, local: dict) -> list:
        return [local]

    def gather_model(self, model, optimizer, build):
        return model

    def close(self):
        pass

    def exit(self):
        pass


ONE_PROCESS = OneProcess()  # the default of functions that take `processes` (tests, bench)
