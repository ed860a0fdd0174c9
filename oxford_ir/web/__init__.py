"""The local web page of ``oxford-ir-serve``: a FastAPI app (:func:`create_app`) with plain HTML/CSS/JS.

``templates/index.html`` is the page, ``static/app.js`` and ``static/app.css`` its script and style (no
build step). The JSON API and its error statuses are documented in :mod:`oxford_ir.web.app`.
"""

from oxford_ir.web.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
