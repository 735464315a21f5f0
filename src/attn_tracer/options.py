"""The options that every command running the model shares, defined once.

`attn trace`, `attn heads`, `attn explore` and `attn attribute` take the same input, model and
engine options (and `trace` and `explore` the same --predict; every command that draws a view
the same --svg, --html, --width and --force).
Each group below is written as the signature of a function, the way Typer reads options;
`@shared(INPUT, MODEL, ENGINE)` splices those parameters into a command's own signature and
hands their values to the command as one dict, `opts`, ready for `run.Request(**opts, …)`.
A help text or a default changed here changes for every command at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from attn_tracer.model.config import (
    ARCHS,
    DTYPES,
    ENGINES,
    MASKS,
    MLPS,
    NORMS,
    POSITIONS,
    ROTARY_STYLES,
)

Opt = typer.Option


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    # An Enum is how every Typer in our range turns an option into a real choice: listed in
    # --help, completed by the shell, refused with the valid values when wrong.
    return Enum(name, {v: v for v in values}, type=str)


Padding = _choices("Padding", ("right", "left"))
Position = _choices("Position", POSITIONS)
Mask = _choices("Mask", MASKS)
Arch = _choices("Arch", ARCHS)
Norm = _choices("Norm", NORMS)
MLP = _choices("MLP", MLPS)
RotaryStyle = _choices("RotaryStyle", ROTARY_STYLES)
EngineName = _choices("EngineName", ENGINES)
DType = _choices("DType", DTYPES)


def _devices(incomplete: str) -> list[str]:
    # cuda:N is open-ended, so --device stays a string that the engine checks; the shell still
    # completes the usual names.
    return [d for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:1") if d.startswith(incomplete)]


KEEP_NEWLINE_HELP = ("Keep the final line ending of a file or standard input (dropped by "
                     "default, as $(cat file) does).")


def _input(
    texts: Annotated[list[str] | None, typer.Argument(
        help="The text (several make a batch), or - for standard input.", show_default=False,
        metavar="TEXT...")] = None,
    file: Annotated[Path | None, Opt("--file", "-f", help="Read the text from a file.",
                                     rich_help_panel="Input")] = None,
    lines: Annotated[Path | None, Opt("--lines", help="A batch: one text per line of this file "
                                      "(- for standard input).", rich_help_panel="Input")] = None,
    allow_special: Annotated[bool, Opt("--allow-special", help="Read <|endoftext|> as token "
                                       "50256 (a checkpoint's tokenizer: all its special "
                                       "tokens).", rich_help_panel="Input")] = False,
    keep_newline: Annotated[bool, Opt("--keep-newline", help=KEEP_NEWLINE_HELP,
                                      rich_help_panel="Input")] = False,
    padding: Annotated[Padding, Opt("--padding",
                                help="Pad shorter batch rows on the right or left.",
                                    rich_help_panel="Input")] = Padding.right,
    max_length: Annotated[int | None, Opt("--max-length", help="Cut longer texts to this many "
                                          "tokens.", rich_help_panel="Input")] = None,
    pad_to: Annotated[int | None, Opt("--pad-to", help="Pad every text to exactly this many "
                                      "tokens (a text longer than that is refused).",
                                      rich_help_panel="Input")] = None,
    ids: Annotated[list[str] | None, Opt("--ids", help="Token ids instead of a text, e.g. "
                                         "\"464,3797,3332\" (repeat for a batch); labelled with "
                                         "GPT-2's tokens where they are GPT-2's.",
                                         rich_help_panel="Input", show_default=False)] = None,
) -> None: ...


def _cross(
    cross: Annotated[list[str] | None, Opt("--cross", help="Cross-attention: keys and values "
                                           "come from this text.", rich_help_panel="Input")] = None,
    cross_file: Annotated[Path | None, Opt("--cross-file", help="Read the --cross text from a "
                                           "file.", rich_help_panel="Input")] = None,
) -> None: ...


def _model(
    d_model: Annotated[int | None, Opt("--d-model", help="Width of the residual stream "
                                       "(default: 768).", rich_help_panel="Model",
                                       show_default=False)] = None,
    heads: Annotated[int | None, Opt("--heads", help="Attention heads (default: 12).",
                                     rich_help_panel="Model", show_default=False)] = None,
    d_head: Annotated[int | None, Opt("--d-head", help="Width of one head (default: d_model / "
                                      "heads); heads·d_head is the width of Q, K, V and Z.",
                                      rich_help_panel="Model", show_default=False)] = None,
    layers: Annotated[int | None, Opt("--layers", help="Layers (default: 2).",
                                      rich_help_panel="Model", show_default=False)] = None,
    n_ctx: Annotated[int | None, Opt("--n-ctx", help="Longest text the model accepts "
                                     "(default: 1024).", rich_help_panel="Model",
                                     show_default=False)] = None,
    pos: Annotated[Position | None, Opt("--pos",
                                   help="Positional encoding (default: sinusoidal; learned with "
                                   "--arch gpt2).", rich_help_panel="Model",
                                   show_default=False)] = None,
    mask: Annotated[Mask, Opt("--mask",
                             help="causal (a query sees only earlier keys) or none.",
                              rich_help_panel="Model")] = Mask.causal,
    no_scale: Annotated[bool, Opt("--no-scale", help="Drop the ÷√d_head and watch the patterns "
                                  "saturate.", rich_help_panel="Model")] = False,
    no_bias: Annotated[bool, Opt("--no-bias", help="No biases in the projections.",
                                 rich_help_panel="Model")] = False,
    seed: Annotated[int, Opt("--seed", help="Seed of the random weights.",
                             rich_help_panel="Model")] = 0,
    arch: Annotated[Arch | None, Opt("--arch",
                                    help="attn (attention + residual only), gpt2 (LayerNorm, "
                                    "MLP) or llama (RMSNorm, SwiGLU, rotary, no biases) "
                                    "(default: attn; the checkpoint's with --weights).",
                                    rich_help_panel="Model", show_default=False)] = None,
    kv_heads: Annotated[int | None, Opt("--kv-heads", help="K/V heads, each shared by heads / "
                                        "kv_heads query heads (grouped-query attention; 1: "
                                        "multi-query) (default: --heads).",
                                        rich_help_panel="Model", show_default=False)] = None,
    window: Annotated[int | None, Opt("--window", help="Sliding-window mask: a query sees its "
                                      "last W keys, itself included.", rich_help_panel="Model",
                                      show_default=False)] = None,
    norm: Annotated[Norm | None, Opt("--norm", help="The block's norms: LayerNorm or RMSNorm "
                                     "(default: layer; rms with --arch llama).",
                                     rich_help_panel="Model", show_default=False)] = None,
    mlp: Annotated[MLP | None, Opt("--mlp", help="The block's MLP: GPT-2's GELU or Llama's gated "
                                   "SwiGLU (default: gelu; swiglu with --arch llama).",
                                   rich_help_panel="Model", show_default=False)] = None,
    d_mlp: Annotated[int | None, Opt("--d-mlp", help="Width of the MLP (default: 4·d_model).",
                                     rich_help_panel="Model", show_default=False)] = None,
    rotary_dims: Annotated[int | None, Opt("--rotary-dims", help="--pos rotary: dimensions of "
                                           "each head that turn (default: all of d_head).",
                                           rich_help_panel="Model", show_default=False)] = None,
    rope_theta: Annotated[float | None, Opt("--rope-theta", help="--pos rotary: the base θ of "
                                            "the angles p·θ^(−2i/d) (default: 10000).",
                                            rich_help_panel="Model", show_default=False)] = None,
    rotary_style: Annotated[RotaryStyle | None, Opt(
        "--rotary-style", help="--pos rotary: which dimensions turn together: halves (i with "
        "i + d/2, Llama, NeoX) or interleaved (2i with 2i+1, GPT-J) (default: halves).",
        rich_help_panel="Model", show_default=False)] = None,
    weights: Annotated[str | None, Opt(
        "--weights", help="Real weights (GPT-2; Llama, Mistral, Qwen2 with --ids): a directory, "
        "a .safetensors/.bin file, or a model id in the Hugging Face cache (gpt2, distilgpt2, …).",
        rich_help_panel="Model")] = None,
) -> None: ...


def _engine(
    device: Annotated[str, Opt("--device", autocompletion=_devices,
                               help="auto, cpu, cuda or cuda:N.",
                               rich_help_panel="Engine")] = "auto",
    engine: Annotated[EngineName, Opt("--engine",
                               help="The array library (auto: NumPy on the CPU below 2,048 "
                               "tokens).", rich_help_panel="Engine")] = "auto",
    dtype: Annotated[DType, Opt("--dtype",
                              help="float16 and bfloat16 need CUDA.",
                                rich_help_panel="Engine")] = DType.float32,
    max_memory: Annotated[str | None, Opt("--max-memory", help="Refuse runs estimated above this"
                                          " (e.g. 4G) (default: half the machine's RAM).",
                                          rich_help_panel="Engine", show_default=False)] = None,
) -> None: ...


def _predict(
    predict: Annotated[bool, Opt("--predict", help="Show the next-token distribution.",
                                 rich_help_panel="View")] = False,
    top_k: Annotated[int, Opt("--top-k", help="Tokens shown by --predict.",
                              rich_help_panel="View")] = 10,
    temperature: Annotated[float, Opt("--temperature", "-T", help="Softmax temperature of "
                                      "--predict.", rich_help_panel="View")] = 1.0,
) -> None: ...


def _files(
    svg: Annotated[Path | None, Opt("--svg", help="Save the view as SVG (in colour, whatever "
                                    "stdout is).", rich_help_panel="Output")] = None,
    html: Annotated[Path | None, Opt("--html", help="Save the view as HTML.",
                                     rich_help_panel="Output")] = None,
    width: Annotated[int | None, Opt("--width", help="Columns of the view (default: the "
                                     "terminal's; 120 for --svg/--html from a pipe).",
                                     rich_help_panel="Output", show_default=False)] = None,
    force: Annotated[bool, Opt("--force", help="Overwrite the files given to the Output "
                               "options if they exist.", rich_help_panel="Output")] = False,
) -> None: ...


def _parameters(group: Callable) -> list[inspect.Parameter]:
    params = inspect.signature(group, eval_str=True).parameters.values()
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]


INPUT = _parameters(_input)
CROSS = _parameters(_cross)
MODEL = _parameters(_model)
ENGINE = _parameters(_engine)
PREDICT = _parameters(_predict)
FILES = _parameters(_files)  # the view's files, in every command that draws one (output.py)


def to_request(values: dict[str, Any]) -> dict[str, Any]:
    """The shared options as `run.Request` fields (flags named for what they turn off)."""
    out = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
    for flag, field in (("no_scale", "scale"), ("no_bias", "bias")):
        if flag in out:
            out[field] = not out.pop(flag)
    for name in ("texts", "cross", "ids"):
        if name in out:
            out[name] = out[name] or []
    return out


def shared(*groups: list[inspect.Parameter]):
    """Give a command the options of `groups`, before its own; it receives them as `opts`."""
    names = [p.name for group in groups for p in group]

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name != "opts"]
        # The TEXT argument stays first; the command's own options follow the shared ones.
        params = [p for group in groups for p in group] + [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(command)
        def wrapper(**kwargs):
            opts = to_request({name: kwargs.pop(name) for name in names})
            return command(opts=opts, **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
