"""``ldjax reproduce``: the paper's claims in one command, checked by the program (claims table)."""

from ldjax.reproduce.claims import CLAIMS, Claim, claims_markdown, evaluate_claims, measure, repeated_ngram_share

__all__ = ["CLAIMS", "Claim", "claims_markdown", "evaluate_claims", "measure", "repeated_ngram_share"]
