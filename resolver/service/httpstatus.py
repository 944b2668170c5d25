"""The reason phrases of the HTTP statuses the admin server and DoH answer with."""

from __future__ import annotations

from typing import Final

#: Status code -> reason phrase (RFC 9110 §15).
REASONS: Final = {
    200: "OK",
    201: "Created",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    421: "Misdirected Request",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
