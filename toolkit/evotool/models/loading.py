"""Load any HF image-text-to-text model (hub id or local path) with its processor."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evotool.errors import ConfigError, ModelError
from evotool.options import DTYPES, LoadOptions
from evotool.validate import device as check_device

LAYER_KEY = re.compile(r"\.layers\.\d+\.")


def default_device() -> str:
    """cpu without CUDA; with it ``cuda``, or ``cuda:<LOCAL_RANK>`` in a process started by torchrun /
    ``accelerate launch`` (one GPU per process for data-parallel runs)."""
    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if rank is not None else "cuda"


def process_state(load: LoadOptions | None = None) -> Any:
    """accelerate's ``PartialState`` of this process (rank, number of processes; one process unless started by
    torchrun / ``accelerate launch``) for a model loaded with ``load``. Processes talk over gloo when they run on
    CPU (``load.device == "cpu"`` or no CUDA) and when their model spans several GPUs (``gpus_per_process > 1``:
    a process's GPU group does not contain ``cuda:LOCAL_RANK``, the device NCCL would bind it to), else over
    NCCL. The first call fixes the state; later calls (``load`` None) read it."""
    from accelerate import PartialState

    cpu = load is not None and (load.device == "cpu" or load.gpus_per_process > 1)
    return PartialState(cpu=cpu or not torch.cuda.is_available())


def gpu_group(gpus_per_process: int, local_rank: int, local_world_size: int, visible: int) -> list[int]:
    """The CUDA device ids process ``local_rank`` of ``local_world_size`` on this node spreads its model over:
    ``[local_rank * G, (local_rank + 1) * G)`` for ``G = gpus_per_process``, out of ``visible`` GPUs.

    Raises ConfigError when ``G > 1`` without CUDA (``visible == 0``) and when the groups of all processes need
    more GPUs than are visible (``G >= 1`` is :class:`~evotool.options.LoadOptions`'s check).
    """
    if gpus_per_process > 1 and visible == 0:
        raise ConfigError(f"--gpus-per-process {gpus_per_process}: CUDA is not available on this machine")
    need = gpus_per_process * local_world_size
    if need > visible:
        raise ConfigError(f"--gpus-per-process {gpus_per_process} x {local_world_size} process(es) on this node needs "
                          f"{need} GPUs, but {visible} are visible; start {max(1, visible // gpus_per_process)} "
                          "process(es) per node or lower --gpus-per-process")
    if not 0 <= local_rank < local_world_size:
        raise ConfigError(f"LOCAL_RANK {local_rank} is outside 0..{local_world_size - 1} (LOCAL_WORLD_SIZE)")
    return list(range(local_rank * gpus_per_process, (local_rank + 1) * gpus_per_process))


def group_max_memory(gpus_per_process: int) -> dict[int | str, int] | None:
    """``max_memory`` for ``device_map="auto"`` holding only this process's GPUs (:func:`gpu_group`, from torchrun's
    ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``; one process: GPUs 0..G-1), each at 90% of its free memory (headroom
    for activations, as transformers leaves by default) and no CPU offload; None for ``gpus_per_process == 1``."""
    if gpus_per_process == 1:
        return None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ
    gpus = gpu_group(gpus_per_process, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)), visible)
    return {i: int(0.9 * torch.cuda.mem_get_info(i)[0]) for i in gpus}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on ``device`` (no-op on CPU), so wall-clock timings are real."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantization_config(kind: str, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelError(f"{kind} loading needs bitsandbytes: pip install 'evotool[quant]'") from err
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(model_id: str | Path, options: LoadOptions | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, processor) for a hub id or local path.

    Raises :class:`ModelError` for a path or id that cannot be found, an unknown architecture, a model that
    takes no image input, missing or truncated weights, weights whose decoder layers disagree with the config
    (e.g. a half-written checkpoint) and a device this machine lacks; ``options.gpus_per_process > 1`` loads
    with ``device_map="auto"`` on this process's GPUs only (:func:`group_max_memory`), checked before loading.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    opts = options or LoadOptions()
    check_device(opts.device)
    max_memory = group_max_memory(opts.gpus_per_process)
    name = str(model_id)
    kwargs: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code, "revision": opts.revision}
    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith((".", "~"))) and not path.is_dir():
        raise ModelError(f"model path not found: {name}")
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load model {name!r}: {_first_line(err)}") from err
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not opts.trust_remote_code:
        raise ModelError(
            f"model {name!r} (model type {config.model_type!r}) is not an image-text-to-text model: it takes no image input"
        )
    dtype = "auto" if opts.dtype == "auto" else getattr(torch, DTYPES[opts.dtype])
    load_kwargs: dict[str, Any] = dict(kwargs, dtype=dtype)
    if opts.quantization:
        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        load_kwargs["quantization_config"] = _quantization_config(opts.quantization, compute)
        load_kwargs["device_map"] = opts.device_map or "auto"
    elif opts.device_map or max_memory:
        load_kwargs["device_map"] = opts.device_map or "auto"
    if max_memory:
        load_kwargs["max_memory"] = max_memory
    model = _load_weights(AutoModelForImageTextToText, name, load_kwargs)
    if "device_map" not in load_kwargs:
        model.to(opts.device or default_device())
    model.eval()
    try:
        processor = AutoProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the processor of {name!r}: {_first_line(err)}") from err
    return model, processor


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load_weights(auto_cls: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``auto_cls.from_pretrained`` with load failures as :class:`ModelError`; refuses weights whose decoder
    layers do not match the config (missing or unexpected ``layers.N`` keys)."""
    from safetensors import SafetensorError

    try:
        model, info = auto_cls.from_pretrained(name, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as err:
        raise ModelError(f"cannot load the weights of {name!r} (missing, truncated or corrupt?): {_first_line(err)}") from err
    for kind in ("missing_keys", "unexpected_keys"):
        layers = sorted(k for k in info.get(kind, ()) if LAYER_KEY.search(k))
        if layers:
            raise ModelError(f"{name!r}: its config and weights disagree on the decoder layers "
                             f"({kind.replace('_', ' ')} such as {layers[0]}); the checkpoint is inconsistent")
    return model


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A short content hash of the weights: parameter names, shapes and a strided sample of values.

    Changes when layers are removed, weights are fine-tuned or a different checkpoint is loaded.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
