"""``mmfuse serve``: an HTTP server and a page over ``mmfuse.load(RUN).predict``, with micro-batching.

Run it (needs ``pip install 'mmfuse[serve]'``):

    mmfuse serve runs/quickstart                 # http://127.0.0.1:8000/ is the page; the API is under /v1
    curl -F image=@cat.png -F text="a grinning cat" http://127.0.0.1:8000/v1/predict

or mount the app in another ASGI server:

    from mmfuse.inference.serve import create_app
    app = create_app("runs/quickstart", max_batch=64, max_wait_ms=5)

The server holds no model logic of its own: a request is checked and its images decoded (``requests``), its rows wait
in a bounded queue, and a single model thread runs the queued rows in batches, each one ``Predictor.predict`` call
(``batching``); ``app`` holds the routes and the command.
"""

from mmfuse.inference.serve.app import create_app, serve
from mmfuse.inference.serve.batching import Batcher, Metrics
from mmfuse.inference.serve.requests import Limits, RequestError

__all__ = ["Batcher", "Limits", "Metrics", "RequestError", "create_app", "serve"]
