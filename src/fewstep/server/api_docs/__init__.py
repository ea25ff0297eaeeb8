"""The API docs page at `/docs` (Swagger UI over `/openapi.json`), served with its own script and
stylesheet so that it works offline: FastAPI's default page loads them from a CDN and stays blank
without internet.

`static/` holds files of the npm package `swagger-ui-dist` 5.35.0, unchanged: the bundle, its
stylesheet and their licences (Apache-2.0, `LICENSE`, `NOTICE`, and the bundled libraries' notices
in `swagger-ui-bundle.js.LICENSE.txt`). To update them: `npm pack swagger-ui-dist@VERSION` and copy
those five files from the archive's `package/` folder."""

from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response

from ...errors import NotFound

DOCS_PATH = "/docs"
# The only files served: a request names one of these, never a path.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
FAVICON = "/studio/icon.svg"  # the studio's icon, also served by this service


def _assets() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, media type, ETag)."""
    folder = resources.files(__name__).joinpath("static")
    files = {}
    for name, media_type in ASSETS.items():
        data = folder.joinpath(name).read_bytes()
        files[name] = (data, media_type, '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
    return files


def router(*, title: str, openapi_url: str) -> APIRouter:
    api = APIRouter()
    assets = _assets()

    @api.get(DOCS_PATH, include_in_schema=False)
    async def docs(request: Request):
        # behind a proxy that strips a prefix, every URL the page loads carries it again
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{title} - API docs",
            swagger_js_url=f"{root}{DOCS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_PATH}/swagger-ui.css",
            swagger_favicon_url=root + FAVICON,
            # no badge that would send the schema to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None},
        )

    @api.get(DOCS_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str, request: Request):
        entry = assets.get(name)
        if entry is None:
            raise NotFound(f"no docs file {name[:64]!r}", field="name")
        data, media_type, etag = entry
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=media_type, headers=headers)

    return api
