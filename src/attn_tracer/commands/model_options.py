"""The model options of every command: the architecture's defaults, the modern-attention
switches, and a checkpoint's own settings against the options given beside --weights."""

from __future__ import annotations

from collections.abc import Callable

from attn_tracer.errors import UsageError
from attn_tracer.model.config import Config

# Request field → its flag, for the options a checkpoint sets itself.
MODERN_FLAGS = {"kv_heads": "--kv-heads", "window": "--window", "norm": "--norm",
                "mlp": "--mlp", "d_mlp": "--d-mlp", "rotary_dims": "--rotary-dims",
                "rope_theta": "--rope-theta", "rotary_style": "--rotary-style"}


def modern(r, arch) -> dict:
    """Config fields of the modern-attention options, with the family's defaults."""
    out: dict = {"kv_heads": r.kv_heads, "window": r.window, "d_mlp": r.d_mlp,
                 "rotary_dims": r.rotary_dims}
    for name in ("norm", "mlp", "ln_eps"):
        value = getattr(r, name, None) or arch.defaults.get(name)
        if value is not None:
            out[name] = value
    if r.rope_theta is not None:
        out["rope_theta"] = r.rope_theta
    if r.rotary_style is not None:
        out["rotary_style"] = r.rotary_style
    return out


def validate_cross(i, m) -> None:
    """--cross: only the attention-only stack has cross-attention, and not with rotary
    positions (the cross text's positions would turn its keys by positions of its own)."""
    from attn_tracer.model.arch import family

    if not (i.cross or i.cross_file):
        return
    arch = family(m.arch) if m.arch is not None else None
    if arch is not None and arch.full_block:
        raise UsageError(f"--cross needs --arch attn: {arch.title} is decoder-only, it has no "
                         "cross-attention")
    if m.weights is not None:
        raise UsageError("--cross conflicts with --weights: GPT-2 has no cross-attention")
    if m.pos == "rotary":
        raise UsageError("--pos rotary turns self-attention's Q and K by their positions; "
                         "--cross texts have positions of their own: use another --pos")


def validate_model(i, m) -> None:
    """Refuse model options that cannot go together, before anything is read (`i`: the input
    options, `m`: the model options)."""
    from attn_tracer.model.arch import family

    arch = family(m.arch) if m.arch is not None and m.arch in _archs() else None
    if m.weights is None:
        if (arch is None or not arch.full_block) and (m.norm or m.mlp or m.d_mlp):
            flag = "--norm" if m.norm else "--mlp" if m.mlp else "--d-mlp"
            raise UsageError(f"{flag} sets a part of the full block, which --arch attn does not "
                             "have: use --arch gpt2 or --arch llama")
        rotary = m.pos == "rotary" or (m.pos is None and arch is not None
                                       and arch.defaults.get("pos") == "rotary")
        for flag, value in (("--rope-theta", m.rope_theta), ("--rotary-style", m.rotary_style),
                            ("--rotary-dims", m.rotary_dims)):
            if value is not None and not rotary:
                raise UsageError(f"{flag} shapes rotary positions: add --pos rotary")
    if i.ids and (i.texts or i.file is not None or i.lines is not None):
        raise UsageError("give the input one way: TEXT arguments, --file, --lines or --ids")


def _archs() -> tuple[str, ...]:
    from attn_tracer.model.config import ARCHS

    return ARCHS


def parse_ids(values: list[str], vocab: int) -> list[list[int]]:
    """--ids "1,2,3" (repeatable: one text each) → the id lists, checked against the vocabulary."""
    out = []
    for value in values:
        row = []
        for part in value.replace(" ", ",").split(","):
            if not part.strip():
                continue
            try:
                n = int(part)
            except ValueError:
                raise UsageError(f"--ids takes token ids separated by commas, such as 1,2,3; "
                                 f"got {value!r}") from None
            if not 0 <= n < vocab:
                raise UsageError(f"--ids: token id {n} is out of range: the vocabulary has "
                                 f"{vocab} tokens (0 to {vocab - 1})")
            row.append(n)
        if not row:
            raise UsageError("--ids is empty: give at least one token id")
        out.append(row)
    return out


def load_weights(r, notice: Callable[[str], None], max_bytes: int | None):
    """The Config and Weights of --weights, after checking the options given beside it."""
    from attn_tracer.model.arch import family
    from attn_tracer.model.checkpoint import load_checkpoint
    from attn_tracer.model.weights import Weights

    if r.arch is not None and not family(r.arch).full_block:
        raise UsageError("--weights loads a GPT-2, which needs --arch gpt2 (or no --arch)")
    for flag, value in (("--d-model", r.d_model), ("--layers", r.layers),
                        ("--n-ctx", r.n_ctx)):
        if value is not None:
            raise UsageError(f"{flag} conflicts with --weights: the checkpoint sets the sizes")
    def expect(model: dict) -> None:
        """The options against the checkpoint's own settings, before a tensor is read."""
        arch = family(model["arch"])
        if r.arch is not None and family(r.arch) is not arch:
            raise UsageError(f"--arch {r.arch} conflicts with the checkpoint, a {arch.title} "
                             f"(--arch {arch.name})")
        if r.pos not in (None, model["pos"]):
            raise UsageError(f"{arch.title} weights come with {model['pos']} positions; "
                             "drop --pos")
        if not r.bias:
            raise UsageError(f"--no-bias conflicts with --weights: {arch.title} has biases"
                             if model.get("bias", True) else
                             "--no-bias conflicts with --weights: the checkpoint sets its biases")
        for name, flag in MODERN_FLAGS.items():
            if getattr(r, name) is not None:
                raise UsageError(f"{flag} conflicts with --weights: the checkpoint sets it")

    ck = load_checkpoint(r.weights, r.heads, max_bytes, expect)
    model = ck.model
    if ck.head_untied_against_config:
        notice(f"{r.weights}: config.json ties the output head to wte, but lm_head.weight "
               "differs from it; the logits use lm_head.weight, as transformers does")
    if ck.heads_guessed:
        notice(f"{r.weights} has no config.json: assuming GPT-2's 64-dimensional heads, "
               f"{ck.heads} head{'s' if ck.heads > 1 else ''}; say otherwise with --heads")
    if r.heads is not None and r.heads != ck.heads:
        raise UsageError(f"--heads {r.heads} conflicts with the checkpoint's {ck.heads} heads")
    if r.d_head is not None and r.d_head != ck.d_head:
        raise UsageError(f"--d-head {r.d_head} conflicts with the checkpoint's "
                         f"{ck.d_head}-dimensional heads")
    config = Config(d_model=ck.d_model, heads=ck.heads, layers=ck.layers, n_ctx=ck.n_ctx,
                    mask=r.mask, scale=r.scale, seed=r.seed, vocab=ck.vocab, ln_eps=ck.ln_eps,
                    weights=r.weights, d_mlp=ck.d_mlp, d_head=ck.d_head, **model)
    return config, Weights(config, dict(ck.params), trained=True)


def titled(config) -> str:
    """What a config's checkpoint is called (GPT-2, Llama, Mistral, Qwen2)."""
    from attn_tracer.model.arch import family

    arch = family(config)
    return arch.titles.get(config.model_type or "", arch.title)
