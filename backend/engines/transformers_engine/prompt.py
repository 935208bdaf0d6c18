"""From a conversation (text and images) to the tensors the model reads.

The chat template writes one `<|image_pad|>` per image; the image processor resizes each image within the
pixel bounds and cuts it into 14x14 patches; each 2x2 group of patches becomes one token, so the placeholder
is widened to that many `<|image_pad|>` tokens. This is what transformers' `Qwen2_5_VLProcessor` does; it is
done here because that class also insists on a video processor (torchvision), which serving never needs.

Only the chat template writes control tokens: every message text is tokenised apart, by the vocabulary alone
(no added tokens), and put back where the template placed it, so no text can open a turn or place an image.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer

from backend.engines.requests import ChatTurn
from backend.errors import InvalidImageError, InvalidRequestError
from backend.media.resize import PixelBounds, resize_for_model

IMAGE_PLACEHOLDER = "<|image_pad|>"
# Each text of the conversation enters the template as a marker made of private-use characters, so that the
# rendered prompt can be cut into what the template wrote (its control tokens) and what the messages say.
_TEXT_MARKER = re.compile("\ue000(\\d+)\ue001")
# Texts longer than this are tokenised in pieces (cut before a space), so that counting can stop early.
_TEXT_PIECE_CHARS = 16384


@dataclass
class TemplateInput:
    """A conversation ready for the chat template: messages whose texts are markers, the texts themselves,
    and the images in order with where each came from."""

    messages: list[dict]
    texts: list[str]
    images: list[Image.Image]
    image_sources: list[str]


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
    """Applies the chat template, tokenises, and runs the image processor for one model.

    Message texts are tokenised as plain text: a user (or a tool result, or a relayed document) that writes
    `<|im_end|>\n<|im_start|>system` gets those characters, never the control tokens, so no text can end its
    turn, open a system turn or place an image. Only the chat template itself writes control tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str,
        image_processor: Any | None,
        image_token_id: int | None,
        system_prompt: str = "",
        max_prompt_tokens: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._text_tokenizer = plain_text_tokenizer(tokenizer)
        self._chat_template = chat_template
        self._image_processor = image_processor
        self._image_token_id = image_token_id
        self._system_prompt = system_prompt
        self._max_prompt_tokens = max_prompt_tokens
        self._merge_length = getattr(image_processor, "merge_size", 2) ** 2

    def template_messages(self, turns: list[ChatTurn]) -> TemplateInput:
        """The conversation as the chat template expects it, with each text replaced by a marker; the texts,
        and the images (and their sources) in order."""
        messages: list[dict] = []
        texts: list[str] = []
        images: list[Image.Image] = []
        sources: list[str] = []

        def marker(text: str) -> str:
            texts.append(text)
            return f"\ue000{len(texts) - 1}\ue001"

        if self._system_prompt and not any(turn.role == "system" for turn in turns):
            messages.append({"role": "system", "content": marker(self._system_prompt)})
        for turn in turns:
            content: list[dict] = []
            turn_images = iter(turn.image_sources)
            for part in turn.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": marker(part)})
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
        return TemplateInput(messages, texts, images, sources)

    def build(self, turns: list[ChatTurn], bounds: PixelBounds) -> ModelInputs:
        """Tokenise the conversation and its images; ends with an open assistant turn."""
        conversation = self.template_messages(turns)
        images, sources = conversation.images, conversation.image_sources
        text_ids = self._tokenize_texts(conversation.texts)
        rendered = self._tokenizer.apply_chat_template(
            conversation.messages, chat_template=self._chat_template, tokenize=False, add_generation_prompt=True
        )
        # What the template wrote, and between its pieces the index of the message text that stands there.
        pieces = _TEXT_MARKER.split(rendered)
        template_pieces, text_order = pieces[0::2], [int(index) for index in pieces[1::2]]
        placeholders = sum(piece.count(IMAGE_PLACEHOLDER) for piece in template_pieces)
        if placeholders != len(images):
            raise InvalidRequestError(
                f"The chat template placed {placeholders} image placeholders for {len(images)} images."
            )
        counts: list[int] = []
        pixel_values = grid = None
        if images:
            pixel_values, grid = self._process_images(images, sources, bounds)
            counts = [int(row.prod()) // self._merge_length for row in grid]
            expanded, remaining = [], iter(counts)
            for piece in template_pieces:
                parts = piece.split(IMAGE_PLACEHOLDER)
                expanded.append(parts[0] + "".join(IMAGE_PLACEHOLDER * next(remaining) + rest for rest in parts[1:]))
            template_pieces = expanded
        template_ids = self._tokenizer(template_pieces, add_special_tokens=False)["input_ids"]
        ids: list[int] = list(template_ids[0])
        for text_index, piece_ids in zip(text_order, template_ids[1:]):
            ids += text_ids[text_index] + piece_ids
        input_ids = torch.tensor([ids], dtype=torch.long)
        if not images:
            return ModelInputs(input_ids=input_ids)
        patch = getattr(self._image_processor, "patch_size", 14)
        return ModelInputs(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(input_ids == self._image_token_id).to(torch.int32),
            image_token_counts=counts,
            resized_image_sizes=[(int(row[2]) * patch, int(row[1]) * patch) for row in grid],
        )

    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        """Each message text as plain-text token ids (special tokens split into ordinary characters).

        Long texts go in pieces and counting stops once the prompt cannot fit the context: an 8 MB message
        is refused after tokenising about a context's worth of it, not all of it.
        """
        limit = self._max_prompt_tokens
        result: list[list[int]] = []
        total = 0
        for text in texts:
            ids: list[int] = []
            for piece in _pieces(text, _TEXT_PIECE_CHARS):
                ids += self._text_tokenizer.encode(piece, add_special_tokens=False).ids
                # Cutting a text may split one token in two: allow one extra token per cut before refusing.
                if limit is not None and total + len(ids) - len(text) // _TEXT_PIECE_CHARS > limit:
                    raise InvalidRequestError(
                        f"This model's maximum context length is {limit} tokens, and the messages are longer "
                        f"than that (counting stopped after {total + len(ids)} tokens). Please reduce the "
                        "length of the messages.",
                        param="messages",
                        code="context_length_exceeded",
                    )
            total += len(ids)
            result.append(ids)
        return result

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


def plain_text_tokenizer(tokenizer: Any) -> Tokenizer:
    """The model's tokenizer without its added tokens: special ones (`<|im_end|>`) and the ones not marked
    special (Qwen2.5's `<tool_call>`, `<|fim_prefix|>`) alike, so that text written in a message is tokenised
    by the vocabulary alone and can never produce a control token. (`split_special_tokens` splits only the
    special ones, and passing it per call flips a flag on the shared Rust tokenizer that other threads see.)"""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(definition))


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, each cut before a space where there is one (Qwen's
    pre-tokenizer starts a word with its space, so it splits there anyway): the pieces tokenise as the whole."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start, end)
            end = cut if cut > start else end  # the space starts the next piece, as it starts the next word
        pieces.append(text[start:end])
        start = end
    return pieces
