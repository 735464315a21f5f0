"""A GPT-2 checkpoint whose heads' roles are known by construction: every weight written by hand.

The residual stream is cut into 64-wide blocks, each a different feature:

    P  [0, 64)    the position: p_i = s·(e_i − e_{32+i}), 32 orthogonal codes, mean 0
    T  [64, 128)  the token: a random code per id (fixed seed), mean 0, the same norm as p
    S  [128, 192) "my previous token": written by L0H0, read by L1H0
       [192, 384) unused

With mean-0 features of constant norm, LayerNorm (w = 1, b = 0) is a fixed scale, so each head
is a bilinear form on known features (d_head = 96 = 64 for a token code + 32 for a position):

    L0H0 previous token  q = P,  k = P shifted one position: q_i·k_j peaks at j = i − 1;
                         V = T, written into S: after layer 0, S_i ≈ T_{i−1}
    L0H1 first token     q = a constant (b_Q), k = P's first code: peaks at the first position
    L0H2 self            q = P, k = P: peaks at j = i
    L0H3, L1H2, L1H3     all zero: uniform over the allowed keys (entropy_norm → 1)
    L1H0 induction       q = T, k = S: peaks where the previous token is the query's token,
                         i.e. the token after an earlier copy (the two-layer induction circuit)
    L1H1 duplicate token q = T + P, k = T − P: the same token elsewhere, its own position pushed
                         away

MLPs and output biases are zero, so the residual carries exactly these features. Scores: each
softmax peak is ≥ 12 nats above any other key (the margins are worked out below), so a known
head puts ≥ 0.99 of a row's weight where it should.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

D_MODEL, HEADS, LAYERS, N_CTX, VOCAB = 384, 4, 2, 32, 50257
D_HEAD = D_MODEL // HEADS  # 96
S_POS = 8.0  # p_i = S_POS·(e_i − e_{32+i}): ‖p‖² = 128
P, T, S = slice(0, 64), slice(64, 128), slice(128, 192)
# LayerNorm of a mean-0 row is x / ‖x‖·√d_model: before layer 0 ‖x‖² = ‖p‖² + ‖t‖² = 256; before
# layer 1 S adds ‖t‖² = 128 more.
LN0 = np.sqrt(D_MODEL / 256)
LN1 = np.sqrt(D_MODEL / 384)
ROLES = {"previous_token": (0, 0), "first_token": (0, 1), "self": (0, 2),
         "induction": (1, 0), "duplicate_token": (1, 1)}
UNIFORM = [(0, 3), (1, 2), (1, 3)]


def token_codes(seed: int = 0) -> np.ndarray:
    """[VOCAB, 64] random codes, mean 0 within the row, ‖t‖² = 128 like the position codes."""
    t = np.random.default_rng(seed).standard_normal((VOCAB, 64))
    t -= t.mean(axis=1, keepdims=True)
    return t / np.linalg.norm(t, axis=1, keepdims=True) * np.sqrt(128)


def position_codes() -> np.ndarray:
    wpe = np.zeros((N_CTX, D_MODEL))
    for i in range(N_CTX):
        wpe[i, i], wpe[i, 32 + i] = S_POS, -S_POS
    return wpe


def _pos_to_head(shift: int = 0) -> np.ndarray:
    """[64, 32]: P's code of position i → e_{i + shift} of a 32-dim head slice (÷ S_POS·2)."""
    m = np.zeros((64, 32))
    for i in range(32 - shift):
        m[i, i + shift] = 0.5 / S_POS
        m[32 + i, i + shift] = -0.5 / S_POS
    return m


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under Hugging Face GPT2Model names (Conv1D: [in, out])."""
    d, dh = D_MODEL, D_HEAD
    out: dict[str, np.ndarray] = {}
    wte = np.zeros((VOCAB, d))
    wte[:, T] = token_codes(seed)
    out["wte.weight"] = wte
    out["wpe.weight"] = position_codes()
    sqrt_dh = np.sqrt(dh)
    for layer in range(LAYERS):
        W = {n: np.zeros((d, d)) for n in "QKVO"}
        b_Q = np.zeros(d)
        ln = LN0 if layer == 0 else LN1

        def head(h: int) -> slice:
            return slice(h * dh, (h + 1) * dh)

        if layer == 0:
            # A position code read through LayerNorm is ln·p; _pos_to_head turns it into ln·e_i.
            # Scores below are (gain)·ln²·(e_i·e_j)/√d_head; gain 16·√d_head/ln² makes the peak 16
            # and every other key 0: a margin of 16 nats.
            gain = 16 * sqrt_dh / ln**2
            h0, h1, h2 = head(0), head(1), head(2)
            W["Q"][P, h0.start:h0.start + 32] = _pos_to_head() * gain
            W["K"][P, h0.start:h0.start + 32] = _pos_to_head(shift=1)  # key j → e_{j+1}
            W["V"][T, h0.start:h0.start + 64] = np.eye(64)  # the value: the key's token code
            W["O"][h0.start:h0.start + 64, S] = np.eye(64) / ln  # undo LN's scale: S = T_{i−1}
            # First token: a constant query against the key of position 0 only.
            b_Q[h1.start] = 16 * sqrt_dh / ln
            W["K"][P, h1.start] = _pos_to_head()[:, 0]
            W["Q"][P, h2.start:h2.start + 32] = _pos_to_head() * gain
            W["K"][P, h2.start:h2.start + 32] = _pos_to_head()
        else:
            # Token codes are random: t_i·t_j is 128 for the same id, else N(0, 128²/64) (σ = 16,
            # so below 5σ = 80 for all but 1 in 3·10⁶ pairs). gain·ln²·(128 − 80)/√d_head ≥ 12 nats.
            gain = 12 * sqrt_dh / (ln**2 * 48)
            h0, h1 = head(0), head(1)
            W["Q"][T, h0.start:h0.start + 64] = np.eye(64) * gain
            W["K"][S, h0.start:h0.start + 64] = np.eye(64)
            W["Q"][T, h1.start:h1.start + 64] = np.eye(64) * gain
            W["K"][T, h1.start:h1.start + 64] = np.eye(64)
            # Its own position: −(twice the same-token score), so self loses to an earlier copy.
            push = 2 * 128 * gain
            W["Q"][P, h1.start + 64:h1.start + 96] = _pos_to_head() * push
            W["K"][P, h1.start + 64:h1.start + 96] = -_pos_to_head()
        b = f"h.{layer}"
        out[f"{b}.ln_1.weight"], out[f"{b}.ln_1.bias"] = np.ones(d), np.zeros(d)
        out[f"{b}.ln_2.weight"], out[f"{b}.ln_2.bias"] = np.ones(d), np.zeros(d)
        out[f"{b}.attn.c_attn.weight"] = np.concatenate([W["Q"], W["K"], W["V"]], axis=1)
        out[f"{b}.attn.c_attn.bias"] = np.concatenate([b_Q, np.zeros(2 * d)])
        out[f"{b}.attn.c_proj.weight"], out[f"{b}.attn.c_proj.bias"] = W["O"], np.zeros(d)
        out[f"{b}.mlp.c_fc.weight"] = np.zeros((d, 4 * d))
        out[f"{b}.mlp.c_fc.bias"] = np.zeros(4 * d)
        out[f"{b}.mlp.c_proj.weight"] = np.zeros((4 * d, d))
        out[f"{b}.mlp.c_proj.bias"] = np.zeros(d)
    out["ln_f.weight"], out["ln_f.bias"] = np.ones(d), np.zeros(d)
    return {k: v.astype(np.float32) for k, v in out.items()}


def save(directory: Path, seed: int = 0) -> Path:
    """Write config.json and model.safetensors, as save_pretrained lays them out."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_embd": D_MODEL, "n_head": HEADS, "n_layer": LAYERS,
        "n_positions": N_CTX, "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new"}))
    save_file(weights(seed), str(directory / "model.safetensors"))
    return directory
