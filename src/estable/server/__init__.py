"""Estable over HTTP: ``estable serve``.

    settings.py    ServerSettings and Limits (no torch, no FastAPI)
    catalog.py     the models a request may name (built-in, --model, --models-dir)
    inputs.py      request checks shared by both APIs: images, bounds, sampler → GenerationParams
    store.py       the SQLite job store, images as PNG files beside it
    worker.py      the one thread that holds the Pipeline and runs jobs from a bounded queue
    a1111.py       /sdapi/v1/*: A1111's API
    api.py         /v1/*: Estable's jobs API
    app.py         create_app(): routes, health, metrics, docs, the web page (web/)
    middleware.py  body cap, JSON access log, metrics; bearer / basic auth
    run.py         run_server(): uvicorn with a SIGTERM drain

FastAPI, uvicorn and prometheus-client come with the ``server`` extra: ``pip install 'estable[server]'``.
"""
