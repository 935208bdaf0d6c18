"""`Annotated` dependencies: how routes reach the collaborators that `create_app` put on `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from backend.engines import EngineClient
from backend.handlers.chat import ChatCompletionHandler
from backend.handlers.vision import VisionHandler
from backend.settings import Settings


def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


def get_engine(request: Request) -> EngineClient:
    """The engine (whichever runs: the handlers only know its interface)."""
    return request.app.state.engine


def get_chat_handler(request: Request) -> ChatCompletionHandler:
    """The chat completion handler."""
    return request.app.state.chat_handler


def get_vision_handler(request: Request) -> VisionHandler:
    """The /v1/vision/analyze handler."""
    return request.app.state.vision_handler


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]
ChatHandlerDep = Annotated[ChatCompletionHandler, Depends(get_chat_handler)]
VisionHandlerDep = Annotated[VisionHandler, Depends(get_vision_handler)]
