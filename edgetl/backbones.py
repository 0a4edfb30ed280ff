"""Backbone registry and the transfer classifier built on top of it.

One `BackboneSpec` per architecture (like timm's registry): default input size, which preprocessing
it expects, the Keras cache file name of its ImageNet weights, and the named layers that make good
intermediate features. `build_classifier` wraps a backbone with its preprocessing baked in and a new
head, so every model takes raw RGB 0-255.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgetl.errors import EdgetlError

# Keras' MobileNetV2 weights exist for these input sizes; others load the nearest.
_MNV2_ROWS = (96, 128, 160, 192, 224)


class WeightsError(EdgetlError, RuntimeError):
    """ImageNet weights could not be obtained; the message names the cache file and the options."""


class BackboneError(EdgetlError, ValueError):
    """A recipe names a layer or setting the backbone does not have."""


# Keras applications' preprocessing modes, as layers that the classifier puts in front of the backbone.
# "builtin": the application preprocesses raw 0-255 RGB itself (MobileNetV3, EfficientNet).
PREPROCESSING = {
    "tf": "x / 127.5 - 1 (Rescaling)",
    "caffe": "RGB -> BGR, minus the ImageNet mean (1x1 Conv2D, frozen)",
    "torch": "x / 255, minus the ImageNet mean, over its std (Normalization)",
    "builtin": "built into the Keras application",
}
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# `edgetl backbones` calls an architecture edge-sized when it is at most this big at its default size.
EDGE_MAX_PARAMS, EDGE_MAX_MACS = 10_000_000, 1_200_000_000


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    app: str  # attribute of keras.applications
    default_size: int
    preprocessing: str  # a key of PREPROCESSING
    feature_layers: tuple[str, ...]
    weights_file: Callable[[float, int], str]  # (alpha, size) -> Keras cache file name
    has_alpha: bool = False
    builder_kwargs: tuple = ()
    build: Callable | None = None  # builder(include_top, input_shape, weights, **kwargs) instead of keras.applications

    def builder(self):
        """The function that builds the headless backbone."""
        import tf_keras as keras

        return self.build or getattr(keras.applications, self.app)

    def keras_kwargs(self, alpha: float) -> dict:
        kwargs = dict(self.builder_kwargs)
        if self.has_alpha:
            kwargs["alpha"] = alpha
        return kwargs


def _mnv2_file(alpha: float, size: int) -> str:
    rows = size if size in _MNV2_ROWS else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{_alpha_txt(alpha)}_{rows}_no_top.h5"


def _alpha_txt(alpha: float) -> str:
    return f"{alpha:g}" if alpha != 1.0 else "1.0"


def _mnv3_file(kind: str) -> Callable[[float, int], str]:
    return lambda alpha, size: f"weights_mobilenet_v3_{kind}_224_{_alpha_txt(alpha)}_float_no_top_v2.h5"


def _effnet_file(tag: str) -> Callable[[float, int], str]:
    return lambda alpha, size: f"{tag}_notop.h5"


def _keras_file(tag: str) -> Callable[[float, int], str]:
    return lambda alpha, size: f"{tag}_weights_tf_dim_ordering_tf_kernels_notop.h5"


# Name of the classifier's pooled-features layer (the head's input; what pruning distillation matches).
POOL_LAYER = "pool"

_EFF_FEATURES = ("block2a_expand_activation", "block3a_expand_activation", "block4a_expand_activation",
                 "block6a_expand_activation", "top_activation")

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mobilenet_v2", "MobileNetV2", 224, "tf",
                     ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
                      "block_13_expand_relu", "out_relu"), _mnv2_file, has_alpha=True),
        BackboneSpec("mobilenet_v3_small", "MobileNetV3Small", 224, "builtin",
                     ("Conv/BatchNorm", "expanded_conv_1/expand/BatchNorm", "expanded_conv_3/expand/BatchNorm",
                      "expanded_conv_6/expand/BatchNorm", "Conv_1/BatchNorm"), _mnv3_file("small"), has_alpha=True,
                     builder_kwargs=(("include_preprocessing", True), ("minimalistic", False))),
        BackboneSpec("mobilenet_v3_large", "MobileNetV3Large", 224, "builtin",
                     ("Conv/BatchNorm", "expanded_conv_3/expand/BatchNorm", "expanded_conv_6/expand/BatchNorm",
                      "expanded_conv_12/expand/BatchNorm", "Conv_1/BatchNorm"), _mnv3_file("large"), has_alpha=True,
                     builder_kwargs=(("include_preprocessing", True), ("minimalistic", False))),
        BackboneSpec("efficientnet_b0", "EfficientNetB0", 224, "builtin", _EFF_FEATURES, _effnet_file("efficientnetb0")),
        BackboneSpec("efficientnet_b1", "EfficientNetB1", 240, "builtin", _EFF_FEATURES, _effnet_file("efficientnetb1")),
        BackboneSpec("efficientnet_b2", "EfficientNetB2", 260, "builtin", _EFF_FEATURES, _effnet_file("efficientnetb2")),
        BackboneSpec("efficientnet_b3", "EfficientNetB3", 300, "builtin", _EFF_FEATURES, _effnet_file("efficientnetb3")),
        BackboneSpec("efficientnet_v2_b0", "EfficientNetV2B0", 224, "builtin",
                     ("block1a_project_activation", "block2b_expand_activation", "block4a_expand_activation",
                      "block6a_expand_activation", "top_activation"), _effnet_file("efficientnetv2-b0"),
                     builder_kwargs=(("include_preprocessing", True),)),
        # Server-class architectures, for comparison with the edge-sized ones above.
        BackboneSpec("resnet50", "ResNet50", 224, "caffe",
                     ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
                     _keras_file("resnet50")),
        BackboneSpec("inception_v3", "InceptionV3", 299, "tf", ("mixed2", "mixed5", "mixed7", "mixed10"),
                     _keras_file("inception_v3")),
        BackboneSpec("xception", "Xception", 299, "tf", ("add", "add_3", "add_7", "block14_sepconv2_act"),
                     _keras_file("xception")),
        BackboneSpec("densenet121", "DenseNet121", 224, "torch", ("pool2_pool", "pool3_pool", "pool4_pool", "relu"),
                     _keras_file("densenet121")),
        BackboneSpec("vgg16", "VGG16", 224, "caffe", ("block2_pool", "block3_pool", "block4_pool", "block5_pool"),
                     _keras_file("vgg16")),
        # Like timm's test_* models: seconds to train, for smoke tests of the pipeline (random weights only).
        BackboneSpec("test_cnn", "", 32, "tf", ("block1_relu", "out_relu"), lambda alpha, size: "",
                     build=lambda **kwargs: _test_cnn(**kwargs)),
    )
}


def preprocessing_layer(kind: str):
    """The layer (named "preprocess") that maps raw RGB 0-255 to what a backbone of this kind expects; None for builtin."""
    import numpy as np
    import tf_keras as keras

    if kind == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")
    if kind == "torch":
        mean, std = 255.0 * np.array(_TORCH_MEAN), 255.0 * np.array(_TORCH_STD)
        return keras.layers.Normalization(mean=mean.tolist(), variance=(std ** 2).tolist(), name="preprocess")
    if kind == "caffe":  # channel swap and mean subtraction are one exact 1x1 convolution
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_channel in range(3):
            kernel[0, 0, 2 - out_channel, out_channel] = 1.0
        return keras.layers.Conv2D(3, 1, name="preprocess", trainable=False,
                                   kernel_initializer=keras.initializers.Constant(kernel.tolist()),
                                   bias_initializer=keras.initializers.Constant([-m for m in _CAFFE_MEAN_BGR]))
    return None


def _test_cnn(include_top: bool, input_shape, weights=None):
    """A 3-layer CNN with MobileNet's ingredients (Conv, DepthwiseConv, BatchNorm, ReLU6); random weights only."""
    import tf_keras as keras

    if weights is not None:
        raise WeightsError("backbone test_cnn has no pretrained weights: set model.weights: null")
    L = keras.layers
    x = inputs = keras.Input(input_shape)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="block1_conv")(x)
    x = L.ReLU(6.0, name="block1_relu")(L.BatchNormalization(name="block1_bn")(x))
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="block2_dw")(x)
    x = L.ReLU(6.0, name="block2_relu")(L.BatchNormalization(name="block2_bn")(x))
    x = L.Conv2D(32, 1, use_bias=False, name="block3_project")(x)
    x = L.ReLU(6.0, name="out_relu")(L.BatchNormalization(name="block3_bn")(x))
    return keras.Model(inputs, x, name="test_cnn")


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`, with a helpful error for unknown names."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def keras_cache_dir() -> Path:
    """Where Keras looks for downloaded weights before fetching them."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


@dataclass
class BackboneResult:
    model: object  # keras.Model
    weights_source: str  # "imagenet", "imagenet (random fallback)", a path, or "random"
    warning: str | None = None


def create_backbone(name: str, image_size: int, alpha: float = 1.0, weights: str | None = "imagenet",
                    weights_fallback: str = "none") -> BackboneResult:
    """Build the headless backbone; ImageNet weights come from the normal Keras cache/download path."""
    spec = get_spec(name)
    builder = spec.builder()
    kwargs = dict(include_top=False, input_shape=(image_size, image_size, 3), **spec.keras_kwargs(alpha))
    if weights is None:
        return BackboneResult(builder(weights=None, **kwargs), "random")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"model.weights: file {path} not found (use `imagenet`, a weights file, or null)")
        return BackboneResult(builder(weights=str(path), **kwargs), str(path))
    try:
        return BackboneResult(builder(weights="imagenet", **kwargs), "imagenet")
    except Exception as exc:  # noqa: BLE001 - download failures surface as many exception types
        expected = keras_cache_dir() / spec.weights_file(alpha, image_size)
        message = (
            f"ImageNet weights for {name} (alpha {alpha:g}, {image_size}px) could not be obtained: {exc}\n"
            f"Keras looked for {expected} and then tried to download it. Options:\n"
            f"  - go online once so Keras can download and cache it;\n"
            f"  - copy the file there yourself (pre-seed the cache);\n"
            f"  - set `model.weights: /path/to/weights.h5` in the recipe;\n"
            f"  - set `model.weights: null` to train from random init (much lower accuracy).")
        if weights_fallback != "random":
            raise WeightsError(message) from None
        warning = (f"WARNING: ImageNet weights unavailable ({expected} missing, download failed); "
                   f"using RANDOM weights because the recipe sets weights_fallback: random. "
                   f"Accuracy will be far below a pretrained model.")
        return BackboneResult(builder(weights=None, **kwargs), "random (imagenet unavailable)", warning)


def cut_backbone(base, cut_at: str, name: str):
    """The backbone from its input to layer `cut_at` (same layers and weights); BackboneError naming the
    recipe key and the layers with similar names when there is no such layer."""
    import tf_keras as keras

    names = [layer.name for layer in base.layers]
    if cut_at not in names:
        close = difflib.get_close_matches(cut_at, names, n=6, cutoff=0.5)
        prefix = [n for n in names if n.split("_")[:2] == cut_at.split("_")[:2]][:6]
        nearby = list(dict.fromkeys(close + prefix)) or names[-6:]
        raise BackboneError(f"model.cut_at: backbone {name} has no layer named {cut_at!r}; nearby names: "
                            f"{', '.join(nearby)} (all {len(names)}: `edgetl features RUN --list-layers`)")
    return keras.Model(base.input, base.get_layer(cut_at).output, name=f"{base.name}_to_{cut_at}")


@dataclass
class Classifier:
    """A transfer model and its parts; head layers are shared between `model` and `head`."""

    model: object  # image (raw RGB) -> class probabilities
    backbone: object  # the nested backbone Model
    features: object  # image -> pooled backbone features
    head: object  # pooled features -> class probabilities
    weights_source: str
    warning: str | None = None


def build_classifier(num_classes: int | dict[str, int], backbone: str = "mobilenet_v2", image_size: int | None = None,
                     alpha: float = 1.0, weights: str | None = "imagenet", weights_fallback: str = "none",
                     pooling: str = "avg", dropout: float = 0.2, hidden_units=(), seed: int = 0,
                     cut_at: str | None = None) -> Classifier:
    """Raw RGB input -> baked preprocessing -> frozen backbone (inference mode), cut at layer `cut_at` when
    given -> pooling -> head.

    `num_classes` as {head name: classes} builds a multi-task model: dropout and hidden layers are
    shared, then one softmax Dense per head, named after the head, in dict order (the model's outputs).
    """
    import tf_keras as keras

    spec = get_spec(backbone)
    size = image_size or spec.default_size
    result = create_backbone(backbone, size, alpha, weights, weights_fallback)
    base = result.model if cut_at is None else cut_backbone(result.model, cut_at, backbone)
    base.trainable = False
    L = keras.layers
    image = keras.Input((size, size, 3), name="image")
    preprocess = preprocessing_layer(spec.preprocessing)
    x = preprocess(image) if preprocess is not None else image
    x = base(x, training=False)
    pool = L.GlobalAveragePooling2D(name=POOL_LAYER) if pooling == "avg" else L.GlobalMaxPooling2D(name=POOL_LAYER)
    pooled = pool(x)
    trunk = [L.Dropout(dropout, seed=seed, name="dropout")]
    trunk += [L.Dense(u, activation="relu", name=f"hidden_{i}") for i, u in enumerate(hidden_units)]
    heads = num_classes if isinstance(num_classes, dict) else {"predictions": num_classes}
    # float32 even under a mixed_float16 policy: the softmax and the loss need float32 precision
    outputs = [L.Dense(n, activation="softmax", name=name, dtype="float32",
                       kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i))
               for i, (name, n) in enumerate(heads.items())]
    feat_in = keras.Input((pooled.shape[-1],), name="features")
    y, h = pooled, feat_in
    for layer in trunk:
        y, h = layer(y), layer(h)
    ys, hs = [out(y) for out in outputs], [out(h) for out in outputs]
    if not isinstance(num_classes, dict):
        ys, hs = ys[0], hs[0]
    model = keras.Model(image, ys, name=f"{backbone}_classifier")
    return Classifier(model, base, keras.Model(image, pooled, name="features"),
                      keras.Model(feat_in, hs, name="head"), result.weights_source, result.warning)


def unfreeze(backbone, layers: int | None = None, from_layer: str | None = None,
             fraction: float | None = None) -> int:
    """Make the top of the backbone trainable (BatchNorm stays frozen); returns the first trainable index."""
    import tf_keras as keras

    n = len(backbone.layers)
    if from_layer is not None:
        names = [layer.name for layer in backbone.layers]
        if from_layer not in names:
            raise BackboneError(f"train.stage2.unfreeze_from: no layer named {from_layer!r} in the backbone "
                             f"(see `edgetl features RUN --list-layers`)")
        start = names.index(from_layer)
    elif layers is not None:
        start = max(0, n - layers)
    else:
        start = int(round(n * (1.0 - (fraction if fraction is not None else 1.0))))
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return start


def describe(name: str) -> dict:
    """Input size, parameter count, multiply-accumulates and edge-sizedness of a backbone at its default size."""
    spec = get_spec(name)
    base = create_backbone(name, spec.default_size, weights=None).model
    params, macs = int(base.count_params()), count_macs(base)
    return {"name": name, "input_size": spec.default_size, "params": params, "macs": macs,
            "edge_sized": params <= EDGE_MAX_PARAMS and macs <= EDGE_MAX_MACS,
            "preprocessing": PREPROCESSING[spec.preprocessing]}


def count_macs(model) -> int:
    """Multiply-accumulates of Conv/Depthwise/Separable/Dense layers for one image (static shapes)."""
    import tf_keras as keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
            continue
        out = layer.output_shape if not isinstance(layer.output_shape, list) else layer.output_shape[0]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += out[1] * out[2] * out[3] * kh * kw
        elif isinstance(layer, keras.layers.SeparableConv2D):  # depthwise, then pointwise
            kh, kw = layer.kernel_size
            mid = layer.input_shape[-1] * layer.depth_multiplier
            total += out[1] * out[2] * mid * (kh * kw + out[3])
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.input_shape[-1]
            total += out[1] * out[2] * out[3] * kh * kw * cin // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input_shape[-1] * layer.units
    return int(total)


def calibrate_batchnorm(clf: Classifier, images) -> None:
    """Set the backbone's BatchNorm statistics to those of raw RGB `images` (one training-mode pass).

    A randomly initialised backbone has identity BatchNorm statistics, so in inference mode its
    activations shrink towards zero layer by layer and the frozen features carry no signal. Used
    only for random weights; pretrained statistics are never touched.
    """
    import tf_keras as keras

    backbone = clf.backbone
    names = [layer.name for layer in clf.model.layers]
    if "preprocess" in names:
        images = clf.model.get_layer("preprocess")(images)
    bns = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [(layer.momentum, layer.trainable) for layer in bns]
    was_trainable = backbone.trainable
    backbone.trainable = True
    for layer in bns:
        layer.momentum = 0.0
    try:
        backbone(images, training=True)
    finally:
        for layer, (momentum, trainable) in zip(bns, saved):
            layer.momentum, layer.trainable = momentum, trainable
        backbone.trainable = was_trainable


def image_size_for(recipe) -> int:
    """The recipe's input size, or its backbone's default."""
    return recipe.data.image_size or get_spec(recipe.model.backbone).default_size
