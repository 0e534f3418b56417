"""The documentation runs as written and says what plugin authors and users need."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from primesvt_plugin import hookspecs
from primesvt_plugin.pruning.attention import AttentionLayout

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE_DOCS = ["README.md", "docs/plugins.md", "docs/models.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def claim_holds(printed: str, claim: str) -> bool:
    """Whether ``print(...)  # claim`` printed what its comment says: the claim starts with the printed text (an
    explanation may follow after ': ' or ' '), or, ending in '...', the printed text starts with it. A claim
    starting with 'e.g.' is an example of what this machine's numerics print, not checked."""
    if claim.startswith("e.g."):
        return True
    if claim.endswith("..."):
        return printed.startswith(claim[:-3].rstrip())
    return claim == printed or (claim.startswith(printed) and claim[len(printed)] in ": (")


@pytest.mark.parametrize("doc", RUNNABLE_DOCS)
def test_python_blocks_run_as_written_and_print_what_their_comments_say(doc, monkeypatch, capsys):
    """Every ```python block of the file, in order, in one namespace, as a user pasting them would; every
    ``print(...)  # comment`` prints what its comment claims."""
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python examples"
    monkeypatch.chdir(ROOT)
    printed: list[tuple[str, int, str]] = []

    def recording_print(*values, sep=" ", end="\n", **kwargs):
        frame = inspect.currentframe().f_back
        printed.append((frame.f_code.co_filename, frame.f_lineno, sep.join(map(str, values))))

    namespace = {"__name__": "__main__", "print": recording_print}
    claims = {}
    for number, block in enumerate(blocks, 1):
        name = f"{doc} python block {number}"
        claims.update({(name, line): match.group(1) for line, text in enumerate(block.splitlines(), 1)
                       if (match := re.search(r"^\s*print\(.*\)\s*#\s*(.+)$", text))})
        exec(compile(block, name, "exec"), namespace)
    checked = set()
    for where, line, text in printed:
        claim = claims.get((where, line))
        if claim is not None:
            assert claim_holds(text, claim), f"{where}, line {line} printed {text!r}; its comment says {claim!r}"
            checked.add((where, line))
    assert checked == set(claims), f"prints never run: {sorted(set(claims) - checked)}"


def test_readme_uses_the_package_api_and_links_the_method():
    readme = (ROOT / "README.md").read_text()
    assert "shared/PAPER.md" not in readme
    assert "(docs/method.md)" in readme and "(docs/api.md)" in readme
    code = "\n".join(python_blocks(ROOT / "README.md"))
    assert "import primesvt_plugin as ps" in code
    assert "ps.verified_step(pruner, x)" in code and "pruner.step()" not in code.replace("# pruner.step()", "")
    assert not re.search(r"from primesvt_plugin\.\w+ import|import primesvt_plugin\.\w+", code)


def test_method_doc_stands_alone():
    method = (ROOT / "docs/method.md").read_text()
    for fact in ("2606.03428", "2606.03257", "26.68%", "22.4%", "73.3%", "72.9%", "72.8%", "70.3%",
                 "Groups, not single layers", "L2", "footprint", "head", "T=1", "reset_net", "policy.py"):
        assert fact in method, fact
    assert "PAPER.md" not in method


def test_evaluate_contract_is_documented():
    api = (ROOT / "docs/api.md").read_text()
    for claim in ("eval mode", "torch.no_grad()", "reset", "higher is better", "max_accuracy_drop",
                  "baseline", "sensitivity trial", "compression trial", "after the structural", "references"):
        assert claim in api, claim


def test_attention_layout_documents_every_field():
    doc = inspect.getdoc(AttentionLayout)
    for f in dataclasses.fields(AttentionLayout):
        assert f"``{f.name}``" in doc, f"AttentionLayout's docstring does not document {f.name}"
    for fact in ("ONE of q, k and v", "1 for a separate", "3 for a fused", "chunks=0", "on_resize(module, width, inner)"):
        assert fact in doc, fact


def test_hookspecs_document_parameters_returns_and_firstresult():
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("primesvt_") and callable(f)]
    assert len(specs) == 5  # 4 pruning hooks and primesvt_register (the 0.1 registry hooks were removed in 0.3)
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert ":returns:" in doc, spec.__name__
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, (spec.__name__, param)
        firstresult = spec.primesvt_spec.get("firstresult", False)
        assert ("firstresult" in doc) == firstresult, spec.__name__
    prune_doc = inspect.getdoc(hookspecs.primesvt_prune_spiking_layer)
    assert "sorted ``list[int]``" in prune_doc and "REMOVE" in prune_doc and "requires_grad" in prune_doc


def test_every_benchmark_script_compiles_on_this_python():
    """Benchmarks are run by hand, not by the tests: at least they must parse (an f-string that only Python 3.12
    reads once broke two of them)."""
    scripts = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    assert scripts
    for script in scripts:
        compile(script.read_text(), str(script), "exec")  # raises SyntaxError naming the file and line


def documented_fields() -> dict[str, str]:
    """docs/recipes.md's field table: dotted path -> the default it states (``a.b`` / ``c`` rows: ``a.c``)."""
    section = (ROOT / "docs/recipes.md").read_text().split("## Fields", 1)[1].split("\n## ", 1)[0]
    fields = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([\w.]+)`", cells[0])
        prefix = names[0].rpartition(".")[0]
        paths = [names[0]] + [f"{prefix}.{name}" if prefix else name for name in names[1:]]
        defaults = cells[1].rpartition(";")[2].strip().split(" / ")
        fields.update(zip(paths, defaults if len(defaults) == len(paths) else [None] * len(paths)))
    return fields


def stated_default(text: str):
    """A default as the docs state it: ``none``/``all`` (nothing set), ``required``, or YAML (``{}``, 0.003)."""
    import yaml

    from primesvt_plugin.pipeline.recipe import REQUIRED

    text = text.replace("`", "").strip()
    if text in ("none", "all"):
        return None
    if text == REQUIRED:
        return REQUIRED
    if re.fullmatch(r"[\d.]+ \.\.\. [\d.]+", text):  # a range of rates: its ends
        return [float(end) for end in text.split(" ... ")]
    return yaml.safe_load(text)


def test_the_recipe_field_table_names_every_schema_field_with_its_default():
    """docs/recipes.md documents each field the schema (``Recipe.model_json_schema()``, ``primesvt schema``)
    declares, no other, and states the schema's default."""
    from primesvt_plugin.pipeline.recipe import recipe_fields

    schema, documented = recipe_fields(), documented_fields()
    assert sorted(set(schema) - set(documented)) == [], "fields of the schema missing in docs/recipes.md"
    assert sorted(set(documented) - set(schema)) == [], "fields in docs/recipes.md the schema does not have"
    for path, text in documented.items():
        if text is None:
            continue
        stated, default = stated_default(text), schema[path]
        if isinstance(stated, list) and isinstance(default, list) and len(stated) == 2 < len(default):
            default = [default[0], default[-1]]
        assert stated == pytest.approx(default) if isinstance(default, float) else stated == default, \
            f"docs/recipes.md says {path} defaults to {text}; the schema says {default!r}"


def test_primesvt_schema_prints_the_recipe_json_schema(capsys):
    import json

    from primesvt_plugin.pipeline.cli import main
    from primesvt_plugin.pipeline.recipe import Recipe

    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == Recipe.model_json_schema() and "PruneSection" in printed["$defs"]
