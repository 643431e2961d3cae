"""The settings of one TTT layer, validated up front so a bad value fails before any compute."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

INNER_MODELS = ("linear", "mlp")
#: How the memory is written (``ttt.ttt_layer.rule``).
RULES = ("delta", "minibatch_gd")
#: Where the delta rule's chunks run (``ttt.ttt_layer.kernel``).
KERNELS = ("auto", "torch", "fla")
#: The settings each rule fills in where the config leaves them null: the delta rule writes every frame into a
#: plain associative memory; Sun et al. (2024)'s rule takes a gradient step per mini-batch through
#: f(x) = x + LN(g(x)).
RULE_DEFAULTS = {
    "delta": {"mini_batch_size": 1, "inner_norm": False, "inner_residual": False},
    "minibatch_gd": {"mini_batch_size": 16, "inner_norm": True, "inner_residual": True},
}
#: Where these settings live in the Hydra config: every error message names ``<CONFIG_KEY>.<field>``.
CONFIG_KEY = "ttt.ttt_layer"


def config_key(field: str) -> str:
    """The full Hydra key of a TTTConfig field, as a user types it on the command line."""
    return f"{CONFIG_KEY}.{field}"


def check_stage_mini_batch(stage_value: int | None, built: int, where: str) -> None:
    """The one rule for ``curriculum.stages.N.ttt_mini_batch_size``: null, or the size the TTT
    layers were built with (their per-position learning rates and cache_replacement's window are
    sized by it, so a stage cannot change it). ``where`` names the stage key or the layer."""
    if stage_value is not None and stage_value != built:
        raise ValueError(
            f"{where}={stage_value} differs from {config_key('mini_batch_size')}={built}: the TTT layers are "
            "built with one mini-batch size (per-position learning rates and cache_replacement's window are "
            "sized by it); set the same value or leave the stage's null"
        )


@dataclass
class TTTConfig:
    """Settings of the TTT layer in each selected Moshi layer (Sun et al., 2024, with the video-TTT guards).

    Field names are the keys under ``ttt.ttt_layer`` in the Hydra config (the config schema uses
    this class for that group, so its defaults are the only ones), and errors name them so.
    """

    rule: str = "delta"
    """How the memory is written. delta: the delta rule, one write per frame, S <- S + beta k (v - k^T S) with
    k = [key, 1] (DeltaNet, Yang et al. 2024), computed chunkwise (``moshi_ttt.ttt.delta``); a linear inner
    model, no inner LayerNorm, no residual, reads of only what was written. minibatch_gd: Sun et al. (2024)'s
    mini-batch gradient descent on f(x) = x + LN(g(x)), linear or MLP g, one step per mini_batch_size frames.
    Null settings below take the rule's own values (RULE_DEFAULTS)."""
    chunk_size: int = 64
    """delta: frames per chunk of the chunkwise engine (the outputs do not depend on it; T / chunk_size
    sequential steps of matmuls)."""
    decay: bool = False
    """delta: a learned per-frame decay of the memory, S <- a_t S + ..., a_t = exp(-softplus(x . w + c)) (the
    gated delta rule, Yang et al. 2025); c starts at -8 (a_t ~ 0.9997: a half-life of ~2000 frames)."""
    kernel: str = "auto"
    """delta: where the chunks run. torch: the plain-torch engine (fp32, every device); fla:
    flash-linear-attention's Triton kernels (CUDA, bf16 inputs, fp32 state; pip install -e ".[gpu]"); auto: fla
    where it applies (CUDA, fla imports, head_dim + 1 <= 256, read lag 0, no decay where Triton refuses its
    backward), torch elsewhere; the choice and its reason are logged once."""
    num_heads: int | None = None
    """TTT heads, each with its own fast weights; null: as many as the layer's attention heads (Moshi 7B: 32 of
    128, which fits flash-linear-attention's key-dim limit, and what init_from_attention copies;
    cache_replacement always has one per attention head)."""
    head_dim: int | None = None
    """Width of one head; null: the model width divided by num_heads."""
    inner: str = "linear"
    """Inner model f(x) = x + LN(g(x)): linear (g = W x + b) or mlp (W2 GELU(W1 x + b1) + b2)."""
    mlp_expansion: int = 4
    """Hidden width of the mlp inner model, as a multiple of head_dim."""
    mini_batch_size: int | None = None
    """Frames (80 ms each) per memory write; null: the rule's own (delta: 1, the only value it takes;
    minibatch_gd: 16 as in the TTT language models (Sun et al., 2024), for both inner models: the video model's
    64 for mlp would update the memory only every 5 s of conversation)."""
    base_lr: float = 1.0
    """Inner learning rate scale: delta: beta = base_lr * sigmoid(x . w + b) (keys are L2-normalised with a bias
    row, |k|^2 = 2, so base_lr = 1 keeps every write contractive); minibatch_gd: eta = base_lr * sigmoid(x . w + b)
    / head_dim. Then clamped to [eta_min, eta_max]."""
    eta_min: float = 0.0
    """Lower clamp of the inner learning rate eta."""
    eta_max: float = 1.0
    """Upper clamp of the inner learning rate eta."""
    per_position_lr: bool = True
    """minibatch_gd: learnable offsets on the 1/(i+1) weights of position i inside a mini-batch (the delta rule
    has no mini-batch: its per-frame step is the learned learning rate alone)."""
    gate_init: float = 0.1
    """The output is tanh(alpha) * TTT(x) with alpha per channel starting here, so Moshi starts near itself."""
    output_proj: bool = True
    """A learned output projection initialised at zero; without it num_heads * head_dim must equal the model width."""
    qk_l2_norm: bool = True
    """L2-normalise queries and keys per head (keeps the inner gradient bounded whatever the input scale)."""
    weight_norm_clip: float | None = None
    """Max Frobenius norm of each fast-weight tensor per sample and head after an update; null: no clipping."""
    checkpoint_group_size: int = 16
    """Mini-batches (minibatch_gd) or chunks (delta) per gradient-checkpoint group of the scan: the backward
    keeps a group's input state and tokens and recomputes the rest; 0: no checkpointing (needed only for a
    double backward through the layer; keeps every intermediate of the scan)."""
    nan_guard: bool = True
    """Raise an error naming the layer and the position as soon as an output or fast weight is NaN/Inf."""
    init_std: float = 0.02
    """Std of the normal init of projections and initial fast weights."""
    ln_eps: float = 1e-6
    """Epsilon of the per-head LayerNorm inside f."""
    inner_norm: bool | None = None
    """The per-head LayerNorm inside f, as in Sun et al. (2024): f(x) = x + LN(g(x)); null: the rule's own
    (minibatch_gd: true; delta: false, the only value it takes). false: f(x) = x + g(x)
    and a write is the delta rule (inner loss 0.5 ||g(k) - (v - k)||^2). LN makes each write's step scale
    with 1 / std(g(k)), so the first mini-batch written into near-zero fast weights swamps later ones:
    ``python bench/memory_capacity.py`` measures recall of pairs written into the bare memory."""
    inner_residual: bool | None = None
    """f(x) = x + ... as in Sun et al. (2024) (null: the rule's own; minibatch_gd: true; delta: false, the only
    value it takes): the inner loss reconstructs v - k from k, and a read returns the
    query plus the memory's part. false: f(x) = g(x) (or LN(g(x))), a plain associative memory that
    reconstructs v from k, as linear attention and DeltaNet do: a read returns only what was written (about 0
    where nothing matches), so a read used as an attention value (cache_replacement's kv_slots) is not
    dominated by the query itself while the writes are still partial."""

    def __post_init__(self) -> None:
        for key, allowed in (("rule", RULES), ("inner", INNER_MODELS), ("kernel", KERNELS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{config_key(key)}={getattr(self, key)!r} must be one of {allowed}")
        for key, value in RULE_DEFAULTS[self.rule].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.rule == "delta":
            self._check_delta()
        checks = {
            "num_heads": self.num_heads is None or self.num_heads >= 1,
            "head_dim": self.head_dim is None or self.head_dim >= 1,
            "mlp_expansion": self.mlp_expansion >= 1,
            "mini_batch_size": self.mini_batch_size >= 1,
            "base_lr": self.base_lr > 0,
            "eta_min": 0 <= self.eta_min <= self.eta_max,
            "eta_max": self.eta_max > 0,
            "weight_norm_clip": self.weight_norm_clip is None or self.weight_norm_clip > 0,
            "checkpoint_group_size": self.checkpoint_group_size >= 0,
            "init_std": self.init_std >= 0,
            "ln_eps": self.ln_eps > 0,
            "chunk_size": self.chunk_size >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{config_key(key)}={getattr(self, key)!r} is out of range")

    @classmethod
    def schema_default(cls) -> TTTConfig:
        """The config schema's default node, with the rule's settings still null: a user's
        ``ttt.ttt_layer.rule=...`` then fills them in when the composed config becomes a TTTConfig
        (a default instance would carry the default rule's values into the other rule)."""
        node = cls.__new__(cls)
        for f in fields(cls):
            setattr(node, f.name, f.default)
        return node

    @property
    def is_resolved(self) -> bool:
        """Whether the rule's own settings are filled in (every TTTConfig(...) is; ``schema_default`` is not)."""
        return all(getattr(self, key) is not None for key in RULE_DEFAULTS[self.rule])

    def resolved(self) -> TTTConfig:
        """This config with the rule's settings filled in (itself when they already are)."""
        return self if self.is_resolved else replace(self)

    def _check_delta(self) -> None:
        """The delta rule is one write per frame into a plain linear memory: refuse what only the
        mini-batch rule has, naming the key."""
        wrong = {
            "mini_batch_size": (self.mini_batch_size != 1, "1 (it writes every frame)"),
            "inner": (self.inner != "linear", "'linear' (its memory is a matrix)"),
            "inner_norm": (self.inner_norm, "false (its memory has no inner LayerNorm)"),
            "inner_residual": (self.inner_residual, "false (a read returns only what was written)"),
            "weight_norm_clip": (self.weight_norm_clip is not None,
                                 "null (its writes are bounded: beta * ||k||^2 <= 2 keeps the memory contractive)"),
        }
        for key, (is_wrong, allowed) in wrong.items():
            if is_wrong:
                raise ValueError(f"{config_key(key)}={getattr(self, key)!r} does not apply to {config_key('rule')}="
                                 f"'delta': set it to {allowed} or leave it null, or use rule=minibatch_gd")

    def for_attention(self, attention_heads: int) -> TTTConfig:
        """These settings in a layer whose attention has ``attention_heads`` heads (``num_heads`` null: as many)."""
        return self if self.num_heads is not None else replace(self, num_heads=int(attention_heads))

    def resolve_head_dim(self, dim: int) -> int:
        """The head width inside a layer of model width ``dim``."""
        if self.num_heads is None:
            raise ValueError(f"{config_key('num_heads')}=null means the attention's heads: build the layer through its "
                             "variant, or set it")
        if self.head_dim is not None:
            return self.head_dim
        if dim % self.num_heads:
            raise ValueError(
                f"{config_key('num_heads')}={self.num_heads} does not divide the model dim {dim}; "
                f"set {config_key('head_dim')}"
            )
        return dim // self.num_heads
