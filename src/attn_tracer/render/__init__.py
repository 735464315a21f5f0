"""Renderers: the terminal view, JSON documents; they read plain data."""
