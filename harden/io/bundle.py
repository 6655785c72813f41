"""A model as harden passes it from step to step: the module plus everything needed to rebuild it.

On disk a bundle is ONE safetensors file: the tensors of `module.state_dict()` and, in the
safetensors metadata (string -> string), JSON documents:
  harden.format   "1"
  harden.arch     how to build the plain module: {"kind": "zoo", "name": "small-cnn"},
                  {"kind": "factory", "ref": "pkg.mod:fn"} or {"kind": "onnx-graph", "graph": <b64 zlib>}
  harden.model    {"input_shape": [C,H,W], "num_classes": K}
  harden.recipe   the rewrites applied on top, in order (spectral norm, WCA noise, pruning masks)
  harden.data     what certification needs: dataset name, classes, input range, and the input
                  normalization mean/std, taken once and applied by every later step (harden.io.normalization)
  harden.source   the file this model came from: path, sha256, format
  harden.history  one record per training / pruning run
Loading rebuilds the plain module, re-applies the recipe (which creates the parametrization
buffers) and then loads the state dict, so nothing is ever unpickled. A bundle may come from
anyone, so every record is checked for the structure the loader relies on before it is used
(`parse_bundle_metadata`), sizes are bounded by what the file can hold, and a "factory"
architecture, which is the user's code, is imported only when the user names it (--arch) or
passes trust_code: never on the file's word alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

FORMAT_VERSION = "1"


@dataclass
class Bundle:
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    arch: dict
    recipe: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        steps = ", ".join(step["step"] for step in self.recipe) or "no rewrites"
        return f"{self.arch.get('name', self.arch['kind'])} {list(self.input_shape)} -> {self.num_classes} classes ({steps})"


