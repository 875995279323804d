"""The documentation cannot drift from the code: the hook reference table is checked against
``model.hook_dict`` and the cached shapes, the source-layout examples against
``source_table()``, and the CLI page against the parsers' options."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pytest
import torch

from attnres_lens import AttnResConfig, HookedAttnResTransformer

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _table_rows(text: str, header: str) -> list[list[str]]:
    """Rows (cells stripped) of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _hook_table() -> list[dict]:
    rows = _table_rows((DOCS / "hooks.md").read_text(), "| Hook | Shape |")
    out = []
    for name, shape, meaning, kimi, cumulative in rows:
        out.append(
            {
                "pattern": name.strip("`"),
                "shape": [d.strip() for d in shape.strip("`[]").split(",")],
                "meaning": meaning,
                "flavours": {f for f, flag in (("kimi", kimi), ("cumulative", cumulative)) if flag == "yes"},
            }
        )
    return out


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{l}"), r"(\d+)") + "$")


CONFIGS = [
    AttnResConfig(flavour="kimi", n_layers=3, n_blocks=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48),
    AttnResConfig(flavour="kimi", routing_mode="full", n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=40),
    AttnResConfig(flavour="cumulative", n_layers=3, n_blocks=3, d_model=32, d_head=8, n_heads=4, n_key_value_heads=1, d_mlp=48),
    AttnResConfig(flavour="cumulative", routing_mode="full", n_layers=2, d_model=32, d_head=8, n_heads=2, d_mlp=40),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.flavour}-{c.routing_mode}")
def test_hook_table_lists_every_hook_with_its_shape(cfg):
    table = _hook_table()
    assert len(table) >= 40 and all(row["meaning"] for row in table)
    model = HookedAttnResTransformer(cfg)
    model.set_use_attn_result(True)  # TL's switched hooks fire: hook_result here, and
    batch, n_pos = 2, 5
    tokens = torch.randint(0, cfg.d_vocab, (batch, n_pos))
    _, cache = model.run_with_cache(tokens)
    model.set_use_split_qkv_input(True)  # hook_{q,k,v}_input in a second run
    _, split_cache = model.run_with_cache(tokens)
    for name, value in split_cache.cache_dict.items():
        if name.endswith(("hook_q_input", "hook_k_input", "hook_v_input")):
            cache.cache_dict[name] = value
    n_sources = {spec.name: spec.n_sources for spec in model.router_specs}
    dims = {
        "batch": batch, "pos": n_pos, "query_pos": n_pos, "key_pos": n_pos, "d_model": cfg.d_model,
        "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "head_index": cfg.n_heads,
        "kv_head_index": cfg.n_key_value_heads, "1": 1,
    }
    matched_patterns = set()
    for hook in model.hook_dict:
        rows = [r for r in table if _regex(r["pattern"]).match(hook)]
        assert len(rows) == 1, f"hook {hook} matches {len(rows)} rows of docs/hooks.md"
        row = rows[0]
        assert cfg.flavour in row["flavours"], f"{hook} exists in {cfg.flavour} but the table says {row['flavours']}"
        matched_patterns.add(row["pattern"])
        router = hook.rsplit(".hook_", 1)[0]
        expected = [n_sources[router] if d == "source" else dims[d] for d in row["shape"]]
        assert list(cache[hook].shape) == expected, f"{hook}: cached {tuple(cache[hook].shape)}, table {row['shape']}"
    listed = {r["pattern"] for r in table if cfg.flavour in r["flavours"]}
    assert listed == matched_patterns, f"rows for {cfg.flavour} without such hooks: {listed - matched_patterns}"


def test_alias_table_matches_the_model():
    rows = _table_rows((DOCS / "hooks.md").read_text(), "| Alias | Same hook as |")
    model = HookedAttnResTransformer(AttnResConfig(n_layers=2, d_model=32, d_head=8))
    documented = {
        alias.strip("`").replace("{l}", str(l)): target.strip("`").replace("{l}", str(l))
        for alias, target in rows
        for l in range(2)
    }
    assert documented == model.hook_aliases


@pytest.mark.parametrize(
    "cfg, header_index",
    [
        (AttnResConfig(flavour="cumulative", n_layers=4, n_blocks=4), 0),
        (AttnResConfig(flavour="kimi", n_layers=4, n_blocks=2), 1),
    ],
)
def test_source_layout_examples_match_source_table(cfg, header_index):
    text = (DOCS / "hooks.md").read_text()
    section = text.split("## Which sources a router reads", 1)[1]
    tables = section.split("| Router | Sources")[1:]
    rows = _table_rows("| Router | Sources" + tables[header_index], "| Router | Sources")
    table = HookedAttnResTransformer(cfg).source_table()
    assert rows
    for router, sources in rows:
        router = router.strip("`")
        documented = re.findall(r"`([^`]+)` \((\w+)\)", sources)
        actual = table[table["router"] == router]
        assert documented == list(zip(actual["label"], actual["family"])), router


def test_cli_page_mentions_every_option():
    from attnres_lens.cli import build_parser

    page = (DOCS / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert f"attnres-lens {name}" in page, name
        for action in p._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in page, f"docs/cli.md does not mention {name} {flag}"


@pytest.mark.parametrize("flavour", ["kimi", "cumulative"])
def test_checkpoint_layout_table_matches_the_loader(flavour):
    """docs/concepts.md's key table: every key the loader maps, its shape and its parameter."""
    from attnres_lens.loading import checkpoint_shapes, key_map

    cfg = AttnResConfig(flavour=flavour, n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48, d_vocab=40)
    dims = {"d_vocab": 40, "d_model": 32, "d_head": 8, "n_heads": 4, "n_key_value_heads": 2, "d_mlp": 48}
    table = {}
    for key, shape, param in _table_rows((DOCS / "concepts.md").read_text(), "| Checkpoint key |"):
        sizes = []
        for dim in filter(None, (d.strip() for d in shape.strip("`[]").split(","))):
            factors = [dims.get(f.strip(), None) or int(f) for f in dim.split("*")]
            sizes.append(int(torch.tensor(factors).prod()))
        for layer in range(cfg.n_layers):
            table[key.strip("`").replace("{l}", str(layer))] = (tuple(sizes), param.strip("`").replace("{l}", str(layer)))
    mapped = key_map(cfg, with_routers=True)
    shapes = checkpoint_shapes(cfg, with_routers=True)
    for key, param in mapped.items():
        assert table[key] == (shapes[key], param), key
    other = "cumulative" if flavour == "kimi" else "kimi"
    other_keys = set(key_map(AttnResConfig(flavour=other, n_layers=2, d_model=32, d_head=8), with_routers=True))
    assert set(table) == set(mapped) | other_keys  # the table lists both flavours' keys, nothing else


def test_the_site_publishes_pages_and_figures_but_not_the_figure_script():
    """``mkdocs build`` copies every file under docs/ unless excluded: make_figures.py must not
    be published (checked on mkdocs' own file collection, as the build sees it)."""
    mkdocs_config = pytest.importorskip("mkdocs.config")
    from mkdocs.structure.files import get_files

    config = mkdocs_config.load_config(str(DOCS.parent / "mkdocs.yml"))
    published = {f.src_uri for f in get_files(config) if f.inclusion.is_included()}
    assert (DOCS / "make_figures.py").is_file()
    assert "make_figures.py" not in published
    assert "concepts.md" in published and "figures/content_dependence.png" in published


# ----------------------------------------------------------------------------- every code block runs
ROOT = DOCS.parent
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md", ROOT / "DESCRIPTION.md"]
#: In-page marker for a block that is not run, with its reason, on the line before the fence:
#: ``<!-- docs-test: skip (reason) -->``.
SKIP_MARKER = re.compile(r"<!-- docs-test: skip \((.+)\) -->")
#: Pages whose blocks continue from names the page's prose introduces (pages this test does not
#: own the wording of), and their blocks that are signatures rather than code.
PAGE_SETUP = {
    "attribution.md": (
        "from attnres_lens import HookedAttnResTransformer, bundled\n"
        "model = HookedAttnResTransformer.from_pretrained(bundled.model_path('attnres-cumulative-tiny'))\n"
        "tokens = bundled.eval_tokens(model, n_prompts=24, seq_len=64)\n"
    ),
}
SIGNATURES = {("attribution.md", 1)}


def _python_blocks(page: Path) -> list[tuple[int, str, Optional[str]]]:
    """(line, code, skip reason or None) of every ```python block of ``page``."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, previous = i + 1, next((l for l in reversed(lines[:i]) if l.strip()), "")
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            marker = SKIP_MARKER.search(previous)
            blocks.append((start + 1, "\n".join(lines[start:end]), marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


def test_the_block_collector_finds_blocks_and_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n```python\na = 1\n```\n<!-- docs-test: skip (needs the hub) -->\n```python\nb\n```\n")
    assert _python_blocks(page) == [(3, "a = 1", None), (7, "b", "needs the hub")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    """Drift between the docs and the code fails here: the blocks of a page run in order, in one
    namespace, in a temporary directory (files they write land there)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(PAGE_SETUP.get(page.name, ""), namespace)
    for index, (line, code, skip) in enumerate(_python_blocks(page)):
        if skip is not None or (page.name, index) in SIGNATURES:
            continue
        exec(compile(code, f"{page.name}:{line}", "exec"), namespace)


def test_the_label_example_in_interventions_md_is_what_the_code_says():
    from attnres_lens import run_with_interventions
    from attnres_lens.interventions import Slice, zero

    text = " ".join((DOCS / "interventions.md").read_text().split())
    for flavour in ("kimi", "cumulative"):
        model = HookedAttnResTransformer(AttnResConfig(n_layers=4, n_blocks=2, d_model=32, d_head=8, flavour=flavour))
        with pytest.raises(IndexError) as refused:
            run_with_interventions(model, torch.zeros(1, 4, dtype=torch.long), [zero(Slice("blocks.2.mlp_router", 3))])
        labels = re.findall(r"'([^']+)' \[", str(refused.value))
        if flavour == "kimi":
            assert f"IndexError: {refused.value}" in text
        assert all(f"'{label}'" in text or f"`'{label}'`" in text for label in labels), labels


def test_one_install_line_for_the_tests_everywhere():
    """README, getting-started and the docs index install the same extras for the test suite
    (the docs tests need mkdocs: ``.[dev]`` alone fails them)."""
    pages = [DOCS.parent / "README.md", DOCS / "getting-started.md", DOCS / "index.md"]
    extras = {page.name: set(re.findall(r'pip install -e "\.\[(dev[^\]]*)\]"', page.read_text())) for page in pages}
    assert extras == {page.name: {"dev,docs"} for page in pages}, extras


def test_getting_started_says_what_threads_to_set_and_why():
    text = (DOCS / "getting-started.md").read_text()
    assert "## Threads" in text and "torch.set_num_threads(1)" in text and "OMP_NUM_THREADS=1" in text
    assert "never sets torch's thread count" in text
