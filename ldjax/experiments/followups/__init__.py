"""The follow-up analyses: gradient entanglement, likelihood displacement (CHES) and lazy
likelihood displacement in GRPO, in the same decomposition (``ldjax reproduce followups``)."""
