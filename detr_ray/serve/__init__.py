"""Serving a checkpoint: a Ray Serve detection endpoint (app.py), the request path without HTTP
(model.py) and a torch.export program for use outside Ray (export.py)."""
