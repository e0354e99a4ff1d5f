"""``pagoda bench step-overhead``: what an engine step costs besides the model.

``--num-requests`` requests (64 by default, W1's shape) are admitted and prefilled; then every decode step with all
of them running is timed, and inside it the model's ``forward`` and LM head (``compute_logits``, or
``compute_greedy`` when every row is plain greedy) and the engine's stages
(scheduling, batch preparation, sampling, scheduler update, detokenization and output processing) are timed by
wrapping those methods on the live objects. The engine overhead of a step is the step's time minus the model's
(``forward`` + LM head). ``--cprofile`` also prints the functions where the time goes (the profiler
slows Python code several times over: read its figures as shares, not as costs).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import pstats
import time
from collections import defaultdict

import numpy as np

from pagoda.benchmarks.common import greedy_params, make_llm, summarize, write_json
from pagoda.benchmarks.datasets import random_requests

MODEL_STAGES = ("model.forward", "model.compute_logits", "model.compute_greedy")
FUSED = "fused."  # the phases of the fused decode step's layer loop (inside model.forward)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from pagoda.core.engine_args import EngineArgs

    parser.add_argument("--num-requests", type=int, default=64, help="requests running in every timed step")
    parser.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--num-steps", type=int, default=64, help="decode steps to time")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--output-kind", default="final_only", choices=("final_only", "delta", "cumulative"),
                        help="what each step emits: final_only as LLM.generate, delta as the streaming server")
    parser.add_argument("--cprofile", action="store_true", help="print the top functions of the timed steps")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")
    EngineArgs.add_cli_args(parser)


class StageTimer:
    """Accumulates wall time per named stage for the current step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, attr: str, name: str) -> None:
        """Replace ``owner.attr`` (a method or callable attribute) by a timed version of itself."""
        inner = getattr(owner, attr)
        current = self.current

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                current[name] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        values = dict(self.current)
        self.current.clear()
        return values


def instrument(engine) -> StageTimer:
    """Wrap the model and the engine's stages with timers (instance attributes: nothing global is patched)."""
    timer = StageTimer()
    runner = engine.runner
    timer.wrap(runner.model, "forward", "model.forward")
    timer.wrap(runner.model, "compute_logits", "model.compute_logits")
    timer.wrap(runner.model, "compute_greedy", "model.compute_greedy")  # all-greedy steps: argmax without logits
    timer.wrap(engine.scheduler, "schedule", "scheduler.schedule")
    timer.wrap(runner, "_update_states", "runner.update_states")
    timer.wrap(runner, "_build_batch", "runner.build_batch")
    timer.wrap(runner, "_build_decode_batch", "runner.build_batch")  # decode-only steps
    timer.wrap(runner, "sampler", "runner.sampler")
    timer.wrap(runner, "_record_samples", "runner.record_samples")
    timer.wrap(engine.scheduler, "update_from_output", "scheduler.update_from_output")
    timer.wrap(engine.output_processor, "process", "output_processor.process")
    return timer


def main(args: argparse.Namespace) -> dict:
    for name in ("num_requests", "input_len", "num_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(args, name)}")
    if getattr(args, "data_parallel_size", 1) != 1:
        raise ValueError(f"data_parallel_size: step-overhead times the step of one engine in this process, got "
                         f"{args.data_parallel_size}; run it with -dp 1")
    llm = make_llm(args)
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    # Enough output that nobody finishes during the timed steps (+ a few steps of prefill and warm-up).
    from pagoda.sampling_params import RequestOutputKind

    params = greedy_params(args.num_steps + 16, args.temperature)
    params.output_kind = RequestOutputKind[args.output_kind.upper()]
    for i, request in enumerate(random_requests(args.num_requests, args.input_len, 1, vocab_size=vocab,
                                                seed=(args.seed or 0) + 17)):
        engine.add_request(f"overhead-{i}", {"prompt_token_ids": request.prompt_token_ids}, params)
    # Prefill (possibly over several steps), then a few decode steps untimed.
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    if engine.scheduler.num_running != args.num_requests:
        raise RuntimeError(f"only {engine.scheduler.num_running} of {args.num_requests} requests are running; give "
                           "the KV cache more memory (--kv-cache-memory-bytes) or raise --max-num-seqs")
    timer = instrument(engine)
    # A platform's fused decode step may time the phases of its layer loop (the per-op path's ops are not timed).
    fused = getattr(engine.runner, "fused_decode", None)
    phases = fused if hasattr(fused, "take_phase_times") else None
    if phases is not None:
        phases.profile(True)
    profiler = cProfile.Profile() if args.cprofile else None
    steps, stages = [], defaultdict(list)
    for _ in range(args.num_steps):
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.disable()
        taken = timer.take()
        if phases is not None:
            taken.update({f"{FUSED}{name}": seconds for name, seconds in phases.take_phase_times().items()})
        for name in MODEL_STAGES:  # a step runs compute_logits or compute_greedy: count the other as 0
            taken.setdefault(name, 0.0)
        for name, value in taken.items():
            stages[name].append(value)
    model = np.sum([np.asarray(stages[name]) for name in MODEL_STAGES if name in stages], axis=0)
    overhead = np.asarray(steps) - model
    result = {"num_requests": args.num_requests, "num_steps": args.num_steps, "output_kind": args.output_kind,
              "step_ms": summarize(steps), "model_ms": summarize(model), "overhead_ms": summarize(overhead),
              "stages_ms": {name: summarize(values) for name, values in sorted(stages.items())}}
    print(f"Decode steps with {args.num_requests} running requests ({args.num_steps} timed, output kind "
          f"{args.output_kind}), median ms per step:")
    print(f"  {'step (total)':<34} {result['step_ms']['median']:9.3f}")
    print(f"  {'model (forward + logits)':<34} {result['model_ms']['median']:9.3f}")
    print(f"  {'engine overhead (step - model)':<34} {result['overhead_ms']['median']:9.3f}"
          f"   (mean {result['overhead_ms']['mean']:.3f}, p99 {result['overhead_ms']['p99']:.3f})")
    print("  of which, timed stages (median ms):")
    for name, values in result["stages_ms"].items():
        if name not in MODEL_STAGES and not name.startswith(FUSED):
            print(f"    {name:<32} {values['median']:9.3f}")
    if phases is not None:
        phases.profile(False)
        ran = [name for name in stages if name.startswith(FUSED) and max(stages[name]) > 0]  # the step's order
        if ran:
            print("  inside the model's fused decode step, all layers (median ms):")
            for name in ran:
                print(f"    {name[len(FUSED):]:<32} {result['stages_ms'][name]['median']:9.3f}")
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
        print(stream.getvalue())
    engine.abort_request([f"overhead-{i}" for i in range(args.num_requests)])
    write_json(args.output_json, result)
    return result
