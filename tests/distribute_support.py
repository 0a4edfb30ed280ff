"""A tiny stand-in backbone for the distributed-training tests, importable from their subprocesses.

Tracing MobileNetV2 once per replica takes minutes on two busy cores; these tests are about the
strategy, so the backbone is a 3-block CNN with the same ingredients (Conv, Depthwise, BatchNorm).
"""
from __future__ import annotations


def tiny_backbone(name, image_size, alpha=1.0, weights=None, weights_fallback="none"):
    """Same signature and result type as `edgetl.backbones.create_backbone`."""
    import tf_keras as keras

    from edgetl.backbones import BackboneResult

    L = keras.layers
    x = inputs = keras.Input((image_size, image_size, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv")(x)
    x = L.ReLU(name="conv_relu")(L.BatchNormalization(name="conv_bn")(x))
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.ReLU(name="dw_relu")(L.BatchNormalization(name="dw_bn")(x))
    x = L.Conv2D(64, 1, use_bias=False, name="project")(x)
    x = L.ReLU(name="out_relu")(L.BatchNormalization(name="project_bn")(x))
    return BackboneResult(keras.Model(inputs, x, name="tiny_backbone"), "random")


def use_tiny_backbone(monkeypatch=None) -> None:
    """Make `build_classifier` use `tiny_backbone` (through pytest's monkeypatch when given)."""
    import edgetl.backbones

    if monkeypatch is not None:
        monkeypatch.setattr(edgetl.backbones, "create_backbone", tiny_backbone)
    else:
        edgetl.backbones.create_backbone = tiny_backbone
