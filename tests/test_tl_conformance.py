"""TransformerLens' own demo notebooks, ported cell by cell (issue 24).

The four notebooks of the TransformerLens repository (``demos/Main_Demo.ipynb``,
``Exploratory_Analysis_Demo.ipynb``, ``Activation_Patching_in_TL_Demo.ipynb``,
``Attribution_Patching_Demo.ipynb``) run here as test code against both flavours, on the TL
path the installed TransformerLens offers: TL 3.x drives :class:`HookedAttnResTransformer`
(``from_pretrained`` with TL's processing keywords), TL 4.x drives the ``TransformerBridge``
that ``boot_transformers`` builds (``enable_compatibility_mode``). CI runs this file under both.

Each ``cell_*`` function is one notebook cell: its TL calls are the notebook's, with only the
model loading, the prompts (byte-level: one-byte answers) and the shape constants (layers,
heads) changed. Every number the cell prints is checked against a hand computation on an
unprocessed :class:`HookedAttnResTransformer` of the same checkpoint (``run_with_hooks``,
frozen norm scales, the routing masses), so a cell ends in one of

- ``ok``: it ran and every number equals the hand computation;
- ``refused``: it raised an error that names the flavour (or the model's property) and the
  call to use instead (the contract, ``docs/hooks.md``);
- ``unclear``: it raised anything else (a bare ``KeyError``, ``AttributeError``, ...);
- ``wrong``: a number differs from the hand computation (an ``AssertionError``).

``EXPECTED`` is the table of outcomes; each test asserts its cell's outcome is the expected one
(only ``ok`` and ``refused`` appear), and ``docs/hooks.md``'s "TL tools" table is rendered from
``EXPECTED`` (``python tools/tl_conformance_table.py``; ``test_docs_table_is_generated_from_the_suite``
checks it). ``ATTNRES_TL_TALLY=file.json`` writes the observed outcomes (the issue's tally).
"""

from __future__ import annotations

import json
import os
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from reference import tiny_attnres

from attnres_lens import HookedAttnResTransformer
from attnres_lens.compat import TL_MAJOR, ActivationCache, HookPoint, get_act_name, patching

ROOT = Path(__file__).resolve().parents[1]
PATH = "bridge" if TL_MAJOR >= 4 else "hooked"
TOL = 1e-4
NOTEBOOKS = ("Main_Demo", "Exploratory_Analysis_Demo", "Activation_Patching_in_TL_Demo", "Attribution_Patching_Demo")

# prompts: the notebooks' IOI prompts with one-letter names (one byte is one token here, so the
# answer is the letter after "to ")
PROMPTS = [
    "J met M, J gave it to ",
    "J met M, M gave it to ",
    "T met S, S gave it to ",
    "T met S, T gave it to ",
]
ANSWERS = [("M", "J"), ("J", "M"), ("T", "S"), ("S", "T")]
# the patching notebooks' clean/corrupted pair, short (each position is patched on its own)
PATCH_PROMPTS = ["J M J ", "J M M "]


# ============================================================================ fixtures
class Lab:
    """One flavour's notebook model (``model``, on this TL path) and the unprocessed reference
    (``ref``) the hand computations run on, over one checkpoint."""

    def __init__(self, flavour: str, directory: Path):
        self.flavour = flavour
        source = tiny_attnres(flavour, n_layers=2, n_blocks=2, seed=3, query_scale=1.0, d_vocab=256)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():  # norm gains away from 1, so that folding is not a no-op
            for name, param in source.named_parameters():
                if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
        source.save_pretrained(directory)
        self.directory = directory
        self.ref = HookedAttnResTransformer.from_pretrained(directory)
        self.model = load_notebook_model(directory)
        self.n_layers, self.n_heads = self.ref.cfg.n_layers, self.ref.cfg.n_heads
        self.hand: dict = {}  # hand computations shared by cells
        answers = answer_ids(self.ref)[:1]
        clean, corrupted = tokens_of(PATCH_PROMPTS[:1]), tokens_of(PATCH_PROMPTS[1:2])
        with torch.no_grad():  # the patching metrics' denominator
            self.scale = float(logit_diff(self.ref(clean), answers) - logit_diff(self.ref(corrupted), answers))
        assert abs(self.scale) > 1e-2, "the patching prompts must separate clean from corrupted"


#: The weight processing the notebooks' loading asks for, where it is exact here (TL's default
#: also centres the writing weights, which RMSNorm models refuse: ``cell_load_processed``).
PROCESSING = dict(fold_ln=True, center_unembed=True)


def load_notebook_model(directory: Path, **processing):
    """The notebooks' model loading, on this TL path (the one line the port changes)."""
    processing = processing or PROCESSING
    if PATH == "hooked":  # HookedTransformer.from_pretrained(name) processes weights by default
        return HookedAttnResTransformer.from_pretrained(directory, **processing)
    from transformer_lens.model_bridge import TransformerBridge

    from attnres_lens.tokenizer import hf_byte_tokenizer

    bridge = TransformerBridge.boot_transformers(str(directory), device="cpu", tokenizer=hf_byte_tokenizer())
    bridge.enable_compatibility_mode(disable_warnings=True, **processing)
    return bridge


@pytest.fixture(scope="module", params=["kimi", "cumulative"])
def lab(request, tmp_path_factory):
    torch.manual_seed(0)
    return Lab(request.param, tmp_path_factory.mktemp(request.param))


def tokens_of(texts):
    return torch.tensor([list(t.encode()) for t in texts])


def answer_ids(model):
    return torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])


def logit_diff(logits, answers):
    last = logits[:, -1]
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()


def final_read(ref, cache):
    """What ``ln_final`` reads (the hand computations' residual): the final router's output
    (kimi) or the stream after the last block (cumulative)."""
    if ref.cfg.flavour == "kimi":
        return cache["final_router.hook_out"]
    return cache[f"blocks.{ref.cfg.n_layers - 1}.hook_resid_post"]


def frozen_dla(ref, cache, vectors, answers):
    """Direct logit attribution of ``vectors`` ``[..., batch, d_model]`` (final position) to the
    mean logit difference, through ``ln_final`` with its scale frozen at the clean run's."""
    scale = cache["ln_final.hook_scale"][:, -1]
    directions = ref.W_U[:, answers[:, 0]] - ref.W_U[:, answers[:, 1]]  # [d_model, batch]
    gain = ref.ln_final.weight
    return ((vectors / scale) * gain * directions.T).sum(-1).mean(-1)


def close(a, b, tol=TOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * scale if a.numel() else a.shape == b.shape


# ============================================================================ outcomes
def is_clear_refusal(error: BaseException) -> bool:
    """The contract's refusal: a ValueError/KeyError/NotImplementedError whose message names the
    model's property (flavour, BOS, norm) and what to use instead."""
    if not isinstance(error, (ValueError, KeyError, NotImplementedError)):
        return False
    text = str(error.args[0]) if error.args else ""
    names_why = any(w in text for w in ("kimi", "cumulative", "AttnRes", "BOS", "RMSNorm", "QK-norm", "grouped-query"))
    names_way = any(w in text for w in ("use ", "Use ", "Pass ", "pass ", "call ", "attnres_lens."))
    return names_why and names_way


def outcome(cell, lab) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cell(lab)
    except AssertionError as error:
        return "wrong", str(error).splitlines()[0][:200] if str(error) else "a number differs"
    except Exception as error:  # noqa: BLE001 - classifying every other outcome is the point
        text = (str(error.args[0]) if error.args else repr(error)).splitlines()[0]
        kind = "refused" if is_clear_refusal(error) else "unclear"
        return kind, f"{type(error).__name__}: {text[:300]}"
    return "ok", ""


CELLS: list = []


def cell(notebook: str, what: str):
    """Register a ported cell (``what``: the TL calls it makes, for the docs table)."""

    def register(fn):
        CELLS.append((notebook, fn.__name__.removeprefix("cell_"), what, fn))
        return fn

    return register


# ============================================================================ Main_Demo
@cell("Main_Demo", "model(text, return_type='loss')")
def cell_loss(lab):
    text = "The router reads depth, and the blocks close."
    loss = lab.model(text, return_type="loss")
    assert close(loss, lab.ref(tokens_of([text]), return_type="loss")), "loss"


@cell("Main_Demo", "run_with_cache; cache['pattern', 0, 'attn']; to_str_tokens")
def cell_cache_pattern(lab):
    text = "Natural language processing tasks"
    tokens = lab.model.to_tokens(text)
    _, cache = lab.model.run_with_cache(tokens, remove_batch_dim=True)
    pattern = cache["pattern", 0, "attn"]
    _, ref_cache = lab.ref.run_with_cache(tokens_of([text]))
    assert close(pattern, ref_cache["blocks.0.attn.hook_pattern"][0]), "pattern"
    assert lab.model.to_str_tokens(text) == list(text)


@cell("Main_Demo", "run_with_cache(remove_batch_dim, stop_at_layer, names_filter)")
def cell_stop_at_layer_cache(lab):
    tokens = lab.model.to_tokens("Natural language processing")
    name = "blocks.0.attn.hook_pattern"
    _, cache = lab.model.run_with_cache(tokens, remove_batch_dim=True, stop_at_layer=1, names_filter=[name])
    _, ref_cache = lab.ref.run_with_cache(tokens)
    assert close(cache[name], ref_cache[name][0]), "pattern"


@cell("Main_Demo", "run_with_hooks: zero one head of hook_v (loss)")
def cell_head_ablation(lab):
    tokens = tokens_of(["Natural language processing tasks, such as question answering"])
    head = 1

    def head_ablation_hook(value, hook):
        value[:, :, head, :] = 0.0
        return value

    ablated = lab.model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(get_act_name("v", 1), head_ablation_hook)])
    ref = lab.ref.run_with_hooks(tokens, return_type="loss", fwd_hooks=[("blocks.1.attn.hook_v", head_ablation_hook)])
    assert close(ablated, ref), "ablated loss"
    assert not close(ablated, lab.ref(tokens, return_type="loss"), 1e-7), "the ablation did nothing"


def stream_patch_grid(model, hook_name, clean_tokens, corrupted_tokens, clean_cache, metric):
    """The notebooks' hand-rolled residual patching loop (Main_Demo / Exploratory)."""

    def residual_stream_patching_hook(resid_pre, hook, position):
        clean_resid_pre = clean_cache[hook.name]
        resid_pre[:, position, :] = clean_resid_pre[:, position, :]
        return resid_pre

    n_pos = clean_tokens.shape[1]
    grid = torch.zeros(model.cfg.n_layers, n_pos)
    for layer in range(model.cfg.n_layers):
        for position in range(n_pos):
            hook = partial(residual_stream_patching_hook, position=position)
            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(hook_name(layer), hook)])
            grid[layer, position] = metric(logits).detach()
    return grid


def ioi_setup(lab, model):
    clean, corrupted = tokens_of(PATCH_PROMPTS[0:1]), tokens_of(PATCH_PROMPTS[1:2])
    answers = answer_ids(lab.ref)[:1]
    clean_logits, clean_cache = model.run_with_cache(clean)
    base_clean, base_corr = logit_diff(clean_logits, answers), logit_diff(model(corrupted), answers)
    metric = lambda logits: (logit_diff(logits, answers) - base_corr) / (base_clean - base_corr)  # noqa: E731
    return clean, corrupted, clean_cache, metric


def close_metric(a, b, lab):
    """Normalised patching metrics compared in logit units (the clean - corrupted difference of
    tiny random models is small, so the normalisation would magnify float rounding)."""
    return close(a * lab.scale, b * lab.scale, 1e-5)


def hand_stream_grid(lab, name):
    """The same patching on the reference model (the cumulative stream hooks; computed once)."""
    key = name(0)
    if key not in lab.hand:
        clean, corrupted, cache, metric = ioi_setup(lab, lab.ref)
        lab.hand[key] = stream_patch_grid(lab.ref, name, clean, corrupted, cache, metric)
    return lab.hand[key]


@cell("Main_Demo", "run_with_hooks on get_act_name('in', l) (resid_pre), patched per position")
def cell_resid_patching(lab):
    clean, corrupted, cache, metric = ioi_setup(lab, lab.model)
    grid = stream_patch_grid(lab.model, lambda l: get_act_name("in", l), clean, corrupted, cache, metric)
    hand = hand_stream_grid(lab, lambda l: f"blocks.{l}.hook_resid_pre")
    assert close_metric(grid, hand, lab), "patching grid"


@cell("Main_Demo", "induction score from every hook_pattern (names filter)")
def cell_induction_score(lab):
    seq = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    repeated = torch.cat([seq, seq], dim=1)
    scores = torch.zeros(lab.n_layers, lab.n_heads)

    def induction_score_hook(pattern, hook):
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - 10)
        scores[hook.layer(), :] = stripe.mean(-1).mean(0)

    lab.model.run_with_hooks(repeated, return_type=None, fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)])
    _, cache = lab.ref.run_with_cache(repeated)
    hand = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"].diagonal(dim1=-2, dim2=-1, offset=-9).mean(-1).mean(0) for l in range(lab.n_layers)])
    assert close(scores, hand), "induction scores"


@cell("Main_Demo", "model.unembed.b_U; to_single_token")
def cell_unembed_bias(lab):
    bias = lab.model.unembed.b_U
    assert bias.shape == (lab.ref.cfg.d_vocab,) and float(bias.abs().max()) == 0.0
    assert float(lab.model.unembed.b_U[lab.model.to_single_token("J")]) == 0.0


@cell("Main_Demo", "to_str_tokens, to_tokens(list), get_token_position(prepend_bos=False)")
def cell_tokenization(lab):
    model = lab.model
    assert model.to_str_tokens("The cat") == list("The cat")
    multi = model.to_tokens(["The cat sat", "The dog"])
    assert multi.shape == (2, 11) and multi[1, 7:].tolist() == [0] * 4
    assert model.get_token_position("c", "The cat sat on the mat", prepend_bos=False) == 4


@cell("Main_Demo", "model('Hello World', prepend_bos=True)")
def cell_with_bos(lab):
    logits = lab.model("Hello World", prepend_bos=True)
    assert logits.shape[1] == 12, "prepend_bos=True did not prepend"


@cell("Main_Demo", "model('Hello World', prepend_bos=False)")
def cell_without_bos(lab):
    logits = lab.model("Hello World", prepend_bos=False)
    assert logits.shape == (1, 11, lab.ref.cfg.d_vocab)
    # folding and centring keep the log-probabilities
    assert close(logits.log_softmax(-1), lab.ref(tokens_of(["Hello World"])).log_softmax(-1)), "log-probs"


@cell("Main_Demo", "model.OV; model.embed.W_E @ OV @ model.unembed.W_U")
def cell_factored_ov(lab):
    model = lab.model
    ov = model.OV
    full = model.embed.W_E @ ov[1, 0] @ model.unembed.W_U
    ref = lab.ref
    g1 = ref.blocks[1].ln1.weight  # folded into W_V by fold_ln
    w_u = ref.W_U * ref.ln_final.weight[:, None]
    if PROCESSING.get("center_unembed"):
        w_u = w_u - w_u.mean(-1, keepdim=True)
    hand = ref.W_E @ ((ref.blocks[1].attn.W_V[0] * g1[:, None]) @ ref.blocks[1].attn.W_O[0]) @ w_u
    assert close(full.AB, hand), "full OV circuit"
    assert close(model.W_U, w_u), "W_U is the folded, centred unembedding"


@cell("Main_Demo", "model.generate(max_new_tokens, do_sample=False)")
def cell_generate(lab):
    out = lab.model.generate("The cat", max_new_tokens=4, do_sample=False, verbose=False, use_past_kv_cache=False)
    tokens = tokens_of(["The cat"])
    for _ in range(4):
        tokens = torch.cat([tokens, lab.ref(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == lab.ref.to_string(tokens[0]), "greedy continuation"


# ============================================================================ Exploratory_Analysis_Demo
@cell("Exploratory_Analysis_Demo", "enable_compatibility_mode / from_pretrained(center_unembed, center_writing_weights, fold_ln, refactor_factored_attn_matrices)")
def cell_load_processed(lab):
    load_notebook_model(
        lab.directory, center_unembed=True, center_writing_weights=True, fold_ln=True, refactor_factored_attn_matrices=True
    )


@cell("Exploratory_Analysis_Demo", "set_use_attn_result(True); hook_result sums to hook_attn_out")
def cell_use_attn_result(lab):
    lab.model.set_use_attn_result(True)
    try:
        _, cache = lab.model.run_with_cache(tokens_of(PROMPTS[:2]))
        result = cache["blocks.1.attn.hook_result"]
        assert result.shape == (2, len(PROMPTS[0]), lab.n_heads, lab.ref.cfg.d_model)
        assert close(result.sum(-2), cache["blocks.1.hook_attn_out"]), "heads sum to attn_out"
    finally:
        lab.model.set_use_attn_result(False)


@cell("Exploratory_Analysis_Demo", "utils.test_prompt(..., prepend_bos=True)")
def cell_test_prompt(lab):
    from transformer_lens.utilities import test_prompt

    test_prompt("After J and M went to the store, M gave a bottle of milk to", " J", lab.model, prepend_bos=True, print_details=False)


@cell("Exploratory_Analysis_Demo", "to_tokens(prompts, prepend_bos=True)")
def cell_tokens_with_bos(lab):
    tokens = lab.model.to_tokens(PROMPTS, prepend_bos=True)
    assert tokens.shape[1] == len(PROMPTS[0]) + 1, "prepend_bos=True did not prepend"


def ea_setup(lab):
    """The notebook's IOI run (``prepend_bos=False``: the models have no BOS)."""
    tokens = lab.model.to_tokens(PROMPTS, prepend_bos=False)
    answers = answer_ids(lab.model)
    logits, cache = lab.model.run_with_cache(tokens)
    _, ref_cache = lab.ref.run_with_cache(tokens)
    directions = lab.model.tokens_to_residual_directions(answers)  # [batch, 2, d_model]
    return tokens, answers, logits, cache, ref_cache, directions[:, 0] - directions[:, 1]


def residual_stack_to_logit_diff(stack, cache, directions):
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    return (scaled * directions).sum(-1).mean(-1)


@cell("Exploratory_Analysis_Demo", "cache['resid_post', -1] -> apply_ln_to_stack -> logit diff")
def cell_final_residual_dla(lab):
    tokens, answers, logits, cache, _, directions = ea_setup(lab)
    final = cache["resid_post", -1][:, -1]
    scaled = cache.apply_ln_to_stack(final, layer=-1, pos_slice=-1)
    assert close((scaled * directions).sum(-1).mean(), logit_diff(logits, answers)), "average logit diff"


@cell("Exploratory_Analysis_Demo", "accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1) (logit lens)")
def cell_logit_lens(lab):
    tokens, answers, logits, cache, ref_cache, directions = ea_setup(lab)
    stack, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    lens = residual_stack_to_logit_diff(stack, cache, directions)
    assert close(lens[-1], logit_diff(logits, answers)), "the last entry is the model's logit diff"
    reads = [final_read(lab.ref, ref_cache)[:, -1]] if lab.flavour == "cumulative" else []
    if lab.flavour == "kimi":  # each entry is what a sublayer reads: its router's output
        routers = [f"blocks.{l}.{s}_router" for l in range(lab.n_layers) for s in ("attn", "mlp")] + ["final_router"]
        reads = [ref_cache[f"{r}.hook_out"][:, -1] for r in routers]
    else:
        reads = [ref_cache[f"blocks.{l}.hook_resid_{p}"][:, -1] for l in range(lab.n_layers) for p in ("pre", "mid")]
        reads.append(final_read(lab.ref, ref_cache)[:, -1])
    hand = frozen_dla(lab.ref, ref_cache, torch.stack(reads), answers)
    assert len(labels) == len(reads) and close(lens, hand), "logit lens entries"


def component_masses(lab, ref_cache, component):
    """The final read's total mass on the sources containing ``component`` (1 for cumulative)."""
    if lab.flavour == "cumulative":
        return torch.ones(ref_cache["hook_embed"].shape[:2])
    from attnres_lens.cache import source_members

    members = source_members(lab.ref.cfg)["final_router"]
    weights = ref_cache["final_router.hook_weights"]
    return sum(weights[..., i] for i, comps in enumerate(members) if component in comps)


@cell("Exploratory_Analysis_Demo", "decompose_resid(layer=-1, pos_slice=-1) -> per-layer logit diff")
def cell_decompose_resid(lab):
    tokens, answers, logits, cache, ref_cache, directions = ea_setup(lab)
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer = residual_stack_to_logit_diff(stack, cache, directions)
    assert close(per_layer.sum(), logit_diff(logits, answers)), "the terms sum to the logit diff"
    parts = [(-1, ref_cache["hook_embed"])] + [
        (k, ref_cache[f"blocks.{k // 2}.hook_{'mlp' if k % 2 else 'attn'}_out"]) for k in range(2 * lab.n_layers)
    ]
    hand = torch.stack([frozen_dla(lab.ref, ref_cache, (t * component_masses(lab, ref_cache, k)[..., None])[:, -1], answers) for k, t in parts])
    assert close(per_layer, hand), "per-layer attributions"


@cell("Exploratory_Analysis_Demo", "stack_head_results(layer=-1, pos_slice=-1) -> per-head logit diff")
def cell_stack_head_results(lab):
    tokens, answers, logits, cache, ref_cache, directions = ea_setup(lab)
    stack, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head = residual_stack_to_logit_diff(stack, cache, directions)
    hand = []
    for l in range(lab.n_layers):
        z = ref_cache[f"blocks.{l}.attn.hook_z"]
        result = torch.einsum("bphd,hdm->bphm", z, lab.ref.blocks[l].attn.W_O)
        mass = component_masses(lab, ref_cache, 2 * l)
        hand.extend(frozen_dla(lab.ref, ref_cache, (result[:, -1, h] * mass[:, -1, None]), answers) for h in range(lab.n_heads))
    assert labels[:2] == ["L0H0", "L0H1"] and close(per_head, torch.stack(hand)), "per-head attributions"


@cell("Exploratory_Analysis_Demo", "logit_attrs(stack_head_results(...), answer tokens)")
def cell_logit_attrs(lab):
    tokens, answers, logits, cache, ref_cache, directions = ea_setup(lab)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    attrs = cache.logit_attrs(stack, tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1).mean(-1)
    assert close(attrs, residual_stack_to_logit_diff(stack, cache, directions)), "logit_attrs"
    layers, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer = residual_stack_to_logit_diff(layers, cache, directions)
    for l in range(lab.n_layers):  # a layer's heads sum to its attn_out term
        assert close(attrs[l * lab.n_heads:(l + 1) * lab.n_heads].sum(), per_layer[labels.index(f"{l}_attn_out")]), f"layer {l}"


@cell("Exploratory_Analysis_Demo", "patch_residual_component on get_act_name('resid_pre', l) per position")
def cell_ea_resid_patching(lab):
    clean, corrupted, cache, metric = ioi_setup(lab, lab.model)
    grid = stream_patch_grid(lab.model, lambda l: get_act_name("resid_pre", l), clean, corrupted, cache, metric)
    assert close_metric(grid, hand_stream_grid(lab, lambda l: f"blocks.{l}.hook_resid_pre"), lab), "patching grid"


@cell("Exploratory_Analysis_Demo", "patch_head_vector on hook_z, every head")
def cell_head_patching(lab):
    clean, corrupted, cache, metric = ioi_setup(lab, lab.model)
    _, ref_clean, ref_cache, ref_metric = ioi_setup(lab, lab.ref)

    def patch_head_vector(corrupted_head_vector, hook, head_index, clean_cache):
        corrupted_head_vector[:, :, head_index, :] = clean_cache[hook.name][:, :, head_index, :]
        return corrupted_head_vector

    grid = torch.zeros(lab.n_layers, lab.n_heads)
    hand = torch.zeros(lab.n_layers, lab.n_heads)
    for layer in range(lab.n_layers):
        for head in range(lab.n_heads):
            name = get_act_name("z", layer, "attn")
            logits = lab.model.run_with_hooks(corrupted, fwd_hooks=[(name, partial(patch_head_vector, head_index=head, clean_cache=cache))])
            grid[layer, head] = metric(logits).detach()
            ref_logits = lab.ref.run_with_hooks(corrupted, fwd_hooks=[(name, partial(patch_head_vector, head_index=head, clean_cache=ref_cache))])
            hand[layer, head] = ref_metric(ref_logits).detach()
    assert close_metric(grid, hand, lab), "head patching"


# ============================================================================ Activation_Patching_in_TL_Demo
def ap_setup(lab, model):
    clean, corrupted = tokens_of(PATCH_PROMPTS[0:1]), tokens_of(PATCH_PROMPTS[1:2])
    answers = answer_ids(lab.ref)[:1]
    clean_logits, clean_cache = model.run_with_cache(clean)
    clean_diff, corr_diff = logit_diff(clean_logits, answers), logit_diff(model(corrupted), answers)

    def ioi_metric(logits):
        return (logit_diff(logits, answers) - corr_diff) / (clean_diff - corr_diff)

    return corrupted, clean_cache, ioi_metric


@cell("Activation_Patching_in_TL_Demo", "patching.get_act_patch_resid_pre")
def cell_get_act_patch_resid_pre(lab):
    result = patching.get_act_patch_resid_pre(lab.model, *ap_setup(lab, lab.model))
    hand = hand_stream_grid(lab, lambda l: f"blocks.{l}.hook_resid_pre")
    assert close_metric(result, hand, lab), "resid_pre grid"


@cell("Activation_Patching_in_TL_Demo", "patching.get_act_patch_attn_head_out_all_pos")
def cell_attn_head_out_all_pos(lab):
    result = patching.get_act_patch_attn_head_out_all_pos(lab.model, *ap_setup(lab, lab.model))
    hand = patching.get_act_patch_attn_head_out_all_pos(lab.ref, *ap_setup(lab, lab.ref))
    assert result.shape == (lab.n_layers, lab.n_heads) and close_metric(result, hand, lab), "head out grid"
    _assert_one_head_by_hand(lab, result)


def _assert_one_head_by_hand(lab, result, layer=1, head=1):
    corrupted, clean_cache, metric = ap_setup(lab, lab.ref)

    def patch(z, hook):
        z[:, :, head] = clean_cache[hook.name][:, :, head]
        return z

    hand = metric(lab.ref.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)]))
    assert close_metric(result[layer, head], hand, lab), "L1H1"


@cell("Activation_Patching_in_TL_Demo", "patching.get_act_patch_block_every (resid_pre, attn_out, mlp_out)")
def cell_block_every(lab):
    result = patching.get_act_patch_block_every(lab.model, *ap_setup(lab, lab.model))
    attn = patching.get_act_patch_attn_out(lab.ref, *ap_setup(lab, lab.ref))
    assert close_metric(result[0], hand_stream_grid(lab, lambda l: f"blocks.{l}.hook_resid_pre"), lab), "resid_pre row"
    assert close_metric(result[1], attn, lab), "attn_out row"


@cell("Activation_Patching_in_TL_Demo", "patching.get_act_patch_attn_head_all_pos_every (z, q, k, v, pattern)")
def cell_head_all_pos_every(lab):
    result = patching.get_act_patch_attn_head_all_pos_every(lab.model, *ap_setup(lab, lab.model))
    hand = patching.get_act_patch_attn_head_all_pos_every(lab.ref, *ap_setup(lab, lab.ref))
    assert result.shape == (5, lab.n_layers, lab.n_heads) and close_metric(result, hand, lab), "every head grid"
    _assert_one_head_by_hand(lab, result[0])


# ============================================================================ Attribution_Patching_Demo
def get_cache_fwd_and_bwd(model, tokens, metric):
    """The notebook's function, as it is (its bridge workarounds included)."""
    filter_not_qkv_input = lambda name: "_input" not in name  # noqa: E731
    model.reset_hooks()
    grad_cache = {}

    def backward_cache_hook(act, hook):
        grad_cache[hook.name] = act.detach()

    model.add_hook(filter_not_qkv_input, backward_cache_hook, "bwd")
    output, fwd_cache = model.run_with_cache(tokens, names_filter=filter_not_qkv_input)
    value = metric(output)
    value.backward()
    model.reset_hooks()
    for key, hp in model.hook_dict.items():
        if hp.name != key and filter_not_qkv_input(key) and hp.name in grad_cache and key not in grad_cache:
            grad_cache[key] = grad_cache[hp.name]
    return value.item(), fwd_cache, ActivationCache(grad_cache, model)


def attribution_setup(lab, model):
    model.set_use_attn_result(True)
    clean, corrupted = tokens_of(PROMPTS), tokens_of([PROMPTS[i ^ 1] for i in range(len(PROMPTS))])
    answers = answer_ids(lab.ref)
    with torch.no_grad():
        clean_diff, corr_diff = logit_diff(model(clean), answers), logit_diff(model(corrupted), answers)
    metric = lambda logits: (logit_diff(logits, answers) - corr_diff) / (clean_diff - corr_diff)  # noqa: E731
    clean_value, clean_cache, _ = get_cache_fwd_and_bwd(model, clean, metric)
    _, corrupted_cache, corrupted_grad_cache = get_cache_fwd_and_bwd(model, corrupted, metric)
    assert abs((clean_value - 1.0) * float(clean_diff - corr_diff)) < 1e-5, "clean metric is 1"
    return clean_cache, corrupted_cache, corrupted_grad_cache


def caches_for(lab):
    key = (lab.flavour, id(lab.model))
    if key not in ATTRIBUTION:
        try:
            ATTRIBUTION[key] = attribution_setup(lab, lab.model)
        finally:
            lab.model.set_use_attn_result(False)
    return ATTRIBUTION[key]


ATTRIBUTION: dict = {}


@cell("Attribution_Patching_Demo", "get_cache_fwd_and_bwd (add_hook filter 'bwd', run_with_cache, ActivationCache(grads))")
def cell_fwd_and_bwd(lab):
    clean_cache, corrupted_cache, grad_cache = caches_for(lab)
    assert "blocks.1.attn.hook_result" in grad_cache.cache_dict


@cell("Attribution_Patching_Demo", "attr_patch_head_out: stack_head_results(-1) of the caches and the gradients")
def cell_attr_patch_head_out(lab):
    clean_cache, corrupted_cache, grad_cache = caches_for(lab)
    clean = clean_cache.stack_head_results(-1, return_labels=False)
    corrupted = corrupted_cache.stack_head_results(-1, return_labels=False)
    grads = grad_cache.stack_head_results(-1, return_labels=False)
    attr = (grads * (clean - corrupted)).sum(-1).sum(-2)  # [component, pos]
    exact = _exact_head_attribution(lab, clean_cache, corrupted_cache, grad_cache)
    assert close(attr.sum(-1), exact), "head-output attribution equals grad . d(result)"


def _exact_head_attribution(lab, clean_cache, corrupted_cache, grad_cache):
    """grad_z . dz per head (the exact first-order attribution of each head's output)."""
    out = []
    for l in range(lab.n_layers):
        name = f"blocks.{l}.attn.hook_z"
        dz = clean_cache[name] - corrupted_cache[name]
        out.append((grad_cache[name] * dz).sum((0, 1, 3)))
    return torch.cat(out)


@cell("Attribution_Patching_Demo", "attr_patch_head_vector: hook_z and its gradient, per head")
def cell_attr_patch_head_vector(lab):
    clean_cache, corrupted_cache, grad_cache = caches_for(lab)
    stack = lambda cache: torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(lab.n_layers)])  # noqa: E731
    attr = (stack(grad_cache) * (stack(clean_cache) - stack(corrupted_cache))).sum((1, 2, 4))
    # the same through hook_result: grad_result . d(result) == grad_z . dz (result = z W_O)
    result = lambda cache: torch.stack([cache[f"blocks.{l}.attn.hook_result"] for l in range(lab.n_layers)])  # noqa: E731
    via_result = (result(grad_cache) * (result(clean_cache) - result(corrupted_cache))).sum((1, 2, 4))
    assert close(attr, via_result), "hook_result attribution equals grad_z . dz"


@cell("Attribution_Patching_Demo", "attr_patch_residual: accumulated_resid of the caches and the gradients")
def cell_attr_patch_residual(lab):
    clean_cache, corrupted_cache, grad_cache = caches_for(lab)
    clean, labels = clean_cache.accumulated_resid(-1, incl_mid=True, return_labels=True)
    corrupted = corrupted_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)
    grads = grad_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)
    attr = (grads * (clean - corrupted)).sum((1, 3))
    names = [f"blocks.{l}.hook_resid_{p}" for l in range(lab.n_layers) for p in ("pre", "mid")]
    names.append(f"blocks.{lab.n_layers - 1}.hook_resid_post")
    exact = torch.stack([(grad_cache[n] * (clean_cache[n] - corrupted_cache[n])).sum((0, 2)) for n in names])
    assert close(attr, exact), "residual attribution"


@cell("Attribution_Patching_Demo", "attr_patch_layer_out: decompose_resid(-1) of the caches and the gradients")
def cell_attr_patch_layer_out(lab):
    clean_cache, corrupted_cache, grad_cache = caches_for(lab)
    clean, labels = clean_cache.decompose_resid(-1, return_labels=True)
    corrupted = corrupted_cache.decompose_resid(-1, return_labels=False)
    grads = grad_cache.decompose_resid(-1, return_labels=False)
    attr = (grads * (clean - corrupted)).sum((1, 3))
    names = ["hook_embed"] + [f"blocks.{k // 2}.hook_{'mlp' if k % 2 else 'attn'}_out" for k in range(2 * lab.n_layers)]
    exact = torch.stack([(grad_cache[n] * (clean_cache[n] - corrupted_cache[n])).sum((0, 2)) for n in names])
    assert close(attr, exact), "layer-output attribution"


# ============================================================================ the expected outcomes
_KIMI_STREAM = "refused: a kimi model has no single residual stream (names get_act_patch_depth_state, decompose_resid)"
_NO_BOS = "refused: the byte-level models have no BOS token (pass prepend_bos=False)"
_CENTRING = "refused: center_writing_weights is not exact under RMSNorm (pass False)"
_ATTRIBUTION = (
    "refused: kimi stacks are routing-weighted, so stack x gradient is no attribution "
    "(use the hooks' activations and gradients directly)"
)

#: (notebook, cell) -> {(flavour, path): outcome}; "ok" unless listed.
EXCEPTIONS: dict = {
    ("Main_Demo", "resid_patching"): {("kimi", p): _KIMI_STREAM for p in ("hooked", "bridge")},
    ("Main_Demo", "with_bos"): {(f, p): _NO_BOS for f in ("kimi", "cumulative") for p in ("hooked", "bridge")},
    ("Exploratory_Analysis_Demo", "load_processed"): {(f, p): _CENTRING for f in ("kimi", "cumulative") for p in ("hooked", "bridge")},
    ("Exploratory_Analysis_Demo", "test_prompt"): {(f, p): _NO_BOS for f in ("kimi", "cumulative") for p in ("hooked", "bridge")},
    ("Exploratory_Analysis_Demo", "tokens_with_bos"): {(f, p): _NO_BOS for f in ("kimi", "cumulative") for p in ("hooked", "bridge")},
    ("Exploratory_Analysis_Demo", "final_residual_dla"): {("kimi", p): _KIMI_STREAM for p in ("hooked", "bridge")},
    ("Exploratory_Analysis_Demo", "ea_resid_patching"): {("kimi", p): _KIMI_STREAM for p in ("hooked", "bridge")},
    ("Activation_Patching_in_TL_Demo", "get_act_patch_resid_pre"): {("kimi", p): _KIMI_STREAM for p in ("hooked", "bridge")},
    ("Activation_Patching_in_TL_Demo", "block_every"): {("kimi", p): _KIMI_STREAM for p in ("hooked", "bridge")},
    ("Attribution_Patching_Demo", "attr_patch_head_out"): {("kimi", p): _ATTRIBUTION for p in ("hooked", "bridge")},
    ("Attribution_Patching_Demo", "attr_patch_residual"): {("kimi", p): _ATTRIBUTION for p in ("hooked", "bridge")},
    ("Attribution_Patching_Demo", "attr_patch_layer_out"): {("kimi", p): _ATTRIBUTION for p in ("hooked", "bridge")},
}


def expected(notebook: str, name: str, flavour: str, path: str) -> str:
    return EXCEPTIONS.get((notebook, name), {}).get((flavour, path), "ok")


# ============================================================================ the tests
@pytest.mark.parametrize("notebook,name,what,fn", CELLS, ids=[f"{nb}-{name}" for nb, name, _, _ in CELLS])
def test_notebook_cell(lab, notebook, name, what, fn):
    status, note = outcome(fn, lab)
    tally = os.environ.get("ATTNRES_TL_TALLY")
    if tally:
        _record(Path(tally), notebook, name, lab.flavour, status, note)
    want = expected(notebook, name, lab.flavour, PATH)
    assert status == want.split(":")[0], f"{notebook} / {name} on {lab.flavour} ({PATH}): {status} {note}"


def _record(path: Path, notebook, name, flavour, status, note):
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append({"notebook": notebook, "cell": name, "flavour": flavour, "path": PATH, "status": status, "note": note})
    path.write_text(json.dumps(rows, indent=1))


def render_table() -> str:
    """docs/hooks.md's "TL tools" table, from ``CELLS`` and ``EXPECTED`` (what this suite asserts)."""
    lines = [
        "| Notebook | Cell (TL calls) | kimi, TL 3 | kimi, TL 4 bridge | cumulative, TL 3 | cumulative, TL 4 bridge |",
        "|---|---|---|---|---|---|",
    ]
    for notebook, name, what, _ in CELLS:
        cells = [expected(notebook, name, f, p) for f in ("kimi", "cumulative") for p in ("hooked", "bridge")]
        lines.append(f"| {notebook} | `{name}`: {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- tl-tools-table: generated by tools/tl_conformance_table.py from tests/test_tl_conformance.py -->\n"
TABLE_END = "<!-- end of tl-tools-table -->\n"


def test_docs_table_is_generated_from_the_suite():
    text = (ROOT / "docs" / "hooks.md").read_text()
    assert TABLE_START in text and TABLE_END in text, "docs/hooks.md lacks the generated TL tools table"
    documented = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert documented == render_table(), "docs/hooks.md's TL tools table drifted: run python tools/tl_conformance_table.py"


def test_every_notebook_is_ported():
    assert {nb for nb, *_ in CELLS} == set(NOTEBOOKS)


def test_refusals_say_why_and_what_to_use():
    """The classifier itself: our refusals count as refusals, a bare KeyError does not."""
    from attnres_lens.refusals import missing_hook_error, no_bos_message

    assert is_clear_refusal(missing_hook_error("blocks.0.hook_resid_pre", "kimi"))
    assert is_clear_refusal(ValueError(no_bos_message("x")))
    assert not is_clear_refusal(KeyError("blocks.0.hook_resid_pre"))
    assert not is_clear_refusal(AttributeError("'Linear' object has no attribute 'W_U'"))


# ============================================================================ the contract, directly
def test_fold_ln_really_folds_on_this_path(lab):
    """Item 4: folding keeps the logits within 1e-5, and the unembedding is our folded W_U (a
    second processing call changes nothing)."""
    model = load_notebook_model(lab.directory, fold_ln=True, center_unembed=False)
    tokens = tokens_of(PROMPTS[:2])
    with torch.no_grad():
        assert (model(tokens) - lab.ref(tokens)).abs().max() < 1e-5
    folded = HookedAttnResTransformer.from_pretrained(lab.directory, fold_ln=True)
    assert torch.allclose(model.W_U, folded.W_U, atol=1e-6)
    assert not torch.allclose(model.W_U, lab.ref.W_U, atol=1e-3)  # the gains were not 1
    if PATH == "bridge":
        model.process_weights(fold_ln=True, center_unembed=False)
        with torch.no_grad():
            assert (model(tokens) - lab.ref(tokens)).abs().max() < 1e-5


def test_one_refusal_message_for_a_hook_the_flavour_lacks(lab):
    """Item 7: run_with_hooks, add_hook, run_with_cache's names_filter and the cache say the same."""
    name = "blocks.0.hook_resid_pre" if lab.flavour == "kimi" else "final_router.hook_weights"
    tokens = tokens_of(PROMPTS[:1])
    messages = set()
    for model in (lab.ref, lab.model):
        for attempt in (
            lambda: model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: act)]),
            lambda: model.add_hook(name, lambda act, hook: act),
            lambda: model.run_with_cache(tokens, names_filter=[name]),
            lambda: model.run_with_cache(tokens)[1][name],
        ):
            with pytest.raises(KeyError) as caught:
                attempt()
            messages.add(str(caught.value))
        model.reset_hooks()
    assert len(messages) == 1 and is_clear_refusal(KeyError(messages.pop()))


def test_bos_is_refused_without_one_and_prepended_with_one(lab):
    """Item 5: no BOS, a clear refusal on both paths; a tokenizer with a BOS gets TL's behaviour."""
    for model in (lab.ref, lab.model):
        with pytest.raises(ValueError, match="no BOS token"):
            model.to_tokens("Hi", prepend_bos=True)
        with pytest.raises(ValueError, match="no BOS token"):
            model("Hi", prepend_bos=True)
        assert model.to_tokens("Hi").tolist() == [[72, 105]]  # the default prepends nothing
    from attnres_lens.tokenizer import ByteTokenizer, hf_byte_tokenizer

    class WithBos(ByteTokenizer):
        bos_token_id = 1

    with_bos = HookedAttnResTransformer(lab.ref.cfg, tokenizer=WithBos())
    assert with_bos.to_tokens("Hi", prepend_bos=True).tolist() == [[1, 72, 105]]
    assert len(hf_byte_tokenizer()) == 256 and hf_byte_tokenizer().bos_token is None


def test_weight_views_and_tl_keywords(lab):
    """Item 6: unembed.W_U / unembed.b_U / embed.W_E are views; TL's keywords never TypeError."""
    ref = lab.ref
    assert ref.unembed.W_U.data_ptr() == ref.unembed.weight.data_ptr() and ref.embed.W_E is ref.embed.weight
    assert torch.equal(ref.unembed.W_U, ref.W_U) and float(ref.unembed.b_U.abs().max()) == 0.0
    for keyword, error in (("center_writing_weights", "RMSNorm"), ("refactor_factored_attn_matrices", "QK-norm")):
        with pytest.raises(ValueError, match=error):
            HookedAttnResTransformer.from_pretrained(lab.directory, **{keyword: True})
    model = HookedAttnResTransformer.from_pretrained(lab.directory, fold_ln=True, center_unembed=True, fold_value_biases=True)
    assert float(model.W_U.mean(-1).abs().max()) < 1e-6
