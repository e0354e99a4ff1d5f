"""Speculative-decoding counters, under vLLM's names: drafts verified, draft tokens, accepted draft tokens and
accepted tokens per draft position. The acceptance rate is accepted / draft tokens; the mean accepted length
(tokens a verification step yields, the bonus token included) is 1 + accepted / drafts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingStats:
    num_spec_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One request's verification: ``num_accepted`` of its ``num_draft_tokens`` drafts were accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        for pos in range(num_accepted):
            per_pos[pos] += 1

    def snapshot(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_spec_tokens, self.num_drafts, self.num_draft_tokens,
                                 self.num_accepted_tokens, list(self.num_accepted_tokens_per_pos))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def summary(self) -> str:
        per_pos = ", ".join(f"{n / self.num_drafts:.2f}" if self.num_drafts else "0" for n in
                            self.num_accepted_tokens_per_pos)
        return (f"speculative decoding: acceptance rate {100 * self.acceptance_rate:.1f}%, mean accepted length "
                f"{self.mean_acceptance_length:.2f}, {self.num_drafts} drafts, {self.num_draft_tokens} draft "
                f"tokens, {self.num_accepted_tokens} accepted; per position [{per_pos}]")
