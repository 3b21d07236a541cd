"""Serving an edited run over HTTP: ``megedit serve --run DIR`` (docs/serving.md).

- ``options``: ServeOptions, the server's knobs and their defaults
- ``validation``: request bodies -> queries, or an error naming the field
- ``engine``: one loaded run answering a batch of queries, with each answer's provenance
- ``batcher``: concurrent requests -> one model call per batch, in one model thread
- ``app``: the FastAPI app (``create_app``): the endpoints, errors, reload
- ``process``: start a server as a subprocess on a free port (tests, bench/serve.py)
- ``cli``: the ``megedit serve`` command
"""
