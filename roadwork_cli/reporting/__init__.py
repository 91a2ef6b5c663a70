"""Rendering for people: rich tables, plots, the HTML report."""
