"""`attn explore`: the interactive explorer of one trace, in the terminal (Textual).

    data.py      everything the app shows, computed before it starts (no Textual)
    command.py   the command: checks, the run, then the app (imports Textual only there)
    app.py       the app: screens, keys, saving a screenshot
    overview.py  the layers × heads grid of thumbnails (or of one score)
    head_view.py one head: its heatmap, and the text shaded by the focused query
    panels.py    the side panels: shape trace and formula, scores, predictions; the key help

Nothing here runs the model once the app is up: the app draws what data.py computed.
Importing this package imports no Textual.
"""
