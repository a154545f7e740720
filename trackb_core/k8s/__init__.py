"""Kubernetes: typed settings, the one Job-spec builder (pure, plain dicts) and render.

Only ``trackb_core.k8s.client`` imports the ``kubernetes`` SDK; everything here builds
and writes plain dicts, so every field is unit-tested without a cluster.
"""
