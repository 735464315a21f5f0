"""What the tests of `attn explore` share: the explorer's data for a request, and the reference
trace of the same run with every stage of every head captured by `pipeline.run` itself."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from attn_tracer.commands.run import Request, build_config
from attn_tracer.explore.data import Explore, compute
from attn_tracer.model import pipeline
from attn_tracer.model.engine import Engine
from attn_tracer.model.trace import Selection, Trace
from attn_tracer.model.weights import random_weights

SMALL = {"d_model": 64, "heads": 4, "layers": 2}  # fast, and still several heads and layers
SENTENCE = "The cat sat on the mat"


def explore_data(texts: list[str], width: int = 80, **fields) -> Explore:
    notices: list[str] = []
    data = compute(Request(texts=texts, **fields), notices.append, width)
    assert not notices, notices
    return data


def reference(texts: list[str], **fields) -> Trace:
    """The same run through pipeline.run, every stage of every head of every layer kept."""
    r = Request(texts=texts, **fields)
    config, _ = build_config(r)
    weights = random_weights(config, cross=bool(r.cross))
    selection = Selection(tuple(range(config.layers)), tuple(range(config.heads)), "stages")
    trace, _ = pipeline.run(texts, config, Engine("numpy", "cpu", "float32"), weights,
                            selection, cross_texts=r.cross or None, padding=r.padding)
    return trace


def drive(app, size: tuple[int, int], steps: Callable[[object], Awaitable[None]]):
    """Run `app` headless at `size` and await `steps(pilot)`; returns the app after it ends."""

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await steps(pilot)

    asyncio.run(main())
    return app
