"""The CLL scoring HTTP API as a Ray Serve application (see docs/serving.md).

    opsft serve [--model M] [--host 127.0.0.1] [--port 8000] [--config YAML]

schemas.py (request/response models), core.py (validation + batched scoring, Ray-free),
http.py (the FastAPI app, limits, auth, errors), deployments.py (Serve deployments),
app.py (building and running the application from a ServeConfig).
"""
