"""`/v1/vision/analyze`: one or more images and a question, answered with a TCM task preset.

The body is JSON or a multipart form (browser forms, `curl -F image=@tongue.jpg`). Images go through the same
intake as chat (`backend.media`), the conversation through the chat handler's preparation, generation and
streaming, so both routes behave alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from backend.engines import EngineClient
from backend.engines.events import GenerationStream
from backend.engines.requests import ChatTurn
from backend.errors import InvalidRequestError, UnsupportedMediaTypeError
from backend.handlers.chat import ChatCompletionHandler, PreparedChat, check_model_name
from backend.media import ImageInput, ImageIntake
from backend.media.multipart import read_multipart
from backend.protocol.common import Usage
from backend.protocol.vision import AnalyzedImage, VisionAnalyzeRequest, VisionAnalyzeResponse, VisionTimings
from backend.settings import Settings

# Presets written for ShizhenGPT. A request's `prompt` is added after the preset as the user's own question;
# without a `task`, the prompt is used alone (and with neither, the `general` preset).
TASK_PROMPTS = {
    "tongue": (
        "请根据这张舌象图片进行中医舌诊分析：\n"
        "1. 舌色：淡白、淡红、红、绛或青紫；\n"
        "2. 舌苔：颜色（白、黄、灰黑）、厚薄、润燥、腐腻及有无剥落；\n"
        "3. 舌形：胖瘦、老嫩，有无齿痕、裂纹、点刺；\n"
        "4. 舌态与津液：是否湿润，有无歪斜、颤动。\n"
        "最后综合说明这些舌象可能提示的体质或证候（如气虚、阳虚、阴虚、湿热、血瘀等），并给出饮食与起居调养建议。"
    ),
    "face": (
        "请根据这张面部图片进行中医面诊分析：观察面色（青、赤、黄、白、黑）与光泽、面部各区域的色泽变化、"
        "眼睑与口唇的颜色、神态与精神状态，说明它们可能反映的脏腑气血状况和体质倾向，并给出调养建议。"
    ),
    "herb": (
        "请识别图片中的中药材或中成药：给出名称（及常见别名）、药用部位或主要成分，"
        "性味归经、主要功效与主治，常用剂量与用法，以及使用禁忌和注意事项。若无法确定，请说明可能的候选及鉴别要点。"
    ),
    "general": "请结合中医知识，仔细描述并分析这张图片的内容。",
}


def build_prompt(task: str | None, prompt: str | None) -> str:
    """The text that follows the images: the task's preset, then the user's question."""
    question = (prompt or "").strip()
    if task is None:
        return question or TASK_PROMPTS["general"]
    return f"{TASK_PROMPTS[task]}\n\n补充问题：{question}" if question else TASK_PROMPTS[task]


# Form fields that are text as they stand; the others are parsed as JSON values ("128", "true", "0.7").
_TEXT_FORM_FIELDS = {"prompt", "task", "model", "stop", "image"}


def form_to_body(fields: dict[str, str]) -> dict:
    """Multipart text fields -> the JSON body they stand for."""
    body: dict = {}
    for name, value in fields.items():
        if name in _TEXT_FORM_FIELDS or value == "":
            if value != "":
                body[name] = value
            continue
        try:
            body[name] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: `[[[[...` nested past the parser's depth
            body[name] = value  # validation then names the field and what it expected
    return body


def validate_body(data: dict | bytes) -> VisionAnalyzeRequest:
    """Validate like FastAPI does, so errors get the same 400 envelope with `param`."""
    try:
        if isinstance(data, bytes):
            return VisionAnalyzeRequest.model_validate_json(data)
        return VisionAnalyzeRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


@dataclass
class PreparedVision:
    """An analysis request ready to generate."""

    body: VisionAnalyzeRequest
    chat: PreparedChat
    disclaimer: str


class VisionHandler:
    """Serves `/v1/vision/analyze` on top of the chat handler."""

    def __init__(
        self, engine: EngineClient, settings: Settings, intake: ImageIntake, chat: ChatCompletionHandler
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._intake = intake
        self._chat = chat

    async def read(self, request: Request) -> tuple[VisionAnalyzeRequest, list[ImageInput]]:
        """Parse a JSON or multipart body into the request and its images (in order: uploads, then `image`)."""
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        images: list[ImageInput] = []
        if content_type == "multipart/form-data":
            form = await read_multipart(request, self._settings.max_request_bytes, self._settings.max_image_bytes)
            body = validate_body(form_to_body(form.fields))
            uploads = [upload for upload in form.files if upload.field_name in ("image", "images", "file")]
            images += [
                ImageInput(f"image[{i}] ({upload.filename})", data=upload.data) for i, upload in enumerate(uploads)
            ]
        elif content_type in ("application/json", ""):
            body = validate_body(await request.body())
        else:
            raise UnsupportedMediaTypeError(
                f"Send application/json or multipart/form-data, not {content_type}.", code="unsupported_media_type"
            )
        inline = [body.image] if isinstance(body.image, str) else (body.image or [])
        images += [ImageInput(f"image[{len(images) + i}]", url=value) for i, value in enumerate(inline)]
        if not images:
            raise InvalidRequestError(
                "Send at least one image: a file part named `image`, or `image` as a data: URI or base64.",
                param="image",
                code="image_required",
            )
        return body, images

    async def prepare(self, request: Request) -> PreparedVision:
        """Read, check and tokenise the request."""
        started = time.perf_counter()
        body, inputs = await self.read(request)
        check_model_name(body.model, self._settings)
        body.check_limits(max_n=1)
        if not self._engine.require_ready().accepts_images:
            raise InvalidRequestError(
                f"The model {self._settings.model_name} reads text only; it cannot analyse images.",
                code="images_not_supported",
            )
        images = await self._intake.load(inputs)
        turn = ChatTurn(
            "user",
            [image.image for image in images] + [build_prompt(body.task, body.prompt)],
            source="prompt",
            image_sources=[image.source for image in images],
        )
        chat = await self._chat.prepare_turns(body, [turn], images, started, "vision")
        return PreparedVision(body, chat, self._settings.medical_disclaimer.strip())

    def start(self, prepared: PreparedVision) -> list[GenerationStream]:
        """Queue the analysis (429 when the queue is full)."""
        return self._chat.start(prepared.chat)

    def stream(self, prepared: PreparedVision, streams: list[GenerationStream], log: dict | None = None):
        """SSE in the chat chunk format; the disclaimer arrives as the last content chunk."""
        suffix = f"\n\n{prepared.disclaimer}" if prepared.disclaimer else ""
        return self._chat.stream(prepared.chat, streams, prepared.body.include_usage, suffix=suffix, log=log)

    async def complete(self, prepared: PreparedVision, log: dict | None = None) -> VisionAnalyzeResponse:
        """Generate the whole analysis."""
        [result] = await self._chat.generate_all(prepared.chat, log)
        finish, chat = result.finish, prepared.chat
        analysis = result.text + (f"\n\n{prepared.disclaimer}" if prepared.disclaimer else "")
        return VisionAnalyzeResponse(
            id=chat.request_id,
            created=chat.created,
            model=self._settings.model_name,
            task=prepared.body.task,
            analysis=analysis,
            disclaimer=prepared.disclaimer or None,
            finish_reason="length" if finish.finish_reason == "length" else "stop",
            images=[
                AnalyzedImage(
                    source=image.source,
                    original_width=image.original_size[0],
                    original_height=image.original_size[1],
                    width=width,
                    height=height,
                    image_tokens=tokens,
                )
                for image, (width, height), tokens in zip(
                    chat.images, chat.inputs.resized_image_sizes, chat.inputs.image_token_counts
                )
            ],
            usage=Usage.of(finish.prompt_tokens, finish.completion_tokens),
            timings=VisionTimings(
                preprocessing_ms=round(chat.preprocessing_seconds * 1000, 2),
                queue_ms=round(finish.queue_seconds * 1000, 2),
                time_to_first_token_ms=(
                    round(finish.time_to_first_token * 1000, 2) if finish.time_to_first_token is not None else None
                ),
                generation_ms=round(finish.generation_seconds * 1000, 2),
            ),
        )
