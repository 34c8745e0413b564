"""`fastlm train --fsdp`: parameters, gradients and optimizer state sharded across the ranks with
PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`, torch >= 2.6), for models whose training state
does not fit one device.

Each block is one FSDP unit (its weights gathered for its forward/backward only), the whole model the
root unit. Checkpoints stay the single-process format: the weights are gathered into a full CPU model
on rank 0 and the optimizer state into the usual `optimizer.state_dict()` layout (parameters numbered
in the optimizer's order), so a run saved with --fsdp resumes without it, on any number of ranks, and
the other way round.
"""
import torch


def _fsdp_api():
    try:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_optimizer_state_dict)
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(f"fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                         f"{torch.__version__}: upgrade torch or train without --fsdp") from None
    return fully_shard, StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict


def shard_model(model):
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("fsdp shards the model across the ranks of a torchrun launch: start the run with "
                         "`torchrun --nproc-per-node N -m fastlm train --fsdp ...`")
    fully_shard = _fsdp_api()[0]
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def gather_model(model, is_main):
    """A plain CPU copy of a sharded model on rank 0 (None elsewhere); all ranks must call it."""
    from fastlm.model import Transformer

    _, options, get_model_state_dict, _, _ = _fsdp_api()
    state = get_model_state_dict(model, options=options(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    with torch.device("meta"):
        full = Transformer(model.config)
    full.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        full.lm_head.weight = full.tok_emb.weight
    if full.rotary is not None:
        full.rotary.reset(torch.device("cpu"))
    return full


class OptimizerState:
    """The optimizer's state in the single-process layout, read from and loaded into a plain, DDP or
    FSDP-sharded model's optimizer."""

    def __init__(self, model, optimizer, fsdp):
        self.model, self.optimizer, self.fsdp = model, optimizer, fsdp

    def _names(self):
        """Parameter names in the optimizer's numbering (group by group)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def full_state(self):
        """optimizer.state_dict() of the unsharded run (with fsdp: all ranks must call it, rank 0 gets it)."""
        if not self.fsdp:
            return self.optimizer.state_dict()
        _, options, _, get_optimizer_state_dict, _ = _fsdp_api()
        by_name = get_optimizer_state_dict(self.model, self.optimizer,
                                           options=options(full_state_dict=True, cpu_offload=True))
        if "param_groups" not in by_name:  # cpu_offload: only rank 0 receives the full state
            return None
        index = {name: i for i, name in enumerate(self._names())}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
        return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}

    def load(self, state):
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            return
        _, options, _, _, set_optimizer_state_dict = _fsdp_api()
        names = self._names()
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
        by_name = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(self.model, self.optimizer, by_name,
                                 options=options(full_state_dict=True, broadcast_from_rank0=False))
