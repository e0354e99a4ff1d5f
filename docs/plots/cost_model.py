"""A first-order cost model of tensor, pipeline and data parallel inference (docs/distributed.md, "Cost model").

Per engine step, each rank of a stage pays
- streaming its share of the weights (and the KV cache it reads) from memory: bytes / memory bandwidth,
- or the matmul FLOPs, whichever is longer (a step is memory-bound or compute-bound; no overlap assumed),
- two all-reduces per layer over its tensor-parallel group, of tokens × hidden × dtype bytes each, as a ring:
  2(n−1)/n × bytes / bus bandwidth + a latency term (NCCL's convention: nccl-tests' PERFORMANCE.md),
- and per stage boundary one send of the activations (tokens × hidden × dtype bytes).
A pipeline of ``pp`` stages runs ``m`` micro-batches in (m + pp − 1) stage times: the bubble is
(pp − 1) / (m + pp − 1). Data-parallel replicas run side by side on their own share of the batch.

Run ``python docs/plots/cost_model.py`` for the tables of docs/distributed.md; every input is a named constant
below, with its source there.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied_embeddings: bool
    dtype_bytes: int = 2  # bf16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_params(self) -> int:
        """Weights of a Llama-style decoder: attention (q, k, v, o), SwiGLU MLP (gate, up, down), two RMSNorms
        per layer, embeddings (and an untied LM head), the final norm."""
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * self.hidden * 2 + self.hidden * kv * 2
        mlp = 3 * self.hidden * self.ffn
        per_layer = attention + mlp + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_bw: float  # bytes/s a rank streams from its memory
    flops: float  # sustained matmul FLOP/s of a rank (peak × the utilisation assumed)
    intra_busbw: float  # all-reduce bus bandwidth within a node, bytes/s
    intra_latency: float  # seconds per all-reduce within a node (small messages)
    inter_busbw: float  # all-reduce bus bandwidth of a group spanning nodes, bytes/s (per-GPU NIC bound)
    inter_latency: float  # seconds per all-reduce across nodes
    p2p_bw: float  # bytes/s of a point-to-point send between pipeline stages on different nodes
    p2p_latency: float
    ranks_per_node: int
    shared_node: bool = False  # ranks of a node share its memory bandwidth and FLOPs (a CPU), not each their own


LLAMA3_70B = Model("Llama-3-70B", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, vocab=128256,
                   tied_embeddings=False)
SMOLLM2_135M = Model("SmolLM2-135M", layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152,
                     tied_embeddings=True)

GB = 1e9
H100_2X8 = Hardware(
    "2 × 8 H100 SXM", memory_bw=3.35e12, flops=989e12 * 0.5,  # HBM3 3.35 TB/s; dense bf16 989 TFLOPS at 50 %
    intra_busbw=400 * GB, intra_latency=10e-6,  # NVLink 4 via NVSwitch: NCCL bus bandwidth ≈ 360–480 GB/s
    inter_busbw=50 * GB, inter_latency=30e-6,  # one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s each way
    p2p_bw=50 * GB, p2p_latency=10e-6, ranks_per_node=8)
CPU_2CORE = Hardware(
    "this 2-core CPU (gloo)", memory_bw=23 * GB, flops=270e9,  # docs/benchmarks.md: ≈ 23 GB/s; W1 ≈ 1000 tok/s
    intra_busbw=1.6 * GB, intra_latency=350e-6,  # guide: [64,576] bf16 all-reduce ≈ 350 µs, [512,576] ≈ 718 µs
    inter_busbw=1.6 * GB, inter_latency=350e-6, p2p_bw=1.6 * GB, p2p_latency=350e-6, ranks_per_node=2,
    shared_node=True)


def ring_allreduce_s(nbytes: float, ranks: int, busbw: float, latency: float) -> float:
    """Time of one ring all-reduce: 2(n−1)/n × bytes / bus bandwidth + latency (0 on one rank)."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / busbw + latency


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Share of a pipeline's time its stages sit idle filling and draining: (pp − 1) / (m + pp − 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


@dataclass
class Step:
    """One engine step of a whole batch: times in seconds (per stage where it says so) and the throughput."""

    weights_s: float  # per stage, per micro-batch
    kv_s: float
    compute_s: float
    allreduce_s: float  # per stage, per micro-batch
    p2p_s: float
    micro_batches: int
    bubble: float
    step_s: float  # the whole batch through every stage
    tokens_per_s: float


def step(model: Model, hw: Hardware, tp: int, pp: int = 1, dp: int = 1, batch: int = 1, new_tokens: int = 1,
         context: int = 0) -> Step:
    """The cost of one step in which each of ``batch`` sequences runs ``new_tokens`` tokens (1: a decode step;
    the prompt length: a prefill) after ``context`` cached tokens, on ``dp`` replicas of ``tp × pp`` ranks.

    Each replica takes batch / dp sequences and splits them into ``m`` = pp micro-batches (1 for a single
    sequence), as vLLM keeps pp batches in flight."""
    active = min(dp, batch)  # a single sequence keeps one replica busy, the others idle
    if batch % active:
        raise ValueError(f"batch: {batch} sequences don't split evenly over dp={dp} replicas")
    per_replica = batch // active
    micro = pp if per_replica >= pp and per_replica % pp == 0 else 1
    seqs = per_replica // micro  # sequences in one micro-batch
    tokens = seqs * new_tokens
    world = tp * pp * dp
    share = world if hw.shared_node else 1  # on a CPU every rank (thread share) gets 1/world of the node
    memory_bw, flops = hw.memory_bw / share, hw.flops / share
    params = model.num_params()
    weights_s = params * model.dtype_bytes / (tp * pp) / memory_bw
    kv_replicas = max(1, tp // model.kv_heads)  # beyond one KV head per rank the heads are replicated
    kv_s = seqs * (context + new_tokens) * model.kv_bytes_per_token() * kv_replicas / (tp * pp) / memory_bw
    compute_s = 2 * params / (tp * pp) * tokens / flops
    spans_nodes = tp > hw.ranks_per_node
    busbw, latency = (hw.inter_busbw, hw.inter_latency) if spans_nodes else (hw.intra_busbw, hw.intra_latency)
    activation_bytes = tokens * model.hidden * model.dtype_bytes
    allreduce_s = (model.layers / pp) * 2 * ring_allreduce_s(activation_bytes, tp, busbw, latency)
    p2p_s = activation_bytes / hw.p2p_bw + hw.p2p_latency if pp > 1 else 0.0
    stage_s = max(weights_s + kv_s, compute_s) + allreduce_s + p2p_s
    step_s = (micro + pp - 1) * stage_s
    return Step(weights_s, kv_s, compute_s, allreduce_s, p2p_s, micro, pipeline_bubble(pp, micro), step_s,
                batch * new_tokens / step_s)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def table(model: Model, hw: Hardware, configs: list[tuple[str, int, int, int]], batches: list[int],
          prompt_len: int, context: int) -> str:
    rows = ["| config | phase | batch | weights+KV ms | compute ms | all-reduce ms | p2p ms | bubble | step ms "
            "| tokens/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for phase, new_tokens, ctx in (("decode", 1, context), ("prefill", prompt_len, 0)):
        for batch in batches:
            for label, tp, pp, dp in configs:
                s = step(model, hw, tp, pp, dp, batch, new_tokens, ctx)
                rows.append(f"| {label} | {phase} | {batch} | {_ms(s.weights_s + s.kv_s)} | {_ms(s.compute_s)} | "
                            f"{_ms(s.allreduce_s)} | {_ms(s.p2p_s)} | {s.bubble:.0%} | {_ms(s.step_s)} | "
                            f"{s.tokens_per_s:,.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=1024, help="tokens per prompt in the prefill rows")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per sequence in the decode rows")
    args = parser.parse_args()
    print(f"{LLAMA3_70B.name}: {LLAMA3_70B.num_params() / 1e9:.2f} B parameters, "
          f"{LLAMA3_70B.num_params() * 2 / 1e9:.1f} GB in bf16; on {H100_2X8.name}\n")
    print(table(LLAMA3_70B, H100_2X8, [("TP=16", 16, 1, 1), ("TP=8 × PP=2", 8, 2, 1), ("TP=8 × DP=2", 8, 1, 2)],
                [1, 64], args.prompt_len, args.context))
    print(f"\n{SMOLLM2_135M.name}: {SMOLLM2_135M.num_params() / 1e6:.1f} M parameters; on {CPU_2CORE.name}\n")
    print(table(SMOLLM2_135M, CPU_2CORE, [("TP=1", 1, 1, 1), ("TP=2", 2, 1, 1), ("DP=2", 1, 1, 2)], [1, 64],
                128, 128))


if __name__ == "__main__":
    main()
