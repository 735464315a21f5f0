"""What each head score means, stated once: the command's --help, the JSON document and the
README (checked by a test) all read it from here. No NumPy: the command line imports it to
build its help and its --sort choices.

Notation: A is one head's pattern for one text, A[q, k] the weight query q gives key k; only real
positions count (pad queries and pad keys never do); "first" is the first real position, which
left padding moves; a causal row q has n_q = q + 1 allowed keys (counted from the first real one).
"""

from __future__ import annotations

# name → (formula, what it finds). The order is the order of every table, grid and JSON object.
DEFINITIONS: dict[str, tuple[str, str]] = {
    "previous_token": (
        "Σ_q A[q, q−1] / Σ A",
        "share of the head's attention on the position just before the query "
        "(TransformerLens detect_head, previous_token_head)"),
    "duplicate_token": (
        "Σ A[q, k] over k < q with token k = token q, / Σ A",
        "share on earlier copies of the query's own token "
        "(detect_head, duplicate_token_head)"),
    "induction": (
        "Σ A[q, k + 1] over k < q with token k = token q, / Σ A",
        "share on the token after an earlier copy of the query's token (detect_head, "
        "induction_head); with --repeat N: mean over the N second-half queries q of "
        "A[q, q − N + 1], the figure TransformerLens's demos report"),
    "first_token": (
        "mean_q A[q, first]",
        "mean weight on the first real position: an attention sink"),
    "self": (
        "mean_q A[q, q]",
        "mean weight of each query on itself (the diagonal)"),
    "entropy": (
        "mean_q −Σ_k A[q, k]·log₂ A[q, k]",
        "mean row entropy in bits: 0 when every query looks at one key, log₂ n_q when it "
        "spreads evenly"),
    "entropy_norm": (
        "mean_q (−Σ_k A[q, k]·log₂ A[q, k]) / log₂ n_q",
        "the same, each row divided by its largest possible value: 0 focused, 1 uniform; a row "
        "with one allowed key (n_q = 1: the first query under a causal mask) counts as 0, "
        "focused, since it has no choice"),
}
SCORES = tuple(DEFINITIONS)
SORTS = ("layer", *SCORES)  # --sort: in layer order, or by a score, highest first

NOTES = (
    "Σ A sums the whole pattern of the text (every real query row sums to 1, so it is the "
    "number of real tokens, the first query included), as TransformerLens's detect_head does "
    "(error_measure='mul', exclude_bos=False). Each score is computed for each text of a "
    "batch alone and then averaged over the texts. Under a causal mask the first query can "
    "only attend to itself: it adds 1/len to first_token and self, and 0 to entropy."
)


def help_text() -> str:
    """The definitions as the paragraphs of `attn heads --help`."""
    lines = [f"{name} = {formula}: {words}." for name, (formula, words) in DEFINITIONS.items()]
    return "\n\n".join([*lines, NOTES])
