"""memkit.integrations as a package of small modules (issue 13, item 1): the public paths still work."""

import importlib
import warnings

import pytest

import memkit
import memkit.integrations as integrations


def test_every_public_import_path_still_works() -> None:
    from memkit.integrations.attach import (  # the module, as before the split
        AttentionAdapter,
        LayerAttend,
        LayerSelector,
        MemorySession,
        attach,
        multihead_attention_adapter,
    )

    assert memkit.attach is integrations.attach is attach
    assert memkit.MemorySession is integrations.MemorySession is MemorySession
    assert integrations.LayerAttend is LayerAttend and integrations.AttentionAdapter is AttentionAdapter
    assert integrations.LayerSelector is LayerSelector
    assert integrations.multihead_attention_adapter is multihead_attention_adapter
    for name in integrations.__all__:
        assert getattr(integrations, name) is not None, name


def test_segment_is_a_deprecated_alias_and_no_longer_collides() -> None:
    from memkit.models.malt import Segment as SamplerSegment

    with pytest.warns(DeprecationWarning, match="memkit.integrations.SegmentLayout"):
        old = integrations.Segment
    assert old is integrations.SegmentLayout
    assert SamplerSegment is not integrations.SegmentLayout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "Segment" not in integrations.__all__ and "MemorySpec" not in integrations.__all__
    with pytest.raises(AttributeError, match="MemorySpec"):
        _ = integrations.MemorySpec  # the name is the backbone config's alone now (memkit.models.malt)


@pytest.mark.parametrize(
    "module",
    [
        "layout",
        "layer_attend",
        "hub",
        "installers",
        "selection",
        "session",
        "attach",
        "adapters",
        "rotary",
        "diffusers_joint",
    ],
)
def test_each_module_imports_on_its_own_and_is_small(module: str) -> None:
    mod = importlib.import_module(f"memkit.integrations.{module}")
    assert mod.__doc__
    with open(mod.__file__) as f:  # type: ignore[arg-type]
        assert sum(1 for _ in f) <= 500
