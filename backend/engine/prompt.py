"""From a conversation (text and images) to the tensors the model reads.

The chat template writes one `<|image_pad|>` per image; the image processor resizes each image within the
pixel bounds and cuts it into 14x14 patches; each 2x2 group of patches becomes one token, so the placeholder
is widened to that many `<|image_pad|>` tokens. This is what transformers' `Qwen2_5_VLProcessor` does; it is
done here because that class also insists on a video processor (torchvision), which serving never needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from backend.errors import InvalidImageError, InvalidRequestError
from backend.media.resize import PixelBounds, resize_for_model

IMAGE_PLACEHOLDER = "<|image_pad|>"
# Tokens that only the server may place: a user typing them would desynchronise images and placeholders.
RESERVED_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


@dataclass
class ChatTurn:
    """One message of the conversation: a role and its parts, each a text or a decoded image."""

    role: str
    parts: list[str | Image.Image]
    source: str = "messages"  # where the turn came from, for error messages ("messages[2]")
    # Where each image came from, for error messages ("messages[0].content[1]").
    image_sources: list[str] = field(default_factory=list)


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
    """Applies the chat template, tokenises, and runs the image processor for one model."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str,
        image_processor: Any | None,
        image_token_id: int | None,
        system_prompt: str = "",
    ) -> None:
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self._image_processor = image_processor
        self._image_token_id = image_token_id
        self._system_prompt = system_prompt
        self._merge_length = getattr(image_processor, "merge_size", 2) ** 2

    def template_messages(self, turns: list[ChatTurn]) -> tuple[list[dict], list[Image.Image], list[str]]:
        """The conversation as the chat template expects it, plus its images (and their sources) in order."""
        messages: list[dict] = []
        images: list[Image.Image] = []
        sources: list[str] = []
        if self._system_prompt and not any(turn.role == "system" for turn in turns):
            messages.append({"role": "system", "content": self._system_prompt})
        for turn in turns:
            content: list[dict] = []
            turn_images = iter(turn.image_sources)
            for part in turn.parts:
                if isinstance(part, str):
                    self._reject_reserved_tokens(part, turn.source)
                    content.append({"type": "text", "text": part})
                else:
                    if self._image_processor is None:
                        raise InvalidRequestError(
                            "This model reads text only; remove the image parts from the messages.",
                            param=next(turn_images, None),
                            code="images_not_supported",
                        )
                    content.append({"type": "image"})
                    images.append(part)
                    sources.append(next(turn_images, f"image {len(images)}"))
            only_text = all(item["type"] == "text" for item in content)
            messages.append(
                {"role": turn.role, "content": "".join(item["text"] for item in content) if only_text else content}
            )
        return messages, images, sources

    def build(self, turns: list[ChatTurn], bounds: PixelBounds) -> ModelInputs:
        """Tokenise the conversation and its images; ends with an open assistant turn."""
        messages, images, sources = self.template_messages(turns)
        text = self._tokenizer.apply_chat_template(
            messages, chat_template=self._chat_template, tokenize=False, add_generation_prompt=True
        )
        if not images:
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            return ModelInputs(input_ids=torch.tensor([ids], dtype=torch.long))

        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise InvalidRequestError(
                f"The chat template placed {len(pieces) - 1} image placeholders for {len(images)} images."
            )
        pixel_values, grid = self._process_images(images, sources, bounds)
        counts = [int(row.prod()) // self._merge_length for row in grid]
        expanded = pieces[0] + "".join(IMAGE_PLACEHOLDER * count + piece for count, piece in zip(counts, pieces[1:]))
        input_ids = torch.tensor([self._tokenizer(expanded, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        patch = getattr(self._image_processor, "patch_size", 14)
        return ModelInputs(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(input_ids == self._image_token_id).to(torch.int32),
            image_token_counts=counts,
            resized_image_sizes=[(int(row[2]) * patch, int(row[1]) * patch) for row in grid],
        )

    def _process_images(
        self, images: list[Image.Image], sources: list[str], bounds: PixelBounds
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize (Qwen2.5-VL's rule, see media/resize.py) and patch every image; a failure names its image."""
        pixel_values, grids = [], []
        for image, source in zip(images, sources):
            resized = resize_for_model(image, bounds, source)
            try:
                processed = self._image_processor(images=[resized], do_resize=False, return_tensors="pt")
            except ValueError as exc:
                raise InvalidImageError(
                    f"The image at {source} ({image.width}x{image.height}) cannot be used: {exc}",
                    param=source,
                    code="invalid_image",
                ) from exc
            pixel_values.append(processed["pixel_values"])
            grids.append(processed["image_grid_thw"])
        return torch.cat(pixel_values), torch.cat(grids)

    @staticmethod
    def _reject_reserved_tokens(text: str, source: str) -> None:
        for token in RESERVED_VISION_TOKENS:
            if token in text:
                raise InvalidRequestError(
                    f"The text of {source} contains the model's reserved token {token}; send images as "
                    "image_url parts.",
                    param=source,
                    code="reserved_token",
                )
