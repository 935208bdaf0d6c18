"""Image intake for every route: where images come from, the limits they must meet, how they are decoded.

`ImageIntake.load` takes the images of one request (data URIs, bare base64, uploaded bytes, or http(s) URLs
where the operator allows them), enforces the per-request count, fetches URLs safely, and decodes each image
in a worker thread. The chat route and `/v1/vision/analyze` both use it; nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from anyio import CapacityLimiter, to_thread

from backend.errors import InvalidRequestError
from backend.media.decode import DecodedImage, DecodeLimits, bytes_from_inline, decode_image
from backend.media.fetch import FetchPolicy, ImageFetcher
from backend.settings import Settings

__all__ = ["DecodedImage", "ImageInput", "ImageIntake"]


@dataclass(frozen=True)
class ImageInput:
    """One image as a request gave it: its place in the request, and a URL/base64 text or uploaded bytes."""

    source: str  # e.g. "messages[0].content[1]" or "image[0]", for error messages
    url: str | None = None
    data: bytes | None = None


class ImageIntake:
    """Loads the images of one request under the operator's limits (see `.env.example`, images)."""

    def __init__(self, settings: Settings, fetcher: ImageFetcher | None = None) -> None:
        self._settings = settings
        # Decoding is the one step whose memory grows with what a client sends: a few at a time, server-wide.
        self._decoders = CapacityLimiter(settings.max_concurrent_image_decodes)
        self._fetcher = fetcher or ImageFetcher(
            FetchPolicy(
                allowed_domains=tuple(settings.image_url_allowed_domains),
                allow_private_networks=settings.image_url_allow_private_networks,
                timeout_seconds=settings.image_url_timeout_seconds,
                max_bytes=settings.max_image_bytes,
            )
        )

    async def load(self, inputs: list[ImageInput]) -> list[DecodedImage]:
        """Fetch and decode every image, in order; the first bad one ends the request with a 4xx."""
        limit = self._settings.max_images_per_request
        if len(inputs) > limit:
            raise InvalidRequestError(
                f"The request has {len(inputs)} images; at most {limit} are allowed (MAX_IMAGES_PER_REQUEST).",
                code="too_many_images",
            )
        decoded = []
        budget = self._settings.max_request_image_pixels
        for item in inputs:
            data = await self._bytes_of(item)
            limits = DecodeLimits(
                max_bytes=self._settings.max_image_bytes,
                max_pixels=self._settings.max_image_pixels,
                budget_pixels=budget,
                # Twice the model's largest side keeps every detail the resize to MAX_PIXELS can use.
                keep_pixels=4 * self._settings.max_pixels,
            )
            image = await to_thread.run_sync(decode_image, data, item.source, limits, limiter=self._decoders)
            budget -= image.decoded_pixels
            decoded.append(image)
        return decoded

    async def _bytes_of(self, item: ImageInput) -> bytes:
        if item.data is not None:
            return item.data
        url = (item.url or "").strip()
        if url.lower().startswith(("http://", "https://")):
            return await self._fetcher.fetch(url, item.source)
        return bytes_from_inline(url, item.source, self._settings.max_image_bytes)
