"""The model side: loading, prompts, sampling, the decode loop, and the inference thread."""
