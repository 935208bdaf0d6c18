"""Reading a `multipart/form-data` body (a browser form, `curl -F`) into memory, with size limits.

Starlette's form parser spools uploads over 1 MB to temporary files; images stay in memory here, and the
body is refused with 413 as soon as it passes the limit, before the rest is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from backend.errors import ImageTooLargeError, InvalidRequestError, RequestTooLargeError


@dataclass
class UploadedFile:
    """One file part."""

    field_name: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class FormData:
    """Text fields (the last value of each name wins) and file parts, in order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)


class _PartCollector:
    """python-multipart callbacks that gather headers and bytes of each part."""

    def __init__(self, max_file_bytes: int) -> None:
        self.form = FormData()
        self._max_file_bytes = max_file_bytes
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field, self._value = bytearray(), bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.extend(data[start:end])
        if len(self._data) > self._max_file_bytes:
            name = self._disposition().get(b"filename", b"").decode("utf-8", "replace") or "an uploaded file"
            raise ImageTooLargeError(
                f"The upload {name} is larger than the limit of {self._max_file_bytes} bytes (MAX_IMAGE_BYTES).",
                param="image",
            )

    def _disposition(self) -> dict[bytes, bytes]:
        return parse_options_header(self._headers.get("content-disposition", ""))[1]

    def _part_end(self) -> None:
        options = self._disposition()
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise InvalidRequestError(
                "A part of the multipart/form-data body has no name (Content-Disposition: form-data; name=...).",
                code="invalid_multipart",
            )
        if b"filename" in options:
            self.form.files.append(
                UploadedFile(
                    field_name=name,
                    filename=options[b"filename"].decode("utf-8", "replace"),
                    content_type=self._headers.get("content-type", ""),
                    data=bytes(self._data),
                )
            )
        else:
            try:
                self.form.fields[name] = self._data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(f"The form field `{name}` is not valid UTF-8.", param=name) from exc


async def read_multipart(request: Request, max_body_bytes: int, max_file_bytes: int) -> FormData:
    """Parse the request body as multipart/form-data, in memory."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequestError("Expected a multipart/form-data body with a boundary.")
    collector = _PartCollector(max_file_bytes)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_body_bytes:
                raise RequestTooLargeError(max_body_bytes)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequestError(
            f"The multipart/form-data body is malformed: {exc}", code="invalid_multipart"
        ) from exc
    return collector.form
