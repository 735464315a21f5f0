"""Questions asked of a model, over the trace's steps: plain arrays in, plain data out.

Renderers draw what these return; nothing here prints.
"""
