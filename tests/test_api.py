"""The public API: `import slimcore` lists every name, each with an example, without loading torch."""

from __future__ import annotations

import pydoc
import subprocess
import sys
from pathlib import Path

import slimcore

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_public_name_with_an_example() -> None:
    text = pydoc.render_doc(slimcore, renderer=pydoc.plaintext)
    missing = [name for name in slimcore.__all__ if name not in text]
    assert not missing, f"help(slimcore) does not list {missing}"
    without = [name for name in slimcore.__all__ if ">>>" not in (getattr(slimcore, name).__doc__ or "")]
    assert not without, f"public names without a docstring example: {without}"


def test_the_api_names_what_the_issue_asks_for() -> None:
    wanted = {"slim", "slim_to", "SlimPolicy", "SlimReport", "SlimError", "GammaPenalty", "build_model",
              "save_model", "load_model", "load_weights", "count_flops", "count_params", "export_onnx"}
    assert wanted <= set(slimcore.__all__)
    assert all(callable(getattr(slimcore, name)) for name in slimcore.__all__)


def test_import_slimcore_loads_no_torch_until_a_name_is_used() -> None:
    code = ("import sys, slimcore; before = 'torch' in sys.modules; slimcore.count_params; "
            "print(before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.split() == ["False", "True"]


def test_an_unknown_name_fails_like_a_module_attribute() -> None:
    try:
        slimcore.slimm  # noqa: B018
    except AttributeError as err:
        assert "slimm" in str(err)
    else:
        raise AssertionError("slimcore.slimm resolved")
