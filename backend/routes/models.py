"""`GET /v1/models` and `GET /v1/models/{model}`: the one served model, in OpenAI's format."""

from __future__ import annotations

from fastapi import APIRouter

from backend.dependencies import EngineDep, SettingsDep
from backend.errors import ModelNotFoundError
from backend.protocol.common import ErrorResponse
from backend.protocol.models import ModelCard, ModelList

router = APIRouter(tags=["models"])


def _card(engine: EngineDep, settings: SettingsDep) -> ModelCard:
    model = engine.model
    return ModelCard(
        id=settings.model_name,
        created=int(engine.started_at),
        owned_by="shizhengpt-server",
        root=settings.model_id,
        max_model_len=model.max_model_len if model is not None else None,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    """The served model (its `id` is what clients put in `model`)."""
    return ModelList(data=[_card(engine, settings)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model: str, engine: EngineDep, settings: SettingsDep) -> ModelCard:
    """One model by name: the served name or MODEL_ID."""
    if model not in (settings.model_name, settings.model_id):
        raise ModelNotFoundError(model, settings.model_name)
    return _card(engine, settings)
