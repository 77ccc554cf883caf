"""Speculative decoding's counters and timings (engine/spec_decode.py keeps one `SpecStats` per engine)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecStats:
    steps: int = 0  # speculative verification passes
    proposed: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens emitted by verification passes (accepted + one per sequence-step)
    seq_steps: int = 0  # (sequence, verification) pairs
    shrunk: int = 0  # sequence-steps that ran with a smaller g than asked (memory or token budget)
    chose_plain: int = 0  # adaptive: sequence-steps for which plain decoding was predicted faster
    rejections: int = 0  # sequence-steps that ended at a rejected draft (the others accepted every draft)
    folded: int = 0  # one-token decode rows with g = 0 that rode in a verification pass
    draft_s: float = 0.0  # seconds in the draft's proposal passes (catch-up prefill excluded)
    draft_passes: int = 0
    verify_s: float = 0.0  # seconds in verification passes
    plain_s: float = 0.0  # seconds in steps that only decoded plainly (no prefill, no speculation)
    plain_steps: int = 0

    @property
    def token_acceptance(self) -> float:
        """The per-token acceptance rate: kept drafts over kept drafts plus first rejections (drafts after a
        rejection are never tested, so accepted / proposed reads low)."""
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else 0.0

    def costs(self, plain_step_s: float | None = None) -> tuple[float, float]:
        """(draft pass, verification pass) in plain decode steps over the run: against `plain_step_s` if given,
        else this run's plain steps; with neither, against a verification pass (verification cost 1)."""
        if not (self.draft_passes and self.steps):
            return 0.0, 1.0
        draft, verify = self.draft_s / self.draft_passes, self.verify_s / self.steps
        plain = plain_step_s or (self.plain_s / self.plain_steps if self.plain_steps else verify)
        return draft / plain, verify / plain

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_seq_step(self) -> float:
        """Tokens a sequence gains per target pass (1.0 without speculation)."""
        return self.emitted / self.seq_steps if self.seq_steps else 0.0

    def as_dict(self) -> dict:
        return {"spec_steps": self.steps, "spec_proposed": self.proposed, "spec_accepted": self.accepted,
                "spec_emitted": self.emitted, "spec_seq_steps": self.seq_steps, "spec_shrunk": self.shrunk,
                "spec_chose_plain": self.chose_plain, "spec_folded_plain": self.folded, "token_acceptance": self.token_acceptance,
                "draft_cost": self.costs()[0], "verify_cost": self.costs()[1],
                "acceptance_rate": self.acceptance_rate, "tokens_per_seq_step": self.tokens_per_seq_step}
