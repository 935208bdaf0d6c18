"""The transformers engine: loading, prompts, sampling, the decode loop, continuous batching, and the one
inference thread. Runs wherever transformers runs (CPU included), on any architecture it has."""
