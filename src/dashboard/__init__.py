"""The live dashboard over a runs root (``python lightning_app.py``): ``server.py`` serves ``static/`` and the JSON and
event-stream endpoints; ``runs_index.py`` lists runs, ``series.py`` and ``lines.py`` read telemetry, ``paths.py``
keeps every read inside the root. Imports no training code (no data modules, no callbacks)."""
