"""`/docs`: Swagger UI served by the gateway itself, so API docs work on air-gapped sites.

FastAPI's default `/docs` loads Swagger UI from a CDN and starts it with an inline script,
which a strict Content-Security-Policy (and a site without internet) blocks. The assets come
from the `swagger-ui-bundle-v2` package (Swagger UI 5, which reads the OpenAPI 3.1 that
FastAPI writes; packaged by connexion's maintainers, Apache-2.0)
instead of a copy in this repository, and a small script of ours starts it.
"""

from __future__ import annotations

from pathlib import Path

from e2v.client.gateway.errors import NOT_FOUND, GatewayError

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
# The only files served from the bundle: a fixed set, no path ever comes from a request.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
START_SCRIPT = """window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"""
DOCS_HEADERS = {
    # Swagger UI sets styles through the DOM (allowed) and shows schema images as data: URLs.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def docs_page(title: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API</title>
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png">
<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>
<script src="{ASSETS_PATH}/start.js"></script>
</body>
</html>
"""


def bundle_dir() -> Path:
    """Swagger UI's files in the installed `swagger-ui-bundle` package."""
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def add_docs_routes(app, title: str) -> None:
    """Serve `/docs` and its assets from this process (create the app with docs_url=None)."""
    from fastapi.responses import HTMLResponse, Response

    folder = bundle_dir()
    assets = {name: (folder / name).read_bytes() for name in ASSETS}
    assets["start.js"] = START_SCRIPT.encode()
    types = {**ASSETS, "start.js": "text/javascript"}
    page = docs_page(title)

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs():
        return HTMLResponse(page, headers=DOCS_HEADERS)

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if name not in assets:
            raise GatewayError(404, NOT_FOUND, "no such file")
        return Response(assets[name], media_type=types[name], headers=DOCS_HEADERS)
