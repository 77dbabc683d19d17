import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_up_to_date():
    """docs/recipes.md lists every recipe key (regenerate with scripts/recipe_reference.py)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "recipe_reference.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_names_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


# ----------------------------------------------------------------------------- README examples run
# What the README's blocks name, and the stand-in each gets here (no network, seconds on a CPU):
# the tiny random Llama saved as a local folder, and a tiny adapter trained for two steps.
README_MODEL = "mistralai/Mistral-7B-v0.1"
README_ADAPTER = "outputs/smollm2-tova64"


def python_blocks(markdown: str) -> list[str]:
    import re

    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_every_readme_python_block_runs(tmp_path):
    """Each ```python block of README.md executes (its model and adapter names swapped for the
    stand-ins above), so an example cannot go stale."""
    from conftest import tiny_recipe, tiny_run_env

    from msrnn_train.models import random_model
    from msrnn_train.train import train

    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2 and any(README_MODEL in b for b in blocks) and any(README_ADAPTER in b for b in blocks)
    model, tok = random_model()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    with tiny_run_env(tmp_path / "cache"):
        train(tiny_recipe(tmp_path, "adapter", corpus={"n_docs": 3, "words": 200}, **{
            "training.max_steps": 2, "training.save_steps": 2, "eval.max_windows": 0, "eval.at_start": False,
            "wandb.project": None}))
        for i, block in enumerate(blocks):
            code = block.replace(README_MODEL, str(tmp_path / "tiny")).replace(README_ADAPTER, str(tmp_path / "adapter"))
            scope: dict = {"__name__": f"README block {i + 1}"}
            exec(compile(code, f"README.md block {i + 1}", "exec"), scope)  # noqa: S102 - our own README
            assert "model" in scope  # every block builds a model


def test_architecture_names_only_modules_that_exist():
    """docs/architecture.md and the README layout name real modules, and every module is named."""
    import re

    pkg = ROOT / "msrnn_train"
    modules = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"} | {"policies", "kernels"}
    for doc in (ROOT / "docs" / "architecture.md", ROOT / "README.md"):
        named = set(re.findall(r"\b([a-z_]+)\.py\b", doc.read_text()))
        missing = {n for n in named if not any(ROOT.glob(f"*/**/{n}.py")) and n != "apply"}  # apply.py: the moves table
        assert not missing, f"{doc.name} names modules that do not exist: {sorted(missing)}"
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert not {m for m in modules if not re.search(rf"\b{m}\b", text)}, "a module is missing from docs/architecture.md"
