"""The running batch: sequences of different lengths decoding together, one forward pass per step.

Arriving sequences are prefilled (text prompts that arrive together in one pass, image prompts alone), then
join the batch between two decode steps (iteration-level, or "continuous", batching). The batch keeps one KV
cache whose rows are left-padded to a common length, an attention mask that hides the padding, and each row's
own rotary position. A sequence that ends leaves at
once; padding columns no row needs any more are trimmed.

Why this design (measured with scripts/bench.py, docs/benchmarks.md): transformers' own continuous batching
does not serve Qwen2.5-VL (`transformers serve --continuous-batching` logs "Qwen2_5_VLForConditionalGeneration
does not support continuous batching. Falling back to sequential generation." and stays at ~50-60 tokens/s
from 1 to 32 clients on the 2-core CPU), and a static batch (wait until the whole batch ends) holds short
answers hostage to long ones. Here, at 32 clients, the same load gets ~8x the tokens/s of `transformers serve`.
Padding costs little: chat prompts are short next to the cache of a long answer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from backend.engines.transformers_engine.generation import SequenceState
from backend.engines.transformers_engine.loader import LoadedModel


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Pad `tensor` with zeros at the start of `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """Sequences decoding together; `rows[i]` owns row i of the cache, the mask and the next tokens."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.rows: list[SequenceState] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]: 1 = real token, 0 = padding
        self.next_tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_length(self) -> int:
        """Columns in the KV cache (the longest sequence plus padding)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, rows: list[SequenceState], cache: DynamicCache, mask: torch.Tensor, first_tokens: list[int]) -> None:
        """Join prefilled sequences (rows of `cache` and `mask`) whose next inputs are `first_tokens`.

        Layer by layer, so that at most one layer exists twice at a time (the KV cache may fill the GPU). If
        growing fails part-way (out of memory), the layers already grown are put back as views of their old
        rows, which allocates nothing, and the running batch is exactly as it was.
        """
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            old_rows, old_width = len(self.rows), self.cache_length
            width = max(old_width, int(mask.shape[1]))
            try:
                for mine, theirs in zip(self.cache.layers, cache.layers):
                    mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
                    mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
                self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
            except BaseException:
                for layer in self.cache.layers:
                    if layer.keys.shape[0] != old_rows:  # grown before the failure
                        layer.keys = layer.keys[:old_rows, :, width - old_width :]
                    if layer.values.shape[0] != old_rows:
                        layer.values = layer.values[:old_rows, :, width - old_width :]
                raise
        self.rows.extend(rows)
        self.next_tokens.extend(first_tokens)

    def remove(self, indexes: list[int]) -> None:
        """Drop finished rows, then the padding columns no remaining row uses (layer by layer, in place).

        If shrinking fails part-way the cache is inconsistent: the caller must fail the remaining rows and
        `clear` the batch (the scheduler does).
        """
        if not indexes:
            return
        gone = set(indexes)
        keep = [index for index in range(len(self.rows)) if index not in gone]
        if not keep:
            self.clear()
            return
        selector = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        mask = self.mask.index_select(0, selector)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, selector)[:, :, start:]
            layer.values = layer.values.index_select(0, selector)[:, :, start:]
        self.mask = mask[:, start:]
        self.rows = [self.rows[index] for index in keep]
        self.next_tokens = [self.next_tokens[index] for index in keep]

    def clear(self) -> None:
        """Forget every row and the cache (the rows' clients must already have been answered)."""
        self.rows, self.next_tokens = [], []
        self.cache = self.mask = None

    def step(self) -> torch.Tensor:
        """One decode step for every row: feed each row's next token, return the logits `[rows, vocab]`."""
        device = self.loaded.device
        tokens = torch.tensor(self.next_tokens, dtype=torch.long, device=device).view(-1, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = torch.tensor([row.next_position for row in self.rows], dtype=torch.long, device=device)
        if self.loaded.accepts_images:  # 3-D rotary positions: the same index on all three axes
            positions = positions.view(1, -1, 1).expand(3, -1, 1)
        else:
            positions = positions.view(-1, 1)
        output = self.loaded.model(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        for row in self.rows:
            row.next_position += 1
        return output.logits[:, -1]
