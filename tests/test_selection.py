"""Backend selection: precedence of context manager, environment, config file, auto-detection;
per-operator switches; fallback settings; checked mode; configuration errors."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import plugin_source, portable_backend_source

import hal
import hal.config
import hal.dispatch as dispatch_module
from hal.dispatch import route

GG = hal.ops.grouped_gemm
TR = hal.ops.topk_routing


@pytest.fixture
def two_more(site):
    """Two extra portable backends, 'blue' and 'green' (both serve every operator)."""
    for name in ("blue", "green"):
        site.install(
            f"{name}-hal",
            {name: f"{name}_plugin"},
            {
                f"{name}_plugin": plugin_source(name, f"{name}_backend:B", device_type="cpu"),
                f"{name}_backend": portable_backend_source("B"),
            },
        )


def chosen(op=GG):
    r = route(op)
    return r.backend.name, r.source


def test_auto_detection_falls_back_to_cpu():
    assert chosen() == ("cpu", "auto-detected")


def test_config_file_then_env_then_context(two_more, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.hal]\nbackend = "green"\n')
    hal.config.reload()
    assert chosen() == ("green", f"{tmp_path / 'pyproject.toml'} [tool.hal]")
    (tmp_path / "hal.toml").write_text('backend = "blue"\n')  # hal.toml beats pyproject.toml
    hal.config.reload()
    assert chosen()[0] == "blue"
    monkeypatch.setenv("HAL_BACKEND", "green")
    hal.config.reload()
    assert chosen() == ("green", "environment")
    with hal.use_backend("cpu"):
        assert chosen() == ("cpu", "use_backend()")
        with hal.use_backend("blue"):
            assert chosen()[0] == "blue"
        assert chosen()[0] == "cpu"
    assert chosen()[0] == "green"


def test_hal_config_variable_names_the_file(two_more, tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.toml"
    path.write_text('backend = "blue"\n')
    monkeypatch.setenv("HAL_CONFIG", str(path))
    hal.config.reload()
    assert chosen() == ("blue", str(path))


def test_per_operator_switch_within_a_layer(two_more, monkeypatch):
    monkeypatch.setenv("HAL_BACKEND", "blue")
    monkeypatch.setenv("HAL_OPS", "grouped_gemm=green")
    hal.config.reload()
    assert chosen() == ("green", "environment")
    with hal.use_backend(ops={"grouped_gemm": "cpu"}):
        assert chosen()[0] == "cpu"


def test_a_higher_layer_naming_a_backend_beats_a_lower_per_operator_choice(two_more, monkeypatch):
    monkeypatch.setenv("HAL_OPS", "grouped_gemm=green")
    hal.config.reload()
    with hal.use_backend("blue"):
        assert chosen()[0] == "blue"


def test_config_file_per_operator_tables(two_more, tmp_path):
    (tmp_path / "hal.toml").write_text(
        'backend = "blue"\nfallback = "warn"\n[ops]\ngrouped_gemm = "green"\n[op_fallback]\ngrouped_gemm = "error"\n'
    )
    hal.config.reload()
    r = route(GG)
    assert (r.backend.name, r.policy) == ("green", "error")


def test_fallback_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("HAL_FALLBACK", "warn,grouped_gemm=error")
    hal.config.reload()
    assert route(GG).policy == "error"
    (layer,) = hal.config.layers()
    assert layer.fallback == "warn"


def test_settings_are_per_thread_of_control():
    seen = {}
    with hal.use_backend("cpu", fallback="warn"):
        t = threading.Thread(target=lambda: seen.update(policy=route(GG).policy))
        t.start()
        t.join()
        assert route(GG).policy == "warn"
    assert seen["policy"] == "error"  # a new thread does not inherit this thread's context


def test_unknown_backend_is_a_clear_error():
    with hal.use_backend("nonesuch"), pytest.raises(hal.BackendNotFoundError, match="'nonesuch'.*registered: .*") as e:
        GG(*_inputs())
    assert "cpu" in str(e.value).split("registered: ")[1].split(", ")


@pytest.mark.parametrize(
    "content, message",
    [
        ('fallback = "sometimes"\n', "fallback policy must be one of error, warn"),
        ('[ops]\nno_such_op = "cpu"\n', "no operator named 'no_such_op'"),
        ('backnd = "cpu"\n', "unknown setting"),
        ('checked = "yes"\n', "'checked' must be true or false"),
        ("backend = \n", "not valid TOML"),
    ],
)
def test_bad_config_files_raise_config_error(tmp_path, content, message):
    (tmp_path / "hal.toml").write_text(content)
    hal.config.reload()
    with pytest.raises(hal.ConfigError, match=message):
        GG(*_inputs())


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("HAL_CHECKED", "maybe", "HAL_CHECKED"),
        ("HAL_OPS", "cpu", "op=backend"),
        ("HAL_FALLBACK", "warn,error", "default"),
    ],
)
def test_bad_environment_raises_config_error(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    hal.config.reload()
    with pytest.raises(hal.ConfigError, match=message):
        hal.config.layers()


def test_use_backend_rejects_bad_values():
    with pytest.raises(hal.ConfigError):
        with hal.use_backend("cpu", fallback="never"):
            pass


def test_checked_mode_sources(monkeypatch):
    assert not hal.checked_mode()
    monkeypatch.setenv("HAL_CHECKED", "1")
    hal.config.reload()
    assert hal.checked_mode()
    with hal.use_backend(checked=False):
        assert not hal.checked_mode()


def test_value_checks_run_only_in_checked_mode():
    # Meta tensors have no values: reading them fails. Unchecked, validation must not try to read them.
    x, w, sizes = (t.to("meta") for t in _inputs())
    request = GG.validate(x, w, sizes)
    assert request.device.type == "meta"
    with hal.use_backend(checked=True), pytest.raises(Exception, match="meta"):
        GG.validate(x, w, sizes)


@pytest.fixture(params=["tensor guards", "python keys"])
def signature_path(request, monkeypatch):
    """Both ways a route recognises a signature: torch's C++ tensor guards where this torch has them, and
    the call keys read from Python (the only way where it does not)."""
    if request.param == "python keys":
        monkeypatch.setattr(dispatch_module, "_make_guard", None)
    elif dispatch_module._make_guard is None:
        pytest.skip("this torch has no usable tensor guard")
    hal.dispatch.clear_cache()
    return request.param


@pytest.mark.skipif(
    not torch.__version__.startswith("2.13."),
    reason="the guard class is private: checked on "
    "the torch CI pins; other versions fall back to Python keys when the probe rejects it",
)
def test_tensor_guards_are_found_on_this_torch():
    # probed, not assumed: on the torch CI pins the probe must find it, or the hot path silently loses speed
    assert dispatch_module._make_guard is not None


def test_a_known_signature_skips_validation_and_only_that(monkeypatch, signature_path):
    x, w, sizes = _inputs()
    calls = []
    real = GG._validate
    monkeypatch.setattr(GG, "_validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    GG(x, w, sizes)
    GG(torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([2, 2]))  # same dtypes, shapes, device
    assert len(calls) == 1
    with pytest.raises(hal.InvalidDtypeError, match="'w'"):  # another signature: validated, rejected
        GG(x, w.double(), sizes)
    with pytest.raises(hal.InvalidArgumentError, match="'w'.*last dim 9"):
        GG(torch.randn(4, 9), w, sizes)
    with pytest.raises(hal.InvalidArgumentError, match="'layout'"):  # a keyword's value is part of it
        GG(x, w, sizes, layout="ragged")
    with hal.use_backend(checked=True):  # checked mode validates every call, values included
        GG(x, w, sizes)
        with pytest.raises(hal.InvalidArgumentError, match="'group_sizes'"):
            GG(x, w, torch.tensor([1, 2]))
    assert len(calls) == 6


def test_a_block_entered_again_with_the_same_settings_keeps_its_route():
    # a model enters use_backend once per forward: its routes and validated signatures must carry over
    with hal.use_backend("cpu"):
        first = route(GG)
        GG(*_inputs())
    with hal.use_backend("cpu"):
        assert route(GG) is first and first.known
    with hal.use_backend("cpu", checked=True):
        assert route(GG) is not first and route(GG).checked


@pytest.fixture
def routing_validations(monkeypatch):
    """The list that each validation of a topk_routing call appends to."""
    calls = []
    real = TR._validate
    monkeypatch.setattr(TR, "_validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_guarded_signature_tells_apart_what_validation_can_see(routing_validations, signature_path):
    calls = routing_validations
    logits = torch.randn(4, 8)
    TR(logits, top_k=2)
    TR(torch.randn(4, 8), top_k=2)
    assert len(calls) == 1
    variants = [
        ((logits.t().contiguous().t(),), dict(top_k=2)),
        ((logits.double(),), dict(top_k=2)),
        ((logits[:, :4],), dict(top_k=2)),
        ((logits,), dict(top_k=3)),
        ((logits,), dict(top_k=2.0)),
        ((logits,), dict(top_k=True)),
        ((logits,), dict(top_k=torch.tensor([2, 2]))),
    ]
    for args, kwargs in variants:  # each one validated (and most rejected), none served as the first
        try:
            TR(*args, **kwargs)
        except hal.HalError:
            pass
    assert len(calls) == 1 + len(variants)
    with pytest.raises(hal.InvalidArgumentError, match="'top_k'"):
        TR(logits, top_k=2.0)
    for i in range(3 * dispatch_module._GUARDED_LIMIT):  # more signatures than guards: still each its own
        TR(torch.randn(i + 2, 8), top_k=2)
    with pytest.raises(hal.InvalidArgumentError, match="'top_k'"):
        TR(torch.randn(2, 8), top_k=9)


class _EqualsEverything(type):
    def __eq__(cls, other):
        return True

    __hash__ = type.__hash__


class _Two(metaclass=_EqualsEverything):
    def __eq__(self, other):
        return other == 2

    __hash__ = object.__hash__


@pytest.mark.usefixtures("signature_path")
def test_keyword_order_and_lookalike_values_are_other_signatures():
    logits = torch.randn(4, 8)
    TR(logits, top_k=2, scoring="sigmoid")
    TR(logits, scoring="sigmoid", top_k=2)  # same call in another keyword order: validated again, accepted
    with pytest.raises(hal.InvalidArgumentError, match="'top_k'"):  # a type and a value claiming to be 2
        TR(logits, top_k=_Two(), scoring="sigmoid")
    with pytest.raises(hal.InvalidArgumentError, match="'top_k'"):
        TR(logits, scoring="sigmoid", top_k=2.0)


def test_a_tensor_given_twice_is_served_without_rebuilding_guards(monkeypatch):
    # a C++ tensor guard refuses a tensor given twice (torch.compile's rule): such a call must not leave a
    # guard that can never match, nor build one per call
    if dispatch_module._make_guard is None:
        pytest.skip("this torch has no usable tensor guard")
    made = []
    real = dispatch_module._make_guard
    monkeypatch.setattr(dispatch_module, "_make_guard", lambda args: made.append(1) or real(args))
    hal.dispatch.clear_cache()
    q = torch.randn(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for _ in range(4 * dispatch_module._REGUARD_EVERY):
        hal.ops.mla_prefill(q, q, q, cu, softmax_scale=0.3)
    assert not route(hal.ops.mla_prefill).guarded and len(made) <= 5


def test_a_parameter_or_inference_tensor_is_recognised_on_its_own(routing_validations, signature_path):
    calls = routing_validations
    logits = torch.randn(4, 8)
    TR(logits, top_k=2)
    TR(torch.nn.Parameter(logits.clone()), top_k=2)  # another autograd state: looked up by its Python key
    with torch.inference_mode():
        TR(torch.randn(4, 8), top_k=2)
    assert len(calls) == 1
    with pytest.raises(hal.InvalidArgumentError, match="'top_k'"), torch.inference_mode():
        TR(torch.randn(4, 8), top_k=0)


def test_call_key_tells_apart_what_validation_can_see():
    from hal.dispatch import call_key

    t = torch.zeros(2, 3)
    assert call_key((t,), {}) == call_key((torch.ones(2, 3),), {})
    different = [
        ((t.double(),), {}),
        ((t.t(),), {}),
        ((t.t().contiguous(),), {}),
        ((torch.zeros(3, 2).t(),), {}),
        ((t,), {"top_k": 1}),
        ((t,), {"top_k": True}),
        ((t,), {"top_k": 1.0}),
        ((t,), {"k": 1}),
    ]
    keys = [call_key(a, k) for a, k in different]
    assert call_key((t,), {}) not in keys and len(set(keys)) == len(keys)
    assert call_key((t, 2), {}) != call_key((t, 3), {}) != call_key((t, None), {})  # positional scalars
    assert call_key((t,), {"sinks": t}) != call_key((t,), {"sinks": t.double()})  # keyword tensors
    assert call_key((t,), {"ids": [1, 2]}) is None and call_key(([1],), {}) is None  # validated every time


def test_call_key_of_tuples_tells_apart_their_class_and_items():
    from hal.dispatch import call_key
    from hal.ops.routing import MoePermutation

    t, i = torch.zeros(2, 3), torch.zeros(4, dtype=torch.int32)
    perm = MoePermutation(i, i, i.view(2, 2))
    assert call_key((t, perm), {}) == call_key((t, MoePermutation(i.clone(), i.clone(), i.clone().view(2, 2))), {})
    others = [
        (t, tuple(perm)),
        (t, perm._replace(slot_rows=i.view(4, 1))),
        (t, perm._replace(group_sizes=i.long())),
        (t, perm._replace(slot_rows=torch.zeros(2, 4, dtype=torch.int32)[:, ::2])),
    ]
    assert call_key((t, perm), {}) not in [call_key(a, {}) for a in others]
    shapes = [(128,), (128, 128), (128.0,), (True,), (128, None)]
    keys = [call_key((t,), {"block_shape": b}) for b in shapes]
    assert len(set(keys)) == len(keys) and keys[0] == call_key((t,), {"block_shape": (128,)})
    assert call_key((t,), {"block_shape": (128, [1])}) is None  # an item neither a tensor nor a scalar


def test_moe_unpermute_is_validated_once_per_signature(monkeypatch, signature_path):
    calls = []
    op = hal.ops.moe_unpermute
    real = op._validate
    monkeypatch.setattr(op, "_validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    x_sorted, perm = hal.ops.moe_permute(torch.randn(2, 8), ids, 4)
    weights = torch.rand(2, 2)
    for _ in range(3):
        hal.ops.moe_unpermute(x_sorted, weights, perm)
    assert len(calls) == 1
    with pytest.raises(hal.InvalidArgumentError, match="'weights'"):  # other shapes: validated again
        hal.ops.moe_unpermute(x_sorted, torch.rand(2, 3), perm)


def test_a_class_keyed_by_identity_never_lends_its_id_to_another(signature_path):
    # a call key names a tuple's class by its id: once a call is known, a class created later in the place
    # of a collected one must not pass for it (its calls must be validated, and refused)
    import collections
    import gc

    from hal.ops.routing import MoePermutation

    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    x_sorted, perm = hal.ops.moe_permute(torch.randn(2, 8), ids, 4)

    def subclass():
        class Sub(MoePermutation):
            __slots__ = ()

        return Sub

    sub = subclass()
    hal.ops.moe_unpermute(x_sorted, torch.rand(2, 2), sub(*perm))
    old = id(sub)
    del sub
    gc.collect()
    for _ in range(100):
        other = collections.namedtuple("Other", "group_sizes sorted_slots slot_rows")
        assert id(other) != old
        with pytest.raises(hal.InvalidArgumentError, match="'permutation'"):
            hal.ops.moe_unpermute(x_sorted, torch.rand(2, 2), other(*perm))


def _inputs():
    return torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([1, 3])


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: GG(torch.randn(4, 8), torch.randn(2, 3, 8), torch.tensor([1, 2])), "group_sizes"),
        (
            lambda: hal.ops.mla_prefill(
                *[torch.randn(4, 1, 8)] * 3, torch.tensor([0, 3, 2], dtype=torch.int32), softmax_scale=1.0
            ),
            "cu_seqlens_q",
        ),
        (
            lambda: hal.ops.mla_decode(
                torch.randn(1, 1, 1, 8),
                torch.randn(2, 4, 8),
                torch.tensor([[0, 5]], dtype=torch.int32),
                torch.tensor([6], dtype=torch.int32),
                softmax_scale=1.0,
                head_dim_v=8,
            ),
            "block_table",
        ),
        (
            lambda: hal.ops.mla_decode(
                torch.randn(1, 1, 1, 8),
                torch.randn(2, 4, 8),
                torch.tensor([[0, 1]], dtype=torch.int32),
                torch.tensor([9], dtype=torch.int32),
                softmax_scale=1.0,
                head_dim_v=8,
            ),
            "seq_lens",
        ),
        (lambda: hal.ops.paged_cache_write(torch.zeros(2, 4, 8), torch.ones(1, 8), torch.tensor([-5])), "slot_mapping"),
        (
            lambda: hal.ops.paged_cache_write(torch.zeros(2, 4, 8), torch.ones(2, 8), torch.tensor([1, 1])),
            "slot_mapping",
        ),
        (lambda: hal.ops.hash_routing(torch.tensor([-1]), torch.tensor([[0, 1]]), torch.randn(1, 4)), "token_ids"),
        (lambda: hal.ops.moe_permute(torch.randn(2, 4), torch.tensor([[0], [3]]), 3), "ids"),
    ],
)
def test_the_cpu_backend_rejects_bad_values_it_indexes_with_outside_checked_mode(call, argument):
    assert not hal.checked_mode()
    with pytest.raises(hal.InvalidArgumentError) as info:
        call()
    assert info.value.argument == argument
