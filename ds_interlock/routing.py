"""Which loss's gradient goes where (docs/algorithm.md), as plain integers.

Stage ``s`` owns loss ``L_s`` (an aux loss for s < S-1, the true loss for s = S-1).
``L_j`` flows back through stages ``j, j-1, ..., j-k+1``. A *component* is
``dL_j/dh`` for one loss ``j``; components stay separate on the wire because each
has its own remaining depth.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Routing:
    num_stages: int
    k: int
    combine: str = "furthest"

    def __post_init__(self) -> None:
        if self.num_stages < 1 or not 1 <= self.k <= self.num_stages:
            raise ValueError(f"need 1 <= k <= S, got k={self.k}, S={self.num_stages}")
        if self.combine not in ("furthest", "sum"):
            raise ValueError(f"unknown combine {self.combine!r}")

    @property
    def last(self) -> int:
        return self.num_stages - 1

    @property
    def needs_aux_heads(self) -> bool:
        """Every stage but the last needs its head, except for k = S with "furthest" (ordinary
        backprop), where heads are optional probes."""
        return not self.heads_are_probes

    @property
    def heads_are_probes(self) -> bool:
        """k = S with "furthest": no head's gradient reaches the trunk; heads only observe it, and
        the trunk must train exactly as it would without them (clipping norms leave them out)."""
        return self.k >= self.num_stages and self.combine == "furthest"

    def reaching(self, s: int) -> list[int]:
        """Losses whose gradient flows through stage s by definition."""
        return list(range(s, min(s + self.k - 1, self.last) + 1))

    def trains(self, s: int) -> list[int]:
        """Losses whose gradients update stage s's own parameters, J(s)."""
        if self.combine == "furthest":
            return [min(s + self.k - 1, self.last)]
        return self.reaching(s)

    def sends(self, s: int) -> list[int]:
        """Components stage s sends to stage s-1 (dL_j/dh_{s-1}), in increasing j.

        L_j continues past stage s iff its depth is not used up (j <= s+k-2).
        Under "furthest" it is only worth sending on its way to the one stage it
        trains, j-k+1, so losses with j < k-1 (which train no stage) never travel.
        """
        if s == 0:
            return []
        lo = max(s, self.k - 1) if self.combine == "furthest" else s
        return list(range(lo, min(s + self.k - 2, self.last) + 1))

    def receives(self, s: int) -> list[int]:
        """Components stage s receives from stage s+1."""
        return self.sends(s + 1) if s < self.last else []

    def needs(self, s: int) -> list[int]:
        """Components stage s must hold at its output: to train itself or to pass on."""
        return sorted(set(self.trains(s)) | set(self.sends(s)))

    def needs_own_loss_grad(self, s: int) -> bool:
        """Whether stage s's own loss must be back-propagated into the stage itself."""
        return s in self.needs(s)

    def fused_input(self, s: int) -> int | None:
        """The component whose input-gradient chain can ride along with the weight chain.

        When exactly one loss trains the stage and that same component travels on,
        one backward call yields both the weight gradient and the input gradient,
        which is what plain backprop does (k = S costs no more than 1F1B).
        """
        t = self.trains(s)
        if len(t) == 1 and t[0] in self.sends(s):
            return t[0]
        return None

    def input_chains(self, s: int) -> list[int]:
        """Components that need an input-gradient chain of their own at stage s."""
        fused = self.fused_input(s)
        return [j for j in self.sends(s) if j != fused]

    def loss_weight(self, j: int, aux_loss_weight: float) -> float:
        return 1.0 if j == self.last else aux_loss_weight
