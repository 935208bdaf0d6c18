"""From a conversation (text and images) to token ids, the same way for every engine.

The chat template writes one `<|image_pad|>` per image. Each image is resized by Qwen2.5-VL's rule
(`media/resize.py`) within the request's pixel bounds, which fixes how many tokens it costs (one per 28x28
block) before any engine sees it. An engine then widens the placeholder itself (the transformers engine) or
hands prompt and images to a library that does (vLLM, whose processor leaves an image already at such a size
as it is, so the count reported here is the count it uses).

Only the chat template writes control tokens: every message text is tokenised apart, by the vocabulary alone
(no added tokens), and put back where the template placed it, so no text can open a turn or place an image.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tokenizers import Tokenizer

from backend.engines.checkpoint import IMAGE_PLACEHOLDER
from backend.engines.requests import ChatTurn
from backend.errors import InvalidRequestError
from backend.media.resize import PixelBounds, image_token_count, resize_for_model

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
class TokenPrompt:
    """A rendered conversation: token ids with one placeholder per image, and the images resized as the
    model sees them (with what each costs)."""

    token_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    image_sources: list[str] = field(default_factory=list)
    image_token_counts: list[int] = field(default_factory=list)

    @property
    def resized_image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each image as the model sees it."""
        return [image.size for image in self.images]

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the prompt once every placeholder is widened to its image's tokens."""
        return len(self.token_ids) - len(self.images) + sum(self.image_token_counts)


class ChatPromptRenderer:
    """Applies one model's chat template and tokenises; resizes the images and counts their tokens."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str,
        image_token_id: int | None,
        system_prompt: str = "",
        max_prompt_tokens: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._text_tokenizer = plain_text_tokenizer(tokenizer)
        self._chat_template = chat_template
        self.image_token_id = image_token_id  # None: the model reads text only
        self._system_prompt = system_prompt
        self._max_prompt_tokens = max_prompt_tokens

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
                    if self.image_token_id is None:
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

    def render(self, turns: list[ChatTurn], bounds: PixelBounds) -> TokenPrompt:
        """Tokenise the conversation (ending with an open assistant turn) and resize its images."""
        conversation = self.template_messages(turns)
        text_ids = self._tokenize_texts(conversation.texts)
        rendered = self._tokenizer.apply_chat_template(
            conversation.messages, chat_template=self._chat_template, tokenize=False, add_generation_prompt=True
        )
        # What the template wrote, and between its pieces the index of the message text that stands there.
        pieces = _TEXT_MARKER.split(rendered)
        template_pieces, text_order = pieces[0::2], [int(index) for index in pieces[1::2]]
        placeholders = sum(piece.count(IMAGE_PLACEHOLDER) for piece in template_pieces)
        if placeholders != len(conversation.images):
            raise InvalidRequestError(
                f"The chat template placed {placeholders} image placeholders for {len(conversation.images)} images."
            )
        template_ids = self._tokenizer(template_pieces, add_special_tokens=False)["input_ids"]
        ids: list[int] = list(template_ids[0])
        for text_index, piece_ids in zip(text_order, template_ids[1:]):
            ids += text_ids[text_index] + piece_ids
        images = [
            resize_for_model(image, bounds, source)
            for image, source in zip(conversation.images, conversation.image_sources)
        ]
        return TokenPrompt(
            token_ids=ids,
            images=images,
            image_sources=conversation.image_sources,
            image_token_counts=[image_token_count(*image.size) for image in images],
        )

    def raw_prompt(self, prompt: str | list[int]) -> TokenPrompt:
        """A legacy completion's prompt, as its client wrote it: text tokenised with the control tokens it
        spells out (the client writes the template itself), or token ids as they are. Text only: an image
        placeholder without its image is refused, as are ids outside the vocabulary."""
        if isinstance(prompt, str):
            # A bound before tokenising a huge body: text averages 2 to 5 characters a token, so a prompt of
            # more than 8 characters per token of context cannot fit (the count after tokenising decides).
            if self._max_prompt_tokens is not None and len(prompt) > 8 * self._max_prompt_tokens:
                raise _too_long(self._max_prompt_tokens, None)
            ids = list(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            ids = list(prompt)
            vocabulary_size = len(self._tokenizer)
            if any(not 0 <= token < vocabulary_size for token in ids):
                raise InvalidRequestError(
                    f"The prompt has token ids outside this model's vocabulary (0..{vocabulary_size - 1}).",
                    param="prompt",
                    code="invalid_value",
                )
        if not ids:
            raise InvalidRequestError("The prompt is empty.", param="prompt", code="invalid_value")
        if self.image_token_id is not None and self.image_token_id in ids:
            raise InvalidRequestError(
                f"The prompt contains {IMAGE_PLACEHOLDER} without an image; /v1/completions takes text only "
                "(send images to /v1/chat/completions).",
                param="prompt",
                code="invalid_value",
            )
        if self._max_prompt_tokens is not None and len(ids) >= self._max_prompt_tokens:
            raise _too_long(self._max_prompt_tokens, len(ids))
        return TokenPrompt(token_ids=ids)

    def decode(self, token_ids: list[int]) -> str:
        """Token ids as text (an echoed prompt)."""
        return self._tokenizer.decode(token_ids, skip_special_tokens=False)

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


def _too_long(limit: int, counted: int | None) -> InvalidRequestError:
    size = f"has {counted} tokens" if counted is not None else "is far longer than that"
    return InvalidRequestError(
        f"This model's maximum context length is {limit} tokens, and the prompt {size}. "
        "Please reduce the length of the prompt.",
        param="prompt",
        code="context_length_exceeded",
    )


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
