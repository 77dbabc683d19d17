"""The tested transformers range: a clear warning outside it, and the cache reaching the bounded
layers under either name of the forward's cache argument (`cache` since transformers 5.24,
`past_key_values` before)."""

import subprocess
import sys
import warnings

import pytest
import torch

from msrnn_train import BudgetSpec, apply_budget, make_cache
from msrnn_train.compat import CACHE_KWARG, TESTED_TRANSFORMERS, _warned, check_transformers

from conftest import tiny_model


def test_out_of_range_version_warns_once_naming_version_range_and_fix():
    _warned.clear()
    lo, hi = TESTED_TRANSFORMERS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_transformers("9.1.0") is False
        assert check_transformers("9.1.0") is False  # once per version
        assert check_transformers("4.57.1") is False  # below the floor
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 2, msgs
    assert "transformers 9.1.0 is installed" in msgs[0]
    assert f">={lo},<={hi}" in msgs[0] and "constraints.txt" in msgs[0]
    assert "transformers 4.57.1 is installed" in msgs[1]


@pytest.mark.parametrize("version", [TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1]])
def test_versions_inside_the_range_do_not_warn(version):
    _warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_transformers(version) is True
    # a patch release of the ceiling's minor version is inside too
    major, minor, _ = TESTED_TRANSFORMERS[1].split(".")
    assert check_transformers(f"{major}.{minor}.9") is True


def test_import_with_an_untested_transformers_warns_once_not_a_traceback():
    code = ("import warnings; warnings.simplefilter('always'); import transformers; "
            "transformers.__version__ = '99.0.0'; import msrnn_train; import msrnn_train.compat as c; "
            "c.check_transformers(); print('imported')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "imported" in res.stdout
    assert res.stderr.count("transformers 99.0.0 is installed") == 1, res.stderr[-2000:]


def test_installed_version_is_inside_the_tested_range():
    import transformers

    assert check_transformers(transformers.__version__), transformers.__version__


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_either_cache_argument_name_decodes_through_the_bounded_cache(name):
    model = tiny_model("llama")
    apply_budget(model, BudgetSpec(policy="tova", budget=4))
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    cache = make_cache(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name is deprecated from 5.24 on
        model(input_ids=ids[:, :8], use_cache=True, **{name: cache})
        for t in range(8, 12):
            model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
    assert cache.get_seq_length() == 12
    assert max(cache.state_sizes()) == 4
    assert CACHE_KWARG in ("cache", "past_key_values")
