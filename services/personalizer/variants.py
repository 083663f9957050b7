"""A/B prompt variants: named writing styles, assigned per contractor and follow-up type."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.errors import ConfigurationError


@dataclass(frozen=True)
class Variant:
    name: str
    style: str  # one instruction line added to the rules


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("standard", "Keep it to one or two short sentences."),
        Variant("brief", "Fit it in a single SMS segment: at most 160 characters."),
        Variant(
            "question",
            "End with one direct question the contractor can answer in a word or two.",
        ),
    )
}


class VariantPlan:
    """The variants in play and their weights (PROMPT_VARIANTS)."""

    def __init__(self, weighted: list[tuple[Variant, int]]) -> None:
        if not weighted:
            raise ConfigurationError("PROMPT_VARIANTS names no variant")
        self.weighted = weighted
        self.total = sum(weight for _, weight in weighted)

    @classmethod
    def parse(cls, text: str) -> VariantPlan:
        weighted: list[tuple[Variant, int]] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, _, weight = part.partition(":")
            variant = VARIANTS.get(name.strip())
            if variant is None:
                known = ", ".join(sorted(VARIANTS))
                raise ConfigurationError(
                    f"PROMPT_VARIANTS: unknown variant {name!r}; known: {known}"
                )
            if any(v.name == variant.name for v, _ in weighted):
                raise ConfigurationError(f"PROMPT_VARIANTS names {variant.name!r} twice")
            try:
                share = int(weight) if weight.strip() else 1
            except ValueError:
                share = 0
            if not 1 <= share <= 1000:
                raise ConfigurationError(
                    f"PROMPT_VARIANTS: weight of {variant.name!r} must be a whole number 1-1000"
                )
            weighted.append((variant, share))
        return cls(weighted)

    def assign(self, contractor_id: int, followup_type: str) -> Variant:
        """The same contractor and follow-up type always get the same variant (for a given
        PROMPT_VARIANTS), in every process: a stable hash, never Python's salted hash()."""
        digest = hashlib.sha256(f"{contractor_id}|{followup_type}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") % self.total
        for variant, weight in self.weighted[:-1]:
            if point < weight:
                return variant
            point -= weight
        return self.weighted[-1][0]

    def __str__(self) -> str:
        return ",".join(f"{variant.name}:{weight}" for variant, weight in self.weighted)
