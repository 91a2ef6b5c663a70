"""Backbone features computed once per image and view, cached on disk and resumable."""
