"""The HTTP layer: the raw-ASGI ingest path, the Starlette app and its routes, the
wire structs and the OpenAPI document built from them, and the accept batcher."""
