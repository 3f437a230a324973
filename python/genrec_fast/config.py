"""Model and training configuration: dataclasses and the named presets (recommended, codes, tiny, small, base)."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    """A BART-style encoder-decoder with GenRec's ID embeddings."""

    vocab_size: int = 1000  # sentencepiece vocabulary (set from the trained tokenizer)
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 512
    max_positions: int = 256  # encoder/decoder window in pieces
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False  # BART-base does not scale token embeddings
    encoder_positions: str = "start"  # count encoder positions from the first piece (BART) or from the "end"
    encoder_causal: bool = False  # each encoder piece sees only the pieces before it: finetuning then
    # trains every next-item target of a sequence in one pass (see prefix_batch.py)
    item_eos: bool = True  # the decoder learns EOS after an item; False (item tokens only) trains one
    # decoder step per target and scores an item by its token alone (EOS counts as certain)
    item_id_embed: bool = True  # add the item ID embedding to every piece of an item (GenRec); False keeps
    # that table at zero, untrained: an item is its tokens alone (with one token per item, the token table
    # is then both input and output embedding, tied as in SASRec)
    leaf_head: bool = False  # codes without EOS: score the last, unique-making code token with the item's own
    # ID embedding, over the items of its leaf only (leaf_head.py), instead of as a leaf-local index token
    # whose output vector every leaf shares
    history_bias: bool = False  # add learned offsets to the logits of the user's own history items (a recency
    # term + a pointer score; history_bias.py), so repeats can be ranked up or down: one-token items, or
    # codes with the leaf head (at every code step)
    transition_bias: bool = False  # add learned offsets to the logits of the items that followed the user's
    # last `transition_context` items in the training sequences (co-occurrence counts, their
    # `transition_neighbors` most frequent successors each; transition_bias.py): one-token items, or codes with
    # the leaf head (at every code step, as the history bias)
    transition_context: int = 3
    transition_neighbors: int = 50
    transition_reverse: bool = False  # with transition_bias: also the `transition_neighbors` most frequent
    # predecessors of each context item, with weights of their own (orderless visits: Yelp)
    n_users: int = 0  # rows of the user ID table (0 = padding/unknown user)
    n_items: int = 0  # rows of the item ID table (0 = padding/unknown item)
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "n_heads", "ffn_dim",
                     "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.encoder_positions not in ("start", "end"):
            raise ValueError(f"encoder_positions must be 'start' or 'end', got {self.encoder_positions!r}")
        if self.leaf_head and (self.item_eos or not self.item_id_embed):
            raise ValueError("model.leaf_head needs model.item_eos=False (the item's last token is the last step) "
                             "and model.item_id_embed=True (the leaf's items are scored with their ID embeddings)")
        if self.history_bias and self.item_eos:
            raise ValueError("model.history_bias needs model.item_eos=False (items of one token, scored at one step)")
        if self.transition_bias and (self.item_eos or self.encoder_causal):
            raise ValueError("model.transition_bias needs items without an EOS step (one token each, or codes with "
                             "the leaf head): model.item_eos=False and model.encoder_causal=False")
        if self.transition_reverse and not self.transition_bias:
            raise ValueError("model.transition_reverse needs model.transition_bias=True")
        if self.transition_context < 1 or self.transition_neighbors < 1:
            raise ValueError(f"model.transition_context and model.transition_neighbors: expected >= 1, got "
                             f"{self.transition_context!r} and {self.transition_neighbors!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


SOFTMAXES = ("auto", "full", "sampled")
LARGE_CATALOG = 100_000  # items from which the "auto" settings switch to their catalog-scale form (for_catalog)


@dataclass
class TrainConfig:
    """Masked item prediction: pretraining epochs, then next-item finetuning epochs."""

    pretrain_epochs: int = 2
    finetune_epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    pretrain_last_prob: float = 0.3  # pretraining masks the last item this often (as in the paper's code)
    drop_user_prob: float = 0.2  # train without the user token this often, so unknown users work (1 = never)
    cloze_mix: float = 0.0  # finetuning also masks a random item (pretraining's task) this often per training item
    history_drop: float = 0.0  # finetuning drops each history item this often (afresh every epoch; one stays)
    history_reorder: float = 0.0  # finetuning shuffles a random stretch of this share of each history (afresh every epoch)
    mask_seen: bool = False  # softmax without the input's own items (data without repeats; use exclude_seen)
    softmax: str = "auto"  # the training softmax: over every token ("full"), or "sampled": over the
    # batch's targets plus num_negatives uniform item draws (log-Q corrected), with lazy (sparse) Adam updates
    # of the token, item and user tables (no weight decay on them): a step's cost stops growing with the
    # catalog. Needs one token per target: tokenizer.item_tokens="whole", model.item_eos=False. With the history /
    # transition bias each row's biased items are classes of its softmax too (loss.sampled_cross_entropy).
    # "auto": sampled from LARGE_CATALOG items where the configuration allows it, else full (for_catalog)
    num_negatives: int = 1024  # uniform item draws per batch with softmax="sampled"
    sparse_tables: bool | None = None  # the item and user ID tables take sparse gradients and a lazy SparseAdam (no
    # weight decay on them), as softmax="sampled" does: a step updates its batch's rows, not the whole table (the
    # codes preset at 1M items: 302-405 -> 64-99 ms a step on 2 cores). For the full softmax's models, e.g. codes
    # with the leaf head; not with item_aux (a softmax over every item vector). None: on from LARGE_CATALOG
    # items without item_aux (for_catalog)
    max_items: int = 20  # history window in items
    label_smoothing: float = 0.0
    leaf_smoothing: float | None = None  # with model.leaf_head: label smoothing of the leaf softmax over a
    # leaf's items (None = label_smoothing). A flat softmax smoothed by e puts ~e * leaf / catalog on a
    # leaf's other items, so ~0 matches one-token training; the cluster steps keep label_smoothing
    item_aux: float = 0.0  # with model.leaf_head: weight of an auxiliary softmax over all items at the first
    # decoder step (h_0 . e_item, the one-token model's task): every step's gradient reaches every item
    # vector, not only the target leaf's. Costs a catalog-wide softmax per target in training (not decoding)
    eval_every: int = 1  # epochs between validations
    eval_from: int = 0  # epochs trained before the first validation (the last epoch is always validated);
    # skips validations whose checkpoint would not be kept anyway: training itself does not change
    eval_users: int = 2000  # validation users sampled for periodic validation (0 = all)
    patience: int = 3  # finetuning epochs without a validation NDCG@10 gain over the best finetuning epoch before
    # stopping (pretraining epochs never count; the kept `best` is the best validated epoch of either phase)
    ema_decay: float = 0.0  # validate and keep an exponential moving average of the weights (0 = off;
    # e.g. 0.999 averages over ~1,000 steps); training itself runs on the raw weights
    max_minutes: float = 0.0  # time budget of a run (0 = none): no epoch starts that would end past it,
    # judged by the last epoch's duration (validation and checkpoints included), and an epoch still running
    # when it passes (the first, or a slower one) stops at that step, is validated and counts as done
    budget_schedule: bool = False  # with max_minutes: the cosine decay ends where the budget is expected to
    # end (re-planned after every epoch: the whole epochs that fit at the last epoch's seconds per step),
    # not after the last scheduled epoch, so a run the budget cuts still anneals its learning rate
    calibrate: bool = False  # after training: one factor per bias (history, transition, reverse), fitted on all
    # validation targets (up to 50,000 users; a codes model: 6,000 of them, decoded), scales the kept model's
    # bias weights if it gains on held-out users (calibrate.py)
    num_beams: int = 20
    seed: int = 0
    threads: int = 0  # torch threads (0 = library default)
    tf32: bool = True  # on CUDA, float32 matmuls on TF32 tensor cores while training (10-bit mantissa;
    # the base config's H100 epoch: ~33 s instead of ~42 s); evaluation after training runs in full fp32

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.pretrain_epochs < 0 or self.finetune_epochs < 0 or self.eval_users < 0:
            raise ValueError(f"train.batch_size must be >= 1 and train.pretrain_epochs, train.finetune_epochs and "
                             f"train.eval_users >= 0, got {self.batch_size!r}, {self.pretrain_epochs!r}, "
                             f"{self.finetune_epochs!r} and {self.eval_users!r}")
        if not self.lr >= 0:
            raise ValueError(f"train.lr must be >= 0, got {self.lr!r}")
        for name in ("max_items", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.patience < 1:
            raise ValueError(f"train.patience must be >= 1 (finetuning epochs without a gain before stopping; a value "
                             f"above train.finetune_epochs never stops early), got {self.patience!r}")
        for name in ("weight_decay", "warmup_steps", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("drop_user_prob", "pretrain_last_prob", "cloze_mix", "history_drop", "history_reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay!r}")
        if self.eval_from < 0 or self.eval_every < 1:
            raise ValueError(f"train.eval_from must be >= 0 and train.eval_every >= 1, got "
                             f"{self.eval_from!r} and {self.eval_every!r}")
        if self.max_minutes < 0:
            raise ValueError(f"train.max_minutes must be >= 0 (0 = no budget), got {self.max_minutes!r}")
        if self.budget_schedule and not self.max_minutes:
            raise ValueError("train.budget_schedule fits the learning-rate decay to train.max_minutes; set "
                             "train.max_minutes > 0 with it")
        if self.softmax not in SOFTMAXES:
            raise ValueError(f"train.softmax must be one of {SOFTMAXES}, got {self.softmax!r}")
        for name in ("label_smoothing", "leaf_smoothing"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {value!r}")
        if self.item_aux < 0:
            raise ValueError(f"train.item_aux must be >= 0 (0 = off), got {self.item_aux!r}")
        if self.item_aux and self.sparse_tables:
            raise ValueError("train.sparse_tables: item_aux scores every item vector each step (a dense gradient); "
                             "set train.item_aux=0 with it")
        if self.num_negatives < 0:
            raise ValueError(f"train.num_negatives must be >= 0, got {self.num_negatives!r}")

    @property
    def uses_user_token(self) -> bool:
        """False when training never writes the user token: such a model must ignore user ids."""
        return self.drop_user_prob < 1.0


@dataclass
class TokenizerConfig:
    vocab_size: int = 1000  # sentencepiece BPE vocabulary size
    item_tokens: str = "pieces"  # items as sub-word pieces (the paper), "whole" (one token per item) or
    # "codes": collaborative codes learned from the training interactions (collab_codes.py)
    code_levels: int = 2  # "codes": cluster levels before the last, unique-making token
    code_branches: int = 32  # "codes": values per cluster level (a power of two)
    max_leaf: int = 0  # "codes": code_branches doubles until the mean leaf holds at most this many items
    # (n_items / code_branches ** code_levels; 0 = code_branches as given), so a preset scales with the catalog
    code_dim: int = 32  # "codes": dimensions of the spectral item embedding that is clustered
    code_window: int = 3  # "codes": items at most this far apart in a sequence count as co-occurring
    code_input: str = "all"  # "codes": the encoder reads "all" code tokens of an item (one position each)
    # or only the "first" (one position per item; the ID embedding tells items apart)
    code_vectors: str = ""  # "codes": cluster the item vectors of this one-token checkpoint, trained on the same
    # data (use its `last` weights: chosen by no validation), instead of the co-occurrence embedding

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"tokenizer.vocab_size must be >= 1, got {self.vocab_size!r}")
        if self.item_tokens not in ("pieces", "whole", "codes"):
            raise ValueError(f"tokenizer.item_tokens must be 'pieces', 'whole' or 'codes', got {self.item_tokens!r}")
        if self.code_input not in ("all", "first"):
            raise ValueError(f"tokenizer.code_input must be 'all' or 'first', got {self.code_input!r}")
        if self.code_branches < 2 or self.code_branches & (self.code_branches - 1):
            raise ValueError(f"tokenizer.code_branches must be a power of two >= 2, got {self.code_branches!r}")
        if self.max_leaf < 0:
            raise ValueError(f"tokenizer.max_leaf must be >= 0 (0 = code_branches as given), got {self.max_leaf!r}")
        for name in ("code_levels", "code_dim", "code_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"tokenizer.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class Preset:
    """A whole configuration: the model, its training and its tokenizer (`preset(name)`, `load_config`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


PRESETS = ("tiny", "small", "base", "recommended", "codes")

# `small` plus these: the configuration the README recommends, as configs/whole-history-transition-both-calibrated.json
# records it with its measured numbers (tests/test_config.py keeps the two equal). One token per item, no EOS step,
# the history and transition biases (both directions), calibrated on the validation targets after training.
RECOMMENDED = {
    "model.d_model": 64, "model.ffn_dim": 256, "model.n_heads": 2, "model.dropout": 0.2,
    "model.encoder_positions": "end", "model.item_eos": False, "model.history_bias": True,
    "model.transition_bias": True, "model.transition_reverse": True,
    "train.pretrain_epochs": 3, "train.finetune_epochs": 30, "train.drop_user_prob": 1.0, "train.patience": 8,
    "train.label_smoothing": 0.3, "train.eval_users": 6000, "train.history_drop": 0.3, "train.calibrate": True,
    "tokenizer.item_tokens": "whole",
}

# `recommended` with items as collaborative codes (one cluster level of 128 + a leaf token, the leaf head): the fast
# form at a million items and a cascade's retriever, as configs/beauty-codes-leaf-l1-history-transition-both-
# calibrated.json records it (tests/test_config.py keeps the two equal). 128 clusters suit catalogs of ~10k items
# (leaves of ~95 on Beauty, ~157 on Yelp); max_leaf doubles them on larger catalogs: 8,192 at a million items.
CODES = {"model.leaf_head": True, "tokenizer.item_tokens": "codes", "tokenizer.code_levels": 1,
         "tokenizer.code_branches": 128, "tokenizer.max_leaf": 192, "tokenizer.code_input": "first"}


def preset(name: str) -> Preset:
    """Named configurations: `tiny` (tests), `small` (CPU; items as sub-word pieces, the paper's form), `base`
    (BART-base dimensions), `recommended` (`small` + RECOMMENDED: one token per item with the biases), `codes`
    (`recommended` + CODES: items as collaborative codes)."""
    if name == "recommended":
        return with_overrides(preset("small"), RECOMMENDED)
    if name == "codes":
        return with_overrides(preset("recommended"), CODES)
    if name == "tiny":
        return Preset(
            ModelConfig(d_model=32, encoder_layers=1, decoder_layers=1, n_heads=2, ffn_dim=64, max_positions=128),
            TrainConfig(pretrain_epochs=1, finetune_epochs=2, batch_size=32, warmup_steps=10, eval_users=200),
            TokenizerConfig(vocab_size=300),
        )
    if name == "small":
        return Preset(
            ModelConfig(d_model=128, encoder_layers=2, decoder_layers=2, n_heads=4, ffn_dim=512),
            TrainConfig(),
            TokenizerConfig(vocab_size=1000),
        )
    if name == "base":
        return Preset(
            ModelConfig(d_model=768, encoder_layers=6, decoder_layers=6, n_heads=12, ffn_dim=3072, max_positions=1024),
            TrainConfig(lr=1e-4, batch_size=64, warmup_steps=1000, finetune_epochs=20),
            TokenizerConfig(vocab_size=8000),
        )
    raise ValueError(f"config: unknown preset {name!r}; expected one of {PRESETS}")


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "tokenizer": TokenizerConfig}


def sampled_softmax_needs(p: Preset) -> list[str]:
    """What the configuration lacks for train.softmax='sampled' (one item token per target), as field names."""
    needs = [(p.tokenizer.item_tokens == "whole", "tokenizer.item_tokens='whole' (one token per item)"),
             (not p.model.item_eos, "model.item_eos=False (no EOS step after the item)"),
             (not p.model.encoder_causal, "model.encoder_causal=False (one target per example)"),
             (not p.train.mask_seen, "train.mask_seen=False (the seen items' mask is a full-softmax option)")]
    return [what for ok, what in needs if not ok]


def for_catalog(p: Preset, n_items: int, large: int = LARGE_CATALOG) -> Preset:
    """p with its catalog-dependent settings fixed for a catalog of n_items: train.softmax "auto" becomes
    "sampled" from `large` items where the configuration allows it (else "full"), train.sparse_tables None
    becomes True from `large` items without item_aux (values set explicitly stay), and, at any size,
    tokenizer.code_branches (set or not) doubles while the mean leaf (n_items / code_branches ** code_levels)
    holds more than tokenizer.max_leaf items (max_leaf 0 keeps it)."""
    t, tok = p.train, p.tokenizer
    big = n_items >= large
    softmax = t.softmax
    if softmax == "auto":
        softmax = "sampled" if big and not sampled_softmax_needs(p) else "full"
    sparse = t.sparse_tables if t.sparse_tables is not None else big and not t.item_aux
    sparse = sparse or softmax == "sampled"  # (the sampled softmax always updates its tables sparsely)
    branches = tok.code_branches
    if tok.item_tokens == "codes" and tok.max_leaf:
        while n_items > tok.max_leaf * branches ** tok.code_levels:
            branches *= 2
    return Preset(p.model, dataclasses.replace(t, softmax=softmax, sparse_tables=sparse),
                  dataclasses.replace(tok, code_branches=branches))


def load_config(name_or_path: str) -> Preset:
    """A preset name, or a JSON file {"preset": name, "model": {...}, "train": {...}, "tokenizer": {...}}
    whose sections override the preset's fields ("preset" defaults to "recommended", the CLI's default; other
    top-level keys, such as notes, are ignored unless they look like a misspelled section)."""
    if name_or_path in PRESETS:
        return preset(name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"config: {name_or_path!r} is neither a preset {PRESETS} nor a JSON file")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config: {path} is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"config: {path} holds a JSON {type(spec).__name__}; expected an object "
                         '{"preset": NAME, "model": {...}, "train": {...}, "tokenizer": {...}}')
    if "members" in spec:
        m = spec["members"]
        raise ValueError(f"config: {path} describes an ensemble of configs/{m['config']} trained with the seeds "
                         f"{m['seeds']}: train it once per seed (--set train.seed=S), then score the runs together "
                         "with `genrec-fast report CHECKPOINT ...` (its \"command\" field has both steps)")
    for key, value in spec.items():
        close = difflib.get_close_matches(key, list(SECTIONS), 1, 0.7)
        if key not in SECTIONS and isinstance(value, dict) and close:
            raise ValueError(f"config: {path} has a section {key!r}; did you mean {close[0]!r}? (sections: "
                             f"{sorted(SECTIONS)})")
        if key in SECTIONS and not isinstance(value, dict):
            raise ValueError(f"config: {path}: {key!r} must be an object of fields, got {value!r}")
    out = preset(spec.get("preset", "recommended"))
    for section in SECTIONS:
        out = with_overrides(out, {f"{section}.{k}": v for k, v in spec.get(section, {}).items()})
    return out


def with_overrides(p: Preset, overrides: dict) -> Preset:
    """Overrides {"train.lr": 1e-3, ...}: unknown sections or fields raise ValueError."""
    changes: dict = {name: {} for name in SECTIONS}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"config: unknown section in {key!r}; expected one of {sorted(SECTIONS)}")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if name not in fields:
            raise ValueError(f"config: {section} has no field {name!r}; expected one of {sorted(fields)}")
        changes[section][name] = _typed(key, _FIELD_TYPES[section][name], value)
    # one replace per section: fields checked together (d_model and n_heads) may change in any order
    return Preset(**{name: dataclasses.replace(getattr(p, name), **changes[name]) for name in SECTIONS})


_KINDS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
_FIELD_TYPES = {section: {f.name: str(f.type) for f in dataclasses.fields(cls)} for section, cls in SECTIONS.items()}


def _typed(key: str, annotation: str, value):
    """value as the field's annotation ("float", "float | None", ...) wants it (an int for a float becomes a
    float); raises ValueError naming the field otherwise (true is no int, 3 no string)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return value
    for kind in kinds:
        if kind in _KINDS and isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool)):
            return float(value) if kind == "float" else value
    raise ValueError(f"config: {key} expects {' or '.join(kinds)}, got {value!r} ({type(value).__name__})")


def checked(p: Preset) -> Preset:
    """p checked as a whole before a run: each section of its class, every field of its type (`_typed`), no
    attribute that is not a field (a typo set on the object: `p.train.max_minuts = 1`), and each section's own
    checks, which a field assigned after construction skipped."""
    if not isinstance(p, Preset):
        hint = f" (preset({p!r}) or load_config({p!r}) makes one)" if isinstance(p, str) else ""
        raise TypeError(f"preset: expected a genrec_fast.Preset{hint}, got {type(p).__name__}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = getattr(p, name)
        if not isinstance(section, cls):
            raise TypeError(f"preset.{name}: expected a {cls.__name__}, got {type(section).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        extra = sorted(set(vars(section)) - set(fields))
        if extra:
            raise ValueError(f"config: {name} has no field {extra[0]!r}; expected one of {sorted(fields)}")
        sections[name] = cls(**{f: _typed(f"{name}.{f}", _FIELD_TYPES[name][f], getattr(section, f)) for f in fields})
    return Preset(**sections)


def parse_override(text: str) -> tuple[str, object]:
    """`section.field=value` (value parsed as JSON where it can be, else kept as a string)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"--set: expected section.field=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def model_config_from_dict(d: dict) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"model config: unknown keys {sorted(unknown)}")
    return ModelConfig(**d)
