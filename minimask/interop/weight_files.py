"""Reading weight files safely: they are often downloaded from strangers, and pickles can run code.

`read_weights(path) -> (state, fmt)`: .pth / zip files go through `minimask.engine.checkpoint.load_checkpoint`
(`torch.load(weights_only=True)`, CRC-checked); Detectron / detectron2 pickles (Python-2 era, latin-1) through
`_RestrictedUnpickler`, which admits numpy arrays and plain containers only, so a crafted file is refused before
anything runs. The state is unwrapped ({"model"}, {"blobs"}, {"state_dict"}), arrays become tensors, and the
format is told from the key names: "torchvision", "caffe2" or "minimask" (`minimask.interop.imagenet` uses it), or
"detectron2" for a detectron2 detection checkpoint (not an ImageNet backbone format, so not in FORMATS). Every
error is a ValueError naming the file.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from minimask.engine.checkpoint import CheckpointError, load_checkpoint

FORMATS = ("torchvision", "caffe2", "minimask")
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-1.6 (non-zip) torch.save file


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as Python-3 protocol-2 pickles use it for bytes: only the latin-1 str -> bytes case."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return text.encode("latin1")


# The callables numpy's own pickles name, looked up from numpy itself (numpy 1 calls the module numpy.core,
# numpy 2 numpy._core; both spellings occur in files, and the modules need not be imported to resolve them).
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles of arrays
_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict, ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _NP_RECONSTRUCT
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _NP_SCALAR
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _NP_FROMBUFFER


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array / dtype / scalar constructors and OrderedDict: every other global
    (os.system, builtins.eval, torch internals, ...) raises ValueError before it can be called."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # Detectron pickles are Python-2 pickles of numpy arrays
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ValueError(f"refusing to load {self._path}: it asks to run {module}.{name}") from None


def _unpickle(path: str):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path).load()
    except ValueError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, ... : truncated or not a pickle
        raise ValueError(f"cannot read {path}: it is truncated or not a weights file ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def _load_pth(path: str):
    try:
        return load_checkpoint(path)  # torch.load(weights_only=True) with CRC check and clear errors
    except CheckpointError as e:
        raise ValueError(str(e)) from None


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file safely and return (state, fmt).

    .pth / zip files: `torch.load(weights_only=True)`; anything else: the restricted unpickler (latin-1, for
    Python-2 Detectron pickles). Wrappers {"model": ...}, {"blobs": ...}, {"state_dict": ...} are unwrapped, a
    "module." prefix (DistributedDataParallel) is stripped, numpy arrays become tensors, and entries that are not
    arrays ("__author__", "matching_heuristics", ...) and Caffe2 "_momentum" blobs are dropped. fmt is one of
    FORMATS: "torchvision" (bnK names), "caffe2" (res2_0_branch2a_w names), "minimask" (normK names), or
    "detectron2" for a whole detectron2 detector (backbone.bottom_up.*, proposal_generator.*).
    Raises ValueError (naming the file) for a missing, truncated, refused or unrecognised file.
    """
    path = str(path)
    if not Path(path).is_file():
        raise ValueError(f"--weights: no such file: {path}")
    obj = _load_pth(path) if zipfile.is_zipfile(path) else _unpickle(path)
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        obj = _load_pth(path)  # an old torch.save file: its first pickle is only a magic number
    for wrapper in ("model", "blobs", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or key.endswith("_momentum"):
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            state[key] = torch.from_numpy(np.array(value))  # copy: the unpickled buffer may be read-only
        elif isinstance(value, torch.Tensor):
            state[key] = value
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not state:
        raise ValueError(f"{path} holds no weight arrays")
    return state, _detect_format(path, state)


def _detect_format(path: str, state: dict) -> str:
    keys = list(state)
    if "backbone.bottom_up.stem.conv1.weight" in state and any(k.startswith("proposal_generator.") for k in keys):
        return "detectron2"  # a whole detector (minimask.interop.detectron2_format); not a backbone to --init imagenet
    if any(re.match(r"(res\d+_\d+_branch|res_conv1_bn_|conv1_gn_|conv1_w$)", k) for k in keys):
        return "caffe2"
    if any(re.search(r"(^|\.)bn\d\.", k) for k in keys):
        return "torchvision"
    if any(re.search(r"(^|\.)(norm\d|conv\d|layer\d)\.", k) or k.startswith("backbone.") for k in keys):
        return "minimask"
    if any(k.startswith(("stem.", "backbone.bottom_up.")) or re.match(r"res\d\.\d+\.", k) for k in keys):
        raise ValueError(f"{path} has detectron2 names (stem.conv1, res2.0.conv1, ...): not supported; use the "
                         f"original torchvision .pth or Caffe2 .pkl file")
    raise ValueError(f"{path}: unrecognised weight names (e.g. {keys[:3]}); expected a torchvision, Detectron "
                     f"(Caffe2) or minimask ResNet")
