"""Rendering for people: rich progress and tables, plots, the HTML report."""
