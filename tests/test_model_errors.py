"""hal.model's clear errors for bad use: float token ids, a cache too large for the host, make-tiny onto an
existing file, an unknown backend at load. Each is a typed HAL error naming the argument and the expectation."""

from __future__ import annotations

import pytest
import torch

import hal
import hal.model
from hal.cli import main
from hal.model.tiny import make_tiny


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v4"])
def model(request, tmp_path_factory):
    path = make_tiny(request.param, tmp_path_factory.mktemp(request.param) / "tiny")
    return hal.model.load(path, backend="cpu", dtype=torch.float32)


def test_float_token_ids_are_refused_naming_the_argument(model):
    with pytest.raises(
        hal.InvalidArgumentError,
        match=r"Transformer\.forward: argument 'tokens' expected integer token ids.*got dtype "
        r"torch\.float32",
    ):
        model(torch.tensor([[1.0, 2.0]]), model.new_cache(1, 4))
    with pytest.raises(hal.InvalidArgumentError, match=r"generate: argument 'prompts' expected integer token ids"):
        hal.model.generate(model, [[1.5, 2.0]], max_new_tokens=1)  # not truncated to [[1, 2]]
    assert hal.model.generate(model, torch.tensor([[1, 2]]), max_new_tokens=1) == hal.model.generate(
        model, [[1, 2]], max_new_tokens=1
    )


def test_a_cache_too_large_for_the_host_says_how_much_memory_it_needs(model):
    with pytest.raises(
        hal.InvalidArgumentError,
        match=r"Transformer\.new_cache: argument 'capacity' expected a "
        r"cache that fits in host memory .* GiB",
    ):
        model.new_cache(4, 2**40)


def test_make_tiny_onto_an_existing_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    assert main(["model", "make-tiny", "--arch", "deepseek_v3", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hal: error: make_tiny: argument 'out' expected a directory") and str(target) in err
    assert target.read_text() == "not a directory"


def test_an_unknown_backend_fails_at_load_naming_the_registered_ones(tmp_path):
    path = make_tiny("deepseek_v3", tmp_path / "tiny")
    with pytest.raises(hal.BackendNotFoundError, match=r"no backend named 'nosuch' \(registered: .*cpu"):
        hal.model.load(path, backend="nosuch")
