"""The model runner's side of pipeline parallelism: what one stage does around its slice of the model each step.

Every stage builds the same flat batch from the same scheduler output (the schedulers of all ranks are in step).
A stage after the first receives the previous stage's :class:`IntermediateTensors` (a small description first —
names, shapes, dtypes — then the tensors, from the previous rank of its pipeline group); a stage before the last
sends its own to the next rank and samples nothing. The last stage samples. Its :class:`RunnerOutput` is then
broadcast from the output rank (global rank ``world_size - tensor_parallel_size``, the first rank of the last
stage) to every rank, and the other stages record the sampled tokens in their request states exactly as sampling
would have — tokens appended, ``n > 1`` requests forked — so the next step's inputs agree everywhere, and any rank
can hand the engine the step's output.

With one batch in flight, the stages take turns: each idles while the others run their layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagoda.distributed.parallel_state import get_pp_group, get_world_group
from pagoda.distributed.pipeline import IntermediateTensors, layer_partition, stage_layer_range

if TYPE_CHECKING:
    from pagoda.core.config import EngineConfig
    from pagoda.core.model_runner import ModelRunner, RunnerOutput
    from pagoda.models.interface import PagodaModel


def stage_num_layers(config: EngineConfig) -> int:
    """How many decoder layers (and KV caches) this rank's stage holds."""
    start, end = stage_layer_range(config.model.num_layers)
    return end - start


def check_pipeline_config(config: EngineConfig, model_cls: type[PagodaModel]) -> None:
    """Refuse, at configuration time, what pipeline parallelism can't run, naming the settings involved."""
    pp = config.parallel.pipeline_parallel_size
    if pp == 1:
        return
    mc = config.model
    arch = model_cls.__name__
    if mc.is_encoder_only or mc.task != "generate":
        raise ValueError(f"pipeline_parallel_size={pp}: pipeline parallelism runs text generation only; {arch} "
                         f"serves the {mc.task!r} task (use pipeline_parallel_size=1)")
    if not model_cls.supports_pp:
        raise ValueError(f"pipeline_parallel_size={pp}: the {arch} architecture can't be split into pipeline "
                         "stages (use pipeline_parallel_size=1)")
    if config.speculative_config is not None:
        raise ValueError(f"speculative_config and pipeline_parallel_size={pp} can't be combined: speculative "
                         "decoding runs with pipeline_parallel_size=1 only")
    if config.lora is not None:
        raise ValueError(f"enable_lora and pipeline_parallel_size={pp} can't be combined: LoRA adapters run with "
                         "pipeline_parallel_size=1 only")
    if pp > mc.num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} is larger than the model's {mc.num_layers} layers")
    layer_partition(mc.num_layers, pp)  # a bad VLLM_PP_LAYER_PARTITION is an error now, not in the workers


class PipelineStage:
    """This rank's place in the pipeline, and the hand-overs of a step (see the module docstring)."""

    def __init__(self, config: EngineConfig, runner: ModelRunner) -> None:
        self.runner = runner
        self.group = get_pp_group()
        self.is_first, self.is_last = self.group.is_first_rank, self.group.is_last_rank
        self.world = get_world_group()
        self.output_rank = config.parallel.output_rank
        self.device = runner.device

    def receive(self) -> IntermediateTensors | None:
        """The previous stage's tensors for this step (None on the first stage)."""
        if self.is_first:
            return None
        src = self.group.prev_rank
        layout = self.group.recv_object(src)
        return IntermediateTensors({name: self.group.recv(shape, dtype, src, self.device)
                                    for name, shape, dtype in layout})

    def send(self, tensors: IntermediateTensors) -> None:
        """Hand this stage's tensors to the next stage."""
        dst = self.group.next_rank
        self.group.send_object([(name, tuple(t.shape), t.dtype) for name, t in tensors.items()], dst)
        for tensor in tensors.tensors.values():
            self.group.send(tensor, dst)

    def share_output(self, out: RunnerOutput) -> RunnerOutput:
        """The last stage's output on every rank; stages that didn't sample record its tokens."""
        is_source = self.world.rank_in_group == self.output_rank
        out = self.world.broadcast_object(out if is_source else None, src=self.output_rank)
        if not self.is_last:
            self._record(out)
        return out

    def _record(self, out: RunnerOutput) -> None:
        """Apply the sampled tokens to the request states as the sampling stage did (forks included)."""
        runner = self.runner
        tokens: list[int] = []
        sample_states: list[Any] = []
        owners: list[Any] = []
        for request_id, sampled in out.sampled.items():
            state = runner.states[request_id]
            if len(sampled) != len(state.sampling):
                raise RuntimeError(f"pipeline stages disagree on request {request_id!r}: {len(sampled)} sampled "
                                   f"tokens for {len(state.sampling)} samples")
            for token, sampling in zip(sampled, state.sampling):
                tokens.append(token)
                sample_states.append(sampling)
                owners.append(state)
        if tokens:
            from pagoda.core.model_runner import RunnerOutput

            runner._record_samples(RunnerOutput(), tokens, None, sample_states, owners)
