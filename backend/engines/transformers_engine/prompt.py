"""From a rendered conversation to the tensors the transformers model reads.

`ChatPromptRenderer` (engines/chat_prompt.py) templates and tokenises the conversation and resizes its images,
the same way for every engine. Here the image processor cuts each resized image into 14x14 patches, and each
image's one `<|image_pad|>` is widened to its tokens (a 2x2 group of patches each). This is what transformers'
`Qwen2_5_VLProcessor` does; it is done here because that class also insists on a video processor
(torchvision), which serving never needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from backend.engines.chat_prompt import ChatPromptRenderer, TokenPrompt
from backend.engines.requests import ChatTurn
from backend.errors import InvalidImageError
from backend.media.resize import PixelBounds

__all__ = ["ChatTurn", "ModelInputs", "PromptBuilder"]


@dataclass
class ModelInputs:
    """Everything the model needs for one prompt (on CPU; the generator moves it to the device)."""

    input_ids: torch.Tensor  # [1, prompt_tokens]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # [images, 3]: temporal, height, width in patches
    mm_token_type_ids: torch.Tensor | None = None  # [1, prompt_tokens]: 1 where an image token stands
    image_token_counts: list[int] = field(default_factory=list)
    resized_image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt, image tokens included."""
        return int(self.input_ids.shape[-1])


class PromptBuilder:
    """Renders a conversation (`ChatPromptRenderer`) and makes the model's tensors from it."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str,
        image_processor: Any | None,
        image_token_id: int | None,
        system_prompt: str = "",
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.renderer = ChatPromptRenderer(
            tokenizer,
            chat_template,
            image_token_id if image_processor is not None else None,
            system_prompt=system_prompt,
            max_prompt_tokens=max_prompt_tokens,
        )
        self._image_processor = image_processor
        self._image_token_id = image_token_id

    def build(self, turns: list[ChatTurn], bounds: PixelBounds) -> ModelInputs:
        """Tokenise the conversation and its images; ends with an open assistant turn."""
        prompt = self.renderer.render(turns, bounds)
        if not prompt.images:
            return ModelInputs(input_ids=torch.tensor([prompt.token_ids], dtype=torch.long))
        pixel_values, grid = self._process_images(prompt)
        counts = iter(prompt.image_token_counts)
        ids: list[int] = []
        for token in prompt.token_ids:  # each image's one placeholder becomes as many as the image has tokens
            ids += [token] * next(counts) if token == self._image_token_id else [token]
        input_ids = torch.tensor([ids], dtype=torch.long)
        return ModelInputs(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(input_ids == self._image_token_id).to(torch.int32),
            image_token_counts=prompt.image_token_counts,
            resized_image_sizes=prompt.resized_image_sizes,
        )

    def build_raw(self, prompt: str | list[int]) -> ModelInputs:
        """A legacy completion's prompt (text only) as input ids."""
        return ModelInputs(input_ids=torch.tensor([self.renderer.raw_prompt(prompt).token_ids], dtype=torch.long))

    def _process_images(self, prompt: TokenPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch every (already resized) image; a failure names its image."""
        pixel_values, grids = [], []
        for image, source in zip(prompt.images, prompt.image_sources):
            try:
                processed = self._image_processor(images=[image], do_resize=False, return_tensors="pt")
            except ValueError as exc:
                raise InvalidImageError(
                    f"The image at {source} ({image.width}x{image.height}) cannot be used: {exc}",
                    param=source,
                    code="invalid_image",
                ) from exc
            pixel_values.append(processed["pixel_values"])
            grids.append(processed["image_grid_thw"])
        return torch.cat(pixel_values), torch.cat(grids)
