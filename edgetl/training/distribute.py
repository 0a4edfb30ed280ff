"""Distributed and GPU training on TensorFlow's own engine (`tf.distribute`), chosen by the recipe.

`make_strategy` maps `distribute.strategy` to a `tf.distribute.Strategy`; training builds and
compiles every model inside its scope, and Keras splits each global batch across the replicas.
`mixed_precision` switches Keras to `mixed_float16` only while a model is built and trained.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from edgetl.errors import EdgetlError

TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


class DistributeError(EdgetlError, ValueError):
    """A distribution setting that cannot work; the message names the setting and the fix."""


def gpu_count() -> int:
    """Physical GPUs TensorFlow can see (does not start the TensorFlow runtime)."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def read_tf_config(environ=os.environ) -> dict:
    """The parsed and checked TF_CONFIG environment variable that `multi_worker` is configured from."""
    hint = f"Set TF_CONFIG on every worker, e.g. TF_CONFIG='{TF_CONFIG_EXAMPLE}' (index 1 on the second host)"
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        raise DistributeError(f"distribute.strategy = multi_worker needs the TF_CONFIG environment variable, "
                              f"which is not set. {hint}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DistributeError(f"TF_CONFIG is not valid JSON ({exc}). {hint}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    me = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and v and all(isinstance(a, str) and ":" in a for a in v) for v in cluster.values()):
        raise DistributeError(f"TF_CONFIG: 'cluster' must map job names to lists of 'host:port' addresses, "
                              f"got {cluster!r}. {hint}")
    if not isinstance(me, dict) or me.get("type") not in cluster or not isinstance(me.get("index"), int) \
            or not 0 <= me["index"] < len(cluster[me["type"]]):
        raise DistributeError(f"TF_CONFIG: 'task' must be {{\"type\": one of {sorted(cluster)}, \"index\": a "
                              f"position in that job's address list}}, got {me!r}. {hint}")
    return config


def make_strategy(cfg, echo: Callable[[str], None] = print):
    """The `tf.distribute.Strategy` for a DistributeConfig.

    Call it before TensorFlow runs anything in the process: MultiWorkerMirroredStrategy configures
    the runtime's collective ops, which is only possible at startup.
    """
    import tensorflow as tf

    choice = cfg.strategy
    if choice == "auto":
        choice = "mirrored" if gpu_count() > 1 else "none"
    if choice == "none":
        return tf.distribute.get_strategy()
    if choice == "mirrored":
        _check_devices(cfg.devices)
        return tf.distribute.MirroredStrategy(devices=cfg.devices or None)
    read_tf_config()
    if cfg.devices:
        echo("  note: distribute.devices is ignored by multi_worker (every worker uses its local devices)")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (ValueError, RuntimeError) as exc:
        raise DistributeError(f"distribute.strategy = multi_worker could not start ({exc}). It must be created "
                              f"before TensorFlow runs anything in the process: run one fresh `edgetl train` "
                              f"process per worker") from None


def _check_devices(devices: list[str]) -> None:
    """Fail early, naming the visible devices, when `distribute.devices` lists one that does not exist."""
    import tensorflow as tf

    visible = {(d.device_type, int(d.name.rsplit(":", 1)[1])) for d in tf.config.list_logical_devices()}
    for name in devices:
        try:
            spec = tf.DeviceSpec.from_string(name)
            known = (str(spec.device_type).upper(), spec.device_index) in visible
        except ValueError:
            known = False
        if not known:
            shown = ", ".join(f"/{kind.lower()}:{i}" for kind, i in sorted(visible))
            raise DistributeError(f"distribute.devices: {name!r} is not a visible device (visible: {shown})")


def replicas(strategy) -> int:
    """Replicas that share each global batch (devices times workers)."""
    return int(strategy.num_replicas_in_sync)


def task(strategy) -> tuple[str, int] | None:
    """(task type, index) of this process in a multi-worker cluster, e.g. ("worker", 1); None outside one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    return resolver.task_type, int(resolver.task_id)


def is_chief(strategy) -> bool:
    """True unless this is a non-chief worker of a multi-worker cluster (only the chief writes the run)."""
    me = task(strategy)
    if me is None or me[0] == "chief":
        return True
    return me == ("worker", 0) and "chief" not in strategy.cluster_resolver.cluster_spec().as_dict()


def worker_cache_dir(strategy) -> Path | None:
    """This worker's own tf.data disk-cache folder in a multi-worker cluster (workers may share a disk:
    one host, an NFS home), else None for the default folder."""
    me = task(strategy)
    if me is None:
        return None
    from edgetl.data import cache_root

    return cache_root() / "tfdata" / f"{me[0]}-{me[1]}"


def describe(strategy) -> dict:
    """Strategy name (`default` = TensorFlow's single-device placement), replicas and local devices."""
    import tensorflow as tf

    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list: TF places ops on GPU:0 if present
        return {"strategy": "default", "replicas": 1, "devices": ["/device:GPU:0" if gpu_count() else "/device:CPU:0"]}
    public = ("MultiWorkerMirroredStrategy", "MirroredStrategy")  # the tf.distribute names, not the class names
    name = next((n for n in public if isinstance(strategy, getattr(tf.distribute, n))), type(strategy).__name__)
    return {"strategy": name, "replicas": replicas(strategy), "devices": devices}


def scaled_learning_rate(lr: float, cfg, n: int) -> float:
    """The recipe's learning rate under `distribute.lr_scaling` for `n` replicas (linear: lr * n)."""
    return lr * n if cfg.lr_scaling == "linear" else lr


@contextlib.contextmanager
def mixed_precision(cfg, echo: Callable[[str], None] = print) -> Iterator[bool]:
    """Use Keras' `mixed_float16` policy inside the block when the recipe asks and a GPU is visible.

    Yields whether it is active; the previous global policy is restored on exit.
    """
    if not cfg.mixed_precision:
        yield False
        return
    if gpu_count() == 0:
        echo("  note: distribute.mixed_precision ignored: no GPU visible (float16 only pays off on GPUs)")
        yield False
        return
    import tf_keras as keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield True
    finally:
        keras.mixed_precision.set_global_policy(previous)
