"""Binding a pipeline rank: its process groups, stages, tied weights and gradient reducers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...ir.schedule import ActionKind
from ..batch import broadcast_tensors
from ..grad_sync import GradientReducer
from ..p2p import Transfers
from ..process_group import new_group, require_initialized
from ..program_base import materialize, shard_from_source

__all__ = ["StageSetup"]


class StageSetup:
    """Binds this rank's stages of a :class:`~whale.rewrite.program.DistributedProgram` (a part
    of :class:`PipelineProgram`); nothing here rewrites: the stages arrive cut and sharded."""

    def _local_stage(self, s: int) -> bool:
        return s in self._local

    def _require_bound(self) -> None:
        if not self._bound:
            require_initialized("the pipelined program")
            self._bind()

    def _local_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers (shards where split), by local-model name."""
        state = {}
        for s in self._local:
            state.update(self._modules[s].state_dict(keep_vars=True))
        return state

    def _share_updated_buffers(self) -> None:
        """Every replica takes the first replica's updated buffers (a collective in the data
        group; none where forward updates no buffer or there is one replica)."""
        if self.plan.dp_degree == 1 or not self._updated_buffers or not self.config.broadcast_buffers:
            return
        buffers = [self._modules[s].get_buffer(path) for s, path in self._updated_buffers]
        src = self.plan.data_group_of(dist.get_rank())[0]
        broadcast_tensors(buffers, src=src, group=self._data_group)

    def _peer(self, stage: int) -> int:
        """The rank running ``stage`` in this rank's pipeline, at this rank's tensor-parallel index."""
        peer = self._peers.get(stage)
        if peer is None:
            rank = dist.get_rank()
            ranks = self.plan.pipelines[self.plan.replica_of(rank)]
            k = self.plan.tensor_parallel
            peer = self._peers[stage] = ranks[(stage % self.plan.pipeline_degree) * k + ranks.index(rank) % k]
        return peer

    def _tie_local_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by name; a weight several local stages use is one tensor."""
        chosen: dict[str, nn.Parameter] = {}
        for s in sorted(self._local):
            module = self._modules[s]
            for path, name in self._param_paths[s].items():
                owner_path, _, attr = path.rpartition(".")
                owner = module.get_submodule(owner_path)
                if name in chosen:
                    setattr(owner, attr, chosen[name])
                else:
                    chosen[name] = getattr(owner, attr)
        return chosen

    def _bind(self) -> None:
        """Join the process groups: make every group the program names (collectively, in one
        order), bind them, materialize or move this rank's stages, make replicas and tied copies
        start equal, and hook their gradients."""
        info = self._join_world()
        plan = self.plan
        position = plan.position_of(info.rank)
        self._local = set(plan.stages_at(position))
        data_group = self._data_group = self._make_data_group(info.rank, info.device)
        tensor_groups = self._bind_tensor_groups()
        for stage in self.program.local_stages:
            s, module = stage.index, self._modules[stage.index]
            on_meta = any(t.is_meta for t in module.parameters())
            if on_meta:
                materialize(module, self._device, f"stage {s}")
            elif stage.sharded is not None:
                # Every rank of the group shards the same weights: those of its first rank.
                ranks = self.program.tensor_group.ranks
                shard_from_source(stage, ranks[0], tensor_groups[ranks])
            module.to(self._device)
        self._params = self._tie_local_parameters()
        self._tied = []
        for tied in self.program.tied:
            for ranks in tied.groups:
                group = new_group(list(ranks))
                if tied.name in self._params and info.rank in ranks:
                    self._tied.append((self._params[tied.name], group))
        tied_names = {t.name for t in self.program.tied}
        # Replicas of a position start from the first replica's weights; tied copies agree too.
        if plan.dp_degree > 1:
            mine = [t.data for t in self._local_state().values()]
            broadcast_tensors(mine, src=plan.data_group_of(info.rank)[0], group=data_group)
        for param, group in self._tied:
            broadcast_tensors([param.data], src=min(dist.get_process_group_ranks(group)), group=group)
        actions = self.schedule.actions[position]
        self._final_backward = {}
        last_at = {}
        for at, a in enumerate(actions):
            if a.kind is ActionKind.BACKWARD:
                self._final_backward[a.stage] = (a.stage, a.micro_batch)
                last_at[a.stage] = at
        self._reducers: dict[int, GradientReducer] = {}
        if plan.dp_degree > 1:
            self._start_zero({id(p): name for name, p in self._params.items()})  # Config.zero_stage
            # A parameter two local stages share is final after the later of their backwards.
            owner: dict[str, int] = {}
            for s in sorted(self._local, key=lambda s: last_at[s]):
                for name in self._param_paths[s].values():
                    owner[name] = s
            for s in sorted(self._local):
                params = [
                    p for name, p in self._params.items() if owner[name] == s and name not in tied_names
                ]
                if params:
                    self._reducers[s] = self._make_reducer(params, data_group, module=self._modules[s])
        # Buffers forward updates, by stage and path (the same on every replica of a position).
        self._updated_buffers = [(s, path) for s in sorted(self._local) for path in self.stages[s].updated_buffers]
        self._transfers = Transfers(self._device)
        self._peers: dict[int, int] = {}
        self._compile_actions(actions)
        self._bound = True
