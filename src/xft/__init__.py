"""xft: upcycle a dense code LLM into a shared-expert MoE, instruction-tune it, merge it back."""

__version__ = "0.1.0"
